"""Doctor checks on the chat template: present, renders, markers are single tokens, stops."""

from __future__ import annotations

import re

from healer.model_dir import ModelDir
from healer.report import Check, Context, Finding, fix_command
from healer.templates.render import TemplateError, render_source
from healer.tokenizers.inventory import inventory

REPLY = "Paris is the capital of France."
SAMPLE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": REPLY},
]
# Marker spellings used by chat formats; inside a template they must be single special tokens.
MARKER_RE = re.compile(r"<\|[^<>|\s]{1,48}\|>|<(?:start|end)_of_turn>")
TURN_TOKENS = ("<|im_start|>", "<|eot_id|>", "<|start_header_id|>", "<start_of_turn>", "<|user|>", "<|end|>",
               "[INST]")
INSTRUCT_HINTS = re.compile(r"instruct|chat|(^|[-_])it($|[-_])|sft|dpo", re.IGNORECASE)


class TemplateRenderError(Exception):
    pass


def render(template: str, messages: list[dict], ckpt: ModelDir, add_generation_prompt: bool = False) -> str:
    """Render like transformers' apply_chat_template(tokenize=False) does, with the checkpoint's special tokens."""
    specials = {f"{n}_token": ckpt.special_token(n) for n in ("bos", "eos", "pad", "unk")}
    try:
        return render_source(template, messages, add_generation_prompt=add_generation_prompt, name="chat_template",
                             **specials)
    except Exception as e:  # any failure of the model's own template is a finding about it, not a doctor crash
        # name the Jinja error itself (TemplateSyntaxError, the template's raise_exception), as transformers does
        cause = e.__cause__ if isinstance(e, TemplateError) and e.__cause__ is not None else e
        raise TemplateRenderError(f"{type(cause).__name__}: {cause}") from e


def render_sample(ckpt: ModelDir) -> str | None:
    """The checkpoint's template over a short conversation (without a system turn if it refuses one)."""
    if not ckpt.chat_template:
        return None
    try:
        return render(ckpt.chat_template, SAMPLE, ckpt)
    except TemplateRenderError:
        try:
            return render(ckpt.chat_template, SAMPLE[1:], ckpt)
        except TemplateRenderError:
            return None


def check_template(ckpt: ModelDir, ctx: Context) -> list[Finding]:
    if not ckpt.has_tokenizer:
        return []
    template = ckpt.chat_template
    if not template:
        return _missing(ckpt)
    messages = SAMPLE
    try:
        rendered = render(template, messages, ckpt)
    except TemplateRenderError:
        messages = SAMPLE[1:]  # a template that refuses a system turn
        try:
            rendered = render(template, messages, ckpt)
        except TemplateRenderError as e:
            return [Finding(
                "template.render_error", "error",
                f"The chat template ({ckpt.chat_template_file or 'chat_template'}) does not render: {e}",
                fix=fix_command(ckpt, " --template NAME"),
                details={"error": str(e)},
            )]
    tok = ckpt.hf_tokenizer()
    findings = []
    entry = _registry_entry(ckpt)
    markers = sorted(set(MARKER_RE.findall(rendered)) | set(entry.control_tokens if entry else ()))
    split = {m: tok.encode(m, add_special_tokens=False) for m in markers}
    not_single = {m: ids for m, ids in split.items() if len(ids) != 1}
    if not_single:
        m, ids = next(iter(not_single.items()))
        findings.append(Finding(
            "template.tokens_not_single", "error",
            f"{len(not_single)} chat marker(s) used by the template are not single tokens, e.g. {m!r} -> {ids}: "
            "the model never saw them as one symbol.",
            fix=fix_command(ckpt, " --chatml"),
            details={"markers": {m: ids for m, ids in not_single.items()},
                     "template": entry.name if entry else None},
        ))
    eot = _end_of_turn(ckpt, entry, rendered)
    if eot is not None and eot not in not_single:  # a marker that is no token cannot be an eos id
        findings.extend(_eos_mismatch(ckpt, tok, eot))
    findings.extend(_generation_prompt_ignored(ckpt, messages, rendered, eot))
    return findings


def _generation_prompt_ignored(ckpt: ModelDir, messages: list[dict], rendered: str,
                               eot: str | None) -> list[Finding]:
    """A conversation ending in an assistant turn must render ending with that turn when
    add_generation_prompt is off, and (where the template has a generation prompt at all) unlike
    the render with it on; else every training example ends with an empty assistant header
    (Llama 3's template as first released)."""
    at = rendered.rfind(REPLY)
    rest = rendered[at + len(REPLY):].strip() if at >= 0 else ""
    for ending in (eot, ckpt.special_token("eos")):
        if ending and rest.startswith(ending):
            rest = rest[len(ending):].strip()
    asked = _safe_render(ckpt, messages[:-1], add_generation_prompt=True)
    has_prompt = asked is not None and asked != _safe_render(ckpt, messages[:-1])
    same = has_prompt and _safe_render(ckpt, messages, add_generation_prompt=True) == rendered
    if not (rest or same):
        return []
    fix = _equivalent_when_asked(ckpt)
    return [Finding(
        "template.generation_prompt_ignored", "error",
        "The chat template ignores add_generation_prompt: a conversation that ends with the assistant's turn "
        f"renders ending with {(rest or rendered[-40:])!r}, so every training example would end with an empty "
        "assistant turn" + (f"; the registry template {fix.name!r} renders the same otherwise." if fix else "."),
        fix=fix_command(ckpt) if fix else fix_command(ckpt, " --template NAME"),
        details={"after_last_turn": rest, "registry_equivalent": fix and fix.name},
    )]


