"""Chat template fixes, beside the checks they answer (`healer/templates/checks.py`).

Each fix is `(Draft, findings, Options) -> None`: it edits the draft and records its changes.
FIXES registers them with the checks they repair and the fixes they need to have run first;
`healer.fix` computes the order from those needs.
"""

from __future__ import annotations

from healer.draft import Draft, Fix, Options
from healer.report import Finding
from healer.tokenizers.surgery import CHATML_TOKENS, RESERVED, append_token, rename_token


def fix_chatml(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """--chatml: <|im_start|>/<|im_end|> as single special tokens, a ChatML template, <|im_end|> stops.

    Reserved tokens (Llama 3's <|reserved_special_token_N|>, Gemma's <unusedN>, Mistral's
    [control_N]) are renamed in place, so no embedding rows are added; otherwise two pieces
    are appended and the embeddings grow by two mean-initialized rows. Renamed reserved rows
    are untrained: the embeddings pass then gives them the trained mean.
    """
    if not opts.chatml:
        return
    from healer.templates import get
    from healer.tokenizers.inventory import inventory

    ckpt = draft.ckpt
    inv = inventory(ckpt)
    by_content = {c.content: c.id for c in inv.claims}
    check = next((f.check for f in findings if f.check in ("template.tokens_not_single", "template.missing")),
                 "template.chatml")
    missing = [t for t in CHATML_TOKENS if t not in by_content]
    if missing:
        if ckpt.model_type in ("gemma", "gemma2") and not opts.template:
            draft.change(check, "tokenizer", "note: Gemma has its own turn tokens <start_of_turn>/<end_of_turn>; "
                         "use --template gemma to keep them (ChatML patched in as asked)")
        _, template = draft.chat_template()
        reserved = sorted((i, c) for c, i in by_content.items() if RESERVED.match(c)
                          and (template is None or c not in template))
        if len(reserved) >= len(missing):
            for (i, old), new in zip(reserved, missing):
                rename_token(draft, i, old, new)
                draft.change(check, "tokenizer files", f"reserved token {old!r} (id {i}) renamed to {new!r}", old, new)
                by_content[new] = i
        else:
            for new in missing:
                i = append_token(draft, new, user_defined=True)
                draft.change(check, "tokenizer files", f"added {new!r} as id {i}", None, new)
                by_content[new] = i
    entry = get("chatml")
    _, old_template = draft.chat_template()
    draft.set_chat_template(entry.source)
    draft.change(check, "chat_template", "ChatML chat template installed", "present" if old_template else None,
                 "chatml")
    stop_also_at(draft, check, "<|im_end|>", by_content["<|im_end|>"])
    tc = draft.tokenizer_config
    extra = [t for t in tc.get("additional_special_tokens") or [] if t not in CHATML_TOKENS]
    tc["additional_special_tokens"] = [*extra, *CHATML_TOKENS]
    draft.write_json("tokenizer_config.json", tc)


def fix_template(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """--template NAME: install a registry template (answers template.missing / render_error)."""
    if opts.template is None:
        return
    from healer.templates import get

    entry = get(opts.template)
    _, old = draft.chat_template()
    checks = [f.check for f in findings if f.check in ("template.missing", "template.render_error")]
    draft.set_chat_template(entry.source)
    draft.change(checks[0] if checks else "template.set", "chat_template", f"chat template set to {entry.name!r}",
                 "present" if old else None, entry.name)


def fix_generation_prompt_ignored(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """A template that always writes the generation prompt: the registry entry it renders like otherwise."""
    found = [f for f in findings if f.check == "template.generation_prompt_ignored"]
    if not found or opts.template is not None or opts.chatml:
        return  # --template NAME and --chatml replace the template anyway
    name = found[0].details.get("registry_equivalent")
    if name is None:
        draft.unfixable.append(Finding("template.generation_prompt_ignored", "error",
                                       "The template matches no registry entry; give --template NAME."))
        return
    from healer.templates import get

    draft.set_chat_template(get(name).source)
    draft.change("template.generation_prompt_ignored", "chat_template",
                 f"chat template replaced by the registry's {name!r}, which honours add_generation_prompt",
                 "ignores add_generation_prompt", name)


def fix_eos_mismatch(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Add the template's end-of-turn token to generation_config.eos_token_id (keeping the base eos)."""
    found = [f for f in findings if f.check == "template.eos_mismatch"]
    if not found:
        return
    details = found[0].details
    stop_also_at(draft, "template.eos_mismatch", details["end_of_turn"], details["end_of_turn_id"])


def stop_also_at(draft: Draft, check: str, token: str, token_id: int) -> None:
    """Add `token_id` to generation_config.json eos_token_id, keeping the ids already there."""
    gc = draft.json("generation_config.json") or {}
    old = gc.get("eos_token_id", draft.ckpt.config.get("eos_token_id"))
    ids = list(old) if isinstance(old, list) else ([old] if old is not None else [])
    if token_id in ids:
        return
    gc["eos_token_id"] = [*ids, token_id]
    draft.write_json("generation_config.json", gc)
    draft.change(check, "generation_config.json", f"eos_token_id also stops at {token!r}", old, gc["eos_token_id"])


FIXES: list[Fix] = [
    # renames reserved tokens or appends ids after the ones the vocabulary fixes settled
    Fix("template.chatml", fix_chatml, checks=("template.tokens_not_single", "template.missing"),
        needs=("tokenizer.dangling_added_tokens", "tokenizer.out_of_range")),
    # --template NAME wins over the template --chatml installs: it is written last
    Fix("template.set", fix_template, checks=("template.missing", "template.render_error"),
        needs=("template.chatml",)),
    # so does the registry template that honours add_generation_prompt
    Fix("template.generation_prompt", fix_generation_prompt_ignored, checks=("template.generation_prompt_ignored",),
        needs=("template.chatml",)),
    # --chatml's <|im_end|> is added to eos_token_id first; generation_config.json's pad_token_id
    # (fix_pad) is written before its eos_token_id
    Fix("template.eos_mismatch", fix_eos_mismatch, checks=("template.eos_mismatch",),
        needs=("template.chatml", "tokenizer.pad")),
]