def _safe_render(ckpt: ModelDir, messages: list[dict], add_generation_prompt: bool = False) -> str | None:
    try:
        return render(ckpt.chat_template, messages, ckpt, add_generation_prompt=add_generation_prompt)
    except TemplateRenderError:
        return None


def _equivalent_when_asked(ckpt: ModelDir):
    """The registry entry the template equals with add_generation_prompt on, for every probe and either flag
    (what a template that always writes the generation prompt is meant to be)."""
    from healer.templates.detect import PROBE_VARIABLES, PROBES
    from healer.templates.registry import TEMPLATES

    specials = {f"{n}_token": ckpt.special_token(n) for n in ("bos", "eos", "pad", "unk")}

    def outcome(source: str, messages: list[dict], gen: bool) -> str | None:
        try:
            return render_source(source, messages, add_generation_prompt=gen, name="probe", **specials,
                                 **PROBE_VARIABLES)
        except TemplateError:
            return None

    for entry in TEMPLATES.values():
        wanted = [outcome(entry.source, m, True) for m in PROBES]
        if not any(w is not None for w in wanted):
            continue
        if all(outcome(ckpt.chat_template, m, gen) == w for m, w in zip(PROBES, wanted) for gen in (False, True)):
            return entry
    return None


def _registry_entry(ckpt: ModelDir):
    """The registry entry the checkpoint's template renders like (None when it is none of them)."""
    from healer.templates import TemplateError, detect, get

    try:
        name = detect(ckpt.chat_template, bos_token=ckpt.special_token("bos") or "",
                      eos_token=ckpt.special_token("eos") or "")
    except TemplateError:
        return None
    return get(name) if name else None


def template_end_of_turn(ckpt: ModelDir) -> str | None:
    """The token the checkpoint's chat template ends assistant turns with (None: no template, or it writes none)."""
    rendered = render_sample(ckpt)
    return None if rendered is None else _end_of_turn(ckpt, _registry_entry(ckpt), rendered)


def _end_of_turn(ckpt: ModelDir, entry, rendered: str) -> str | None:
    return entry.end_of_turn(ckpt.special_token("eos")) if entry else end_of_turn(rendered, ckpt)


def end_of_turn(rendered: str, ckpt: ModelDir) -> str | None:
    """The special token written right after the assistant's reply (None if the template writes none)."""
    at = rendered.rfind(REPLY)
    if at < 0:
        return None
    rest = rendered[at + len(REPLY):].lstrip(" ")
    candidates = {c.content for c in inventory(ckpt).added_claims()} | set(MARKER_RE.findall(rest))
    candidates |= {t for n in ("eos",) if (t := ckpt.special_token(n))}
    matches = [c for c in candidates if c and rest.startswith(c)]
    return max(matches, key=len) if matches else None


def _eos_mismatch(ckpt: ModelDir, tok, eot: str) -> list[Finding]:
    eos = ckpt.special_token("eos")
    if tok.convert_tokens_to_ids(eot) in (None, tok.unk_token_id):
        return []  # not a token at all: tokens_not_single reports it
    gen = (ckpt.generation_config or {}).get("eos_token_id", ckpt.config.get("eos_token_id"))
    gen_ids = set(gen) if isinstance(gen, list) else {gen}
    eot_id = tok.convert_tokens_to_ids(eot)
    if eot == eos or eot_id in gen_ids:
        return []
    return [Finding(
        "template.eos_mismatch", "warning",
        f"The template ends assistant turns with {eot!r} (id {eot_id}), which is neither eos_token ({eos!r}) "
        f"nor in generation_config eos_token_id {sorted(i for i in gen_ids if i is not None)}: generation never stops.",
        fix=fix_command(ckpt),
        details={"end_of_turn": eot, "end_of_turn_id": eot_id, "eos_token": eos,
                 "generation_eos_token_id": sorted(i for i in gen_ids if i is not None)},
    )]


def _missing(ckpt: ModelDir) -> list[Finding]:
    names = " ".join(str(x) for x in (ckpt.path.name, ckpt.config.get("_name_or_path", "")))
    vocab = {c.content for c in inventory(ckpt).claims}
    turn = [t for t in TURN_TOKENS if t in vocab]
    looks_chat = bool(INSTRUCT_HINTS.search(names)) or bool(turn)
    return [Finding(
        "template.missing", "warning" if looks_chat else "info",
        "No chat template" + (f", although the vocabulary has turn tokens {turn}" if turn else "")
        + (": chat fine-tuning needs one." if looks_chat else " (a base model; chat fine-tuning needs one)."),
        fix=fix_command(ckpt, " --template NAME"),
        details={"turn_tokens": turn},
    )]


CHECKS: list[Check] = [check_template]
