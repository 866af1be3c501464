"""Plan repairs from doctor's findings and write a repaired checkpoint next to the input.

Flow: diagnose the input, let each fix edit a Draft (tokenizer and config files in memory,
changed tensors), write the draft into a temp dir beside OUT (unchanged weight shards
hard-linked), diagnose the result, and rename the temp dir to OUT only if every check a fix
claimed is gone. The input directory is never written to.

Embedding rows are repaired in a second pass over the first pass's output, because which
rows matter (special and template tokens) depends on the repaired tokenizer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from healer.checkpoint import Checkpoint
from healer.doctor import diagnose, read_corpus
from healer.errors import CheckpointError, HealerError, OutputError
from healer.outputs import refuse_overlap, remove, remove_stale_staging, staging_path, terminate_as_interrupt
from healer.report import Finding, Report

REPORT_NAME = "healer_report.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
STAGING_TAG = "healer"
BOS_IN_TEMPLATE = re.compile(r"\{\{-?\s*bos_token\s*-?\}\}")


class FixError(HealerError):
    """The repaired checkpoint still fails a check a fix claimed to repair (exit 1, nothing written)."""

    def __init__(self, message: str, report: FixReport):
        super().__init__(message)
        self.report = report


@dataclass
class Change:
    """One edit of the output: which check it answers, what was there, what is there now."""

    check: str
    target: str
    description: str
    before: Any = None
    after: Any = None


@dataclass
class Options:
    chatml: bool = False
    template: str | None = None
    corpus: tuple[str, ...] = ()
    all_untrained: bool = False
    dataset: str | None = None
    out_of_range: str = "auto"  # auto | grow | drop


@dataclass
class FixReport:
    """What fix did: findings before, changes made, findings after, checks it could not fix."""

    model: str
    out: str | None
    changes: list[Change] = field(default_factory=list)
    unfixable: list[Finding] = field(default_factory=list)
    before: Report | None = None
    after: Report | None = None
    written: bool = False

    @property
    def claimed(self) -> set[str]:
        return {c.check for c in self.changes}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "out": self.out,
            "written": self.written,
            "changes": [asdict(c) for c in self.changes],
            "unfixable": [asdict(f) for f in self.unfixable],
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str)

    def render(self, console, *, dry_run: bool = False, title: str | None = None) -> None:
        """Print the table of changes (check, file or tensor, change), what was not fixed, and where it wrote."""
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=title or ("planned changes" if dry_run else "changes"), expand=True)
        table.add_column("check", no_wrap=True)
        table.add_column("file/tensor", no_wrap=True)
        table.add_column("change", ratio=1, overflow="fold")
        for c in self.changes:
            table.add_row(c.check, c.target, escape(c.description))
        if self.changes:
            console.print(table)
        else:
            console.print("Nothing to change.")
        for f in self.unfixable:
            console.print(f"[bold red]not fixed[/] {f.check}: {escape(f.message)}")
        if dry_run:
            console.print("[dim]--dry-run: nothing written[/]")
        elif self.written:
            after = self.after.summary() if self.after else {}
            console.print(f"Wrote [bold]{escape(str(self.out))}[/] ({after.get('error', 0)} error(s), "
                          f"{after.get('warning', 0)} warning(s) left); details in {REPORT_NAME}", highlight=False)


class Draft:
    """The output being planned: replaced files (bytes) and tensors, over an input Checkpoint."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.files: dict[str, bytes] = {}
        self.tensors: dict[str, Any] = {}
        self.changes: list[Change] = []
        self.unfixable: list[Finding] = []
        self.rows_needed = 0  # embedding rows the new tokenizer needs (grown once, after all fixes)

    def read(self, name: str) -> bytes | None:
        if name in self.files:
            return self.files[name]
        p = self.ckpt.file(name)
        return p.read_bytes() if p is not None else None

    def json(self, name: str) -> Any:
        data = self.read(name)
        return json.loads(data) if data is not None else None

    def write_json(self, name: str, obj: Any) -> None:
        self.files[name] = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    def change(self, check: str, target: str, description: str, before: Any = None, after: Any = None) -> None:
        self.changes.append(Change(check, target, description, before, after))

    @property
    def tokenizer_config(self) -> dict[str, Any]:
        return self.json("tokenizer_config.json") or {}

    def chat_template(self) -> tuple[str, str | None]:
        """(where the template lives, its text): chat_template.jinja or tokenizer_config.json."""
        jinja = self.read("chat_template.jinja")
        if jinja is not None:
            return "chat_template.jinja", jinja.decode("utf-8")
        tpl = self.tokenizer_config.get("chat_template")
        return "tokenizer_config.json", tpl if isinstance(tpl, str) else None

    def set_chat_template(self, text: str) -> None:
        where, _ = self.chat_template()
        if where == "chat_template.jinja":
            self.files["chat_template.jinja"] = text.encode("utf-8")
        else:
            tc = self.tokenizer_config
            tc["chat_template"] = text
            self.write_json("tokenizer_config.json", tc)


    def sp_proto(self):
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(self.read("tokenizer.model"))
        return proto

    def tokenizer_length(self) -> int:
        """1 + the largest id any tokenizer file of the draft claims."""
        n = -1
        if self.read("tokenizer.model"):
            n = len(self.sp_proto().pieces) - 1
        data = self.read("tokenizer.json")
        if data:
            tj = json.loads(data)
            vocab = (tj.get("model") or {}).get("vocab") or {}
            ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
            n = max([n, *ids, *(t["id"] for t in tj.get("added_tokens") or [])])
        for i in (self.tokenizer_config.get("added_tokens_decoder") or {}):
            n = max(n, int(i))
        return n + 1


Fix = Callable[[Draft, list[Finding], Options], None]


# ----------------------------------------------------------------------------- the fixes


FAST_CLASS = "PreTrainedTokenizerFast"


def fix_fast_tokenizer(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Build tokenizer.json from tokenizer.model and keep it only if it agrees with sentencepiece."""
    ckpt = draft.ckpt
    wanted = [f for f in findings
              if f.check in ("tokenizer.missing_fast", "tokenizer.fast_mismatch", "tokenizer.loader_mismatch")]
    sp_edited = "tokenizer.model" in draft.files
    if not ckpt.has_sentencepiece and any(f.check == "tokenizer.loader_mismatch" for f in wanted):
        use_fast_class(draft, "tokenizer.loader_mismatch")  # tokenizer.json is the reference: load it as written
        return
    if not ckpt.has_sentencepiece or not (wanted or sp_edited):
        return
    from healer.tokenizers.convert import convert_verified
    from healer.tokenizers.corpus import builtin_corpus

    tc = draft.tokenizer_config
    added = {int(i): t["content"] if isinstance(t, dict) else t
             for i, t in (tc.get("added_tokens_decoder") or {}).items()}
    pieces = draft.sp_proto().pieces
    added = {i: t for i, t in added.items() if i >= len(pieces) or t in CHATML_TOKENS}
    added.update({i: p.piece for i, p in enumerate(pieces) if p.piece in CHATML_TOKENS})
    # ChatML puts text right after its tokens: prefix it as llama.cpp will (see convert.py)
    result = convert_verified(
        draft.read("tokenizer.model"), list(builtin_corpus()) + list(opts.corpus), added,
        add_bos=wants_bos(ckpt, tc), add_eos=bool(tc.get("add_eos_token", False)),
        prefix_after_specials=any(t in CHATML_TOKENS for t in added.values()),
    )
    check = wanted[0].check if wanted else "template.chatml"
    if not result.ok:
        first = [{"text": m.text, "sentencepiece": m.sp_ids, "fast": m.fast_ids}
                 for m in result.first_disagreements()]
        draft.unfixable.append(Finding(
            check, "error", "No tokenizer.json candidate agrees with sentencepiece on every string; "
            "keeping the slow tokenizer only.", details={"first": first}))
        if ckpt.has_fast:  # a known-wrong tokenizer.json is worse than none
            draft.files["tokenizer.json"] = b""
        return
    draft.files["tokenizer.json"] = result.tokenizer_json.encode("utf-8")
    draft.change(check, "tokenizer.json",
                 f"built from tokenizer.model ({result.candidate} pipeline), identical to sentencepiece on "
                 f"{result.comparison.n} strings", before="present" if ckpt.has_fast else None, after="verified")
    if "add_bos_token" not in tc and wants_bos(ckpt, tc):
        tc["add_bos_token"] = True
        draft.write_json("tokenizer_config.json", tc)
    use_fast_class(draft, check)


def use_fast_class(draft: Draft, check: str) -> None:
    """tokenizer_class = PreTrainedTokenizerFast, so transformers loads tokenizer.json as written.

    transformers 5's LlamaTokenizer & co. swap tokenizer.json's normalizer and pre-tokenizer
    for their own (tokenizer.loader_mismatch); the generic class keeps the file's.
    """
    tc = draft.tokenizer_config
    if tc.get("tokenizer_class") == FAST_CLASS:
        return
    before = tc.get("tokenizer_class")
    tc["tokenizer_class"] = FAST_CLASS
    draft.write_json("tokenizer_config.json", tc)
    draft.change(check, "tokenizer_config.json", f"tokenizer_class = {FAST_CLASS}, so transformers loads "
                 "tokenizer.json as written", before, FAST_CLASS)


def wants_bos(ckpt: Checkpoint, tc: dict[str, Any]) -> bool:
    """Whether encode() should add BOS: configured, or the family is trained with it."""
    from healer.tokenizers.bos import starts_with_bos

    return bool(ckpt.special_token("bos")) and starts_with_bos(ckpt.model_type, tc)


def fix_bos_missing(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Make encode() add BOS: tokenizer_config add_bos_token and tokenizer.json's post-processor."""
    found = [f for f in findings if f.check == "tokenizer.bos_missing"]
    if not found:
        return
    ckpt, tc = draft.ckpt, draft.tokenizer_config
    bos = ckpt.special_token("bos")
    before = tc.get("add_bos_token")
    tc["add_bos_token"] = True
    draft.write_json("tokenizer_config.json", tc)
    draft.change("tokenizer.bos_missing", "tokenizer_config.json", "add_bos_token = true", before, True)
    data = draft.read("tokenizer.json")
    if data:
        tj = json.loads(data)
        bos_id = found[0].details.get("bos_id")
        old = tj.get("post_processor")
        tj["post_processor"] = bos_post_processor(old, bos, bos_id, bool(tc.get("add_eos_token")),
                                                  ckpt.special_token("eos"), _token_id(tj, ckpt.special_token("eos")))
        draft.files["tokenizer.json"] = json.dumps(tj, ensure_ascii=False).encode("utf-8")
        draft.change("tokenizer.bos_missing", "tokenizer.json", f"post-processor adds {bos!r} (single and pair)",
                     old and old.get("type"), "TemplateProcessing")


def fix_setting_ignored(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Make tokenizer.json's post-processor do what add_bos_token / add_eos_token say."""
    found = [f for f in findings if f.check == "tokenizer.setting_ignored"]
    data = draft.read("tokenizer.json")
    if not found or not data or any(f.check == "tokenizer.bos_missing" for f in findings):
        return  # fix_bos_missing writes the post-processor with the configured EOS too
    ckpt, tc = draft.ckpt, draft.tokenizer_config
    tj = json.loads(data)
    old = tj.get("post_processor")
    bos, eos = ckpt.special_token("bos"), ckpt.special_token("eos")
    add_bos = bool(bos) and tc.get("add_bos_token", wants_bos(ckpt, tc)) is True
    tj["post_processor"] = special_post_processor(old, bos if add_bos else None, _token_id(tj, bos),
                                                  eos if tc.get("add_eos_token") is True else None, _token_id(tj, eos))
    draft.files["tokenizer.json"] = json.dumps(tj, ensure_ascii=False).encode("utf-8")
    settings = ", ".join(f"{s['setting']} = {str(s['configured']).lower()}" for s in found[0].details["settings"])
    draft.change("tokenizer.setting_ignored", "tokenizer.json", f"post-processor follows {settings}",
                 old and old.get("type"), (tj["post_processor"] or {}).get("type"))


def _token_id(tj: dict[str, Any], content: str | None) -> int | None:
    if content is None:
        return None
    for t in tj.get("added_tokens") or []:
        if t["content"] == content:
            return t["id"]
    vocab = (tj.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        return vocab.get(content)
    if isinstance(vocab, list):
        return next((i for i, (p, _) in enumerate(vocab) if p == content), None)
    return None


def bos_post_processor(old: dict | None, bos: str, bos_id: int, add_eos: bool, eos: str | None,
                       eos_id: int | None) -> dict[str, Any]:
    """A TemplateProcessing that writes BOS (and EOS if configured), after a kept ByteLevel step."""
    return special_post_processor(old, bos, bos_id, eos if add_eos else None, eos_id)


def special_post_processor(old: dict | None, bos: str | None, bos_id: int | None, eos: str | None,
                           eos_id: int | None) -> dict[str, Any] | None:
    """A post-processor that writes `bos` before and `eos` after each sequence (None: not that one).

    Byte-level tokenizers need their ByteLevel post-processor for offsets: it is kept in front.
    """
    kept = []
    if old and old.get("type") == "ByteLevel":
        kept = [old]
    elif old and old.get("type") == "Sequence":
        kept = [p for p in old.get("processors", []) if p.get("type") == "ByteLevel"]
    front = [{"SpecialToken": {"id": bos, "type_id": 0}}] if bos is not None and bos_id is not None else []
    back = [{"SpecialToken": {"id": eos, "type_id": 0}}] if eos is not None and eos_id is not None else []
    if not front and not back:
        return kept[0] if kept else None

    def with_type(items: list[dict], type_id: int) -> list[dict]:
        return [{"SpecialToken": {**x["SpecialToken"], "type_id": type_id}} for x in items]

    single = [*front, {"Sequence": {"id": "A", "type_id": 0}}, *back]
    pair = single + [*with_type(front, 1), {"Sequence": {"id": "B", "type_id": 1}}, *with_type(back, 1)]
    specials = {}
    if front:
        specials[bos] = {"id": bos, "ids": [bos_id], "tokens": [bos]}
    if back:
        specials[eos] = {"id": eos, "ids": [eos_id], "tokens": [eos]}
    template = {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}
    return {"type": "Sequence", "processors": [*kept, template]} if kept else template


def fix_double_bos(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Stop the chat template from writing BOS when the tokenizer adds it on encode.

    We keep BOS in the tokenizer rather than the template: raw-text (pretraining-style) data
    then still gets it, and templated data gets exactly one.
    """
    if not any(f.check == "tokenizer.double_bos" for f in findings):
        return
    where, text = draft.chat_template()
    if text is None:
        return
    new, n = BOS_IN_TEMPLATE.subn("", text, count=1)
    if n == 0:
        draft.unfixable.append(Finding("tokenizer.double_bos", "warning",
                                       "The template writes BOS in a way fix cannot remove safely; edit it by hand."))
        return
    draft.set_chat_template(new)
    draft.change("tokenizer.double_bos", where, "chat template no longer writes bos_token (the tokenizer adds it)",
                 "{{ bos_token }}", None)


PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<PAD>")
RESERVED = re.compile(r"^(<\|reserved_special_token_\d+\|>|<unused\d+>|\[control_\d+\]|<\|placeholder\d+\|>)$")


def fix_pad(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Give the model a pad token that is not eos: an existing pad/reserved token, else a new one."""
    found = [f for f in findings if f.check in ("tokenizer.pad_is_eos", "tokenizer.pad_missing")]
    if not found:
        return
    ckpt = draft.ckpt
    from healer.tokenizers.inventory import inventory, special_tokens

    inv = inventory(ckpt)
    by_content = {c.content: c.id for c in inv.claims}
    declared = set(special_tokens(ckpt).values())
    _, template = draft.chat_template()
    rows = ckpt.embedding_rows or 0
    pad, pad_id = None, None
    for name in PAD_NAMES:
        if name in by_content and by_content[name] < rows and name not in declared:
            pad, pad_id = name, by_content[name]
            break
    if pad is None:
        reserved = sorted((i, c) for c, i in by_content.items() if RESERVED.match(c) and i < rows
                          and c not in declared and (template is None or c not in template))
        if reserved:
            pad_id, pad = reserved[-1]  # the last reserved token: the first ones are what ChatML takes
    check = found[0].check
    if pad is None:
        pad = "<|pad|>"
        pad_id = append_token(draft, pad, user_defined=False)
        draft.change(check, "tokenizer files", f"added {pad!r} as id {pad_id}", None, pad)
    before = ckpt.special_token("pad")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        obj = draft.json(name)
        if obj is None and name == "special_tokens_map.json":
            continue
        obj = obj or {}
        obj["pad_token"] = pad
        draft.write_json(name, obj)
    draft.change(check, "tokenizer_config.json", f"pad_token = {pad!r} (id {pad_id})", before, pad)
    for name in ("config.json", "generation_config.json"):
        obj = draft.json(name)
        if obj is None:
            continue
        old = obj.get("pad_token_id")
        obj["pad_token_id"] = pad_id
        draft.write_json(name, obj)
        draft.change(check, name, f"pad_token_id = {pad_id}", old, pad_id)


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
    if not found or opts.template is not None:
        return  # --template NAME replaces the template anyway
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


CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


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


def rename_token(draft: Draft, i: int, old: str, new: str) -> None:
    """Give id `i` the text `new` in every tokenizer file (a user-defined piece in sentencepiece)."""
    if draft.read("tokenizer.model"):
        proto = draft.sp_proto()
        if i < len(proto.pieces):
            assert proto.pieces[i].piece == old, (proto.pieces[i].piece, old)
            proto.pieces[i].piece = new
            # user-defined, not control: sentencepiece encodes user-defined pieces from text as one id
            proto.pieces[i].type = proto.pieces[i].USER_DEFINED
            draft.files["tokenizer.model"] = proto.SerializeToString()
    data = draft.read("tokenizer.json")
    if data:
        tj = json.loads(data)
        for t in tj.get("added_tokens") or []:
            if t["id"] == i:
                t["content"], t["special"] = new, True
        vocab = (tj.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and vocab.get(old) == i:
            vocab[new] = vocab.pop(old)
        elif isinstance(vocab, list) and i < len(vocab) and vocab[i][0] == old:
            vocab[i][0] = new
        draft.files["tokenizer.json"] = json.dumps(tj, ensure_ascii=False).encode("utf-8")
    _set_added_decoder(draft, i, new)


def append_token(draft: Draft, new: str, user_defined: bool) -> int:
    """Add `new` as the next id in every tokenizer file; records that an embedding row is needed."""
    i = draft.tokenizer_length()
    if draft.read("tokenizer.model"):
        proto = draft.sp_proto()
        if i != len(proto.pieces):
            raise HealerError(f"cannot append {new!r}: ids {len(proto.pieces)}..{i - 1} are added tokens past "
                              "tokenizer.model; renumbering them is not supported")
        p = proto.pieces.add()
        p.piece, p.score = new, 0.0
        p.type = p.USER_DEFINED if user_defined else p.CONTROL
        draft.files["tokenizer.model"] = proto.SerializeToString()
    data = draft.read("tokenizer.json")
    if data:
        tj = json.loads(data)
        tj.setdefault("added_tokens", []).append({
            "id": i, "content": new, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True})
        draft.files["tokenizer.json"] = json.dumps(tj, ensure_ascii=False).encode("utf-8")
    _set_added_decoder(draft, i, new)
    draft.rows_needed = max(draft.rows_needed, i + 1)
    return i


def _set_added_decoder(draft: Draft, i: int, content: str) -> None:
    tc = draft.tokenizer_config
    decoder = tc.get("added_tokens_decoder")
    if decoder is None:  # loaders then take added tokens from tokenizer.json / tokenizer.model
        return
    decoder[str(i)] = {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": True}
    tc["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
    draft.write_json("tokenizer_config.json", tc)


def grow_rows(draft: Draft) -> None:
    """Grow embed_tokens/lm_head to the rows new tokens need (mean-initialized), once, after all fixes."""
    rows = draft.ckpt.embedding_rows or 0
    if draft.rows_needed <= rows or not draft.ckpt.has_weights:
        return
    from healer.embeddings.repair import grow_embeddings

    n_new = draft.rows_needed - rows
    draft.tensors.update(grow_embeddings(draft.ckpt, n_new))
    cfg = draft.json("config.json")
    cfg["vocab_size"] = draft.rows_needed
    draft.write_json("config.json", cfg)
    draft.change("tokenizer.id_out_of_range", draft.ckpt.embed_name or "embeddings",
                 f"{n_new} new embedding row(s), set to the mean of the trained rows", rows, draft.rows_needed)


def fix_dangling_added_tokens(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Make tokenizer_config.json and added_tokens.json agree with the vocabulary loaders use first.

    The authority is tokenizer.json (its vocabulary and added tokens) or, without it,
    tokenizer.model: that is the vocabulary the weights were trained with. Entries of the other
    files that give an id another text are rewritten; entries for tokens the authority lacks
    are added to tokenizer.json when their id is free.
    """
    found = [f for f in findings if f.check == "tokenizer.dangling_added_token"]
    if not found:
        return
    from healer.tokenizers.inventory import inventory

    inv = inventory(draft.ckpt)
    authority_sources = ({"tokenizer.json vocab", "tokenizer.json added_tokens"} if draft.ckpt.has_fast
                         else {"tokenizer.model"})
    authority = {c.id: c.content for c in inv.claims if c.source in authority_sources}
    tc = draft.tokenizer_config
    decoder = tc.get("added_tokens_decoder") or {}
    for key, tok in list(decoder.items()):
        content = tok.get("content") if isinstance(tok, dict) else tok
        i = int(key)
        if i in authority and authority[i] != content:
            decoder[key] = {**tok, "content": authority[i]} if isinstance(tok, dict) else authority[i]
            draft.change("tokenizer.dangling_added_token", "tokenizer_config.json",
                         f"added_tokens_decoder id {i}: {content!r} -> {authority[i]!r} (as the vocabulary says)",
                         content, authority[i])
        elif i not in authority and draft.ckpt.has_fast:
            append_at(draft, i, content, special=bool(tok.get("special", True)) if isinstance(tok, dict) else True)
            draft.change("tokenizer.dangling_added_token", "tokenizer.json", f"added {content!r} as id {i}",
                         None, content)
    tj_added = {t["id"]: t for t in (json.loads(draft.read("tokenizer.json")).get("added_tokens") or [])
                } if draft.read("tokenizer.json") else {}
    if decoder or tc.get("added_tokens_decoder") is not None:
        for i, t in sorted(tj_added.items()):
            if str(i) not in decoder:
                decoder[str(i)] = {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                      "special") if k in t}
                draft.change("tokenizer.dangling_added_token", "tokenizer_config.json",
                             f"added_tokens_decoder lists {t['content']!r} (id {i}) like tokenizer.json", None,
                             t["content"])
        tc["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
        draft.write_json("tokenizer_config.json", tc)
    legacy = draft.json("added_tokens.json")
    if legacy:
        agreed = {c: i for c, i in legacy.items() if authority.get(i, c) == c}
        if agreed != legacy:
            dropped = sorted(set(legacy) - set(agreed))
            draft.write_json("added_tokens.json", agreed)
            draft.change("tokenizer.dangling_added_token", "added_tokens.json",
                         f"dropped entries that contradict the vocabulary: {dropped}", dropped, None)


def append_at(draft: Draft, i: int, content: str, special: bool) -> None:
    """Add an added token with an explicit id to tokenizer.json (records the embedding row it needs)."""
    tj = json.loads(draft.read("tokenizer.json"))
    tj.setdefault("added_tokens", []).append({
        "id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
        "normalized": False, "special": special})
    tj["added_tokens"].sort(key=lambda t: t["id"])
    draft.files["tokenizer.json"] = json.dumps(tj, ensure_ascii=False).encode("utf-8")
    draft.rows_needed = max(draft.rows_needed, i + 1)


def fix_out_of_range(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Ids past the embedding rows: grow the embeddings (default for special tokens) or drop the tokens."""
    found = [f for f in findings if f.check == "tokenizer.id_out_of_range"]
    if not found:
        return
    from healer.tokenizers.inventory import inventory, special_tokens

    rows = draft.ckpt.embedding_rows or 0
    inv = inventory(draft.ckpt)
    past = {c.id: c for c in inv.claims if c.id >= rows}
    wanted = set(special_tokens(draft.ckpt).values())
    _, template = draft.chat_template()
    added_special = {c.content for c in inv.added_claims()}
    mode = opts.out_of_range
    if mode == "auto":
        mode = "grow" if any(c.content in wanted or (template and c.content in template)
                             or c.content in added_special for c in past.values()) else "drop"
    if mode == "grow":
        draft.rows_needed = max(draft.rows_needed, max(past) + 1)
        return  # grow_rows() writes the rows and config.vocab_size and records the change
    if any(not c.added for c in past.values()):
        draft.unfixable.append(Finding("tokenizer.id_out_of_range", "error",
                                       "Ids past the embedding are part of the base vocabulary; only growing "
                                       "the embeddings (--grow-embeddings) can fix that."))
        return
    data = draft.read("tokenizer.json")
    if data:
        tj = json.loads(data)
        tj["added_tokens"] = [t for t in tj.get("added_tokens") or [] if t["id"] < rows]
        draft.files["tokenizer.json"] = json.dumps(tj, ensure_ascii=False).encode("utf-8")
    tc = draft.tokenizer_config
    if tc.get("added_tokens_decoder"):
        tc["added_tokens_decoder"] = {k: v for k, v in tc["added_tokens_decoder"].items() if int(k) < rows}
        draft.write_json("tokenizer_config.json", tc)
    legacy = draft.json("added_tokens.json")
    if legacy:
        draft.write_json("added_tokens.json", {c: i for c, i in legacy.items() if i < rows})
    draft.change("tokenizer.id_out_of_range", "tokenizer files",
                 f"dropped {len(past)} token(s) past the {rows} embedding rows",
                 [c.content for _, c in sorted(past.items())][:20], None)


PASS_ONE: list[Fix] = [fix_dangling_added_tokens, fix_out_of_range, fix_chatml, fix_template,
                       fix_generation_prompt_ignored, fix_fast_tokenizer,
                       fix_bos_missing, fix_setting_ignored, fix_double_bos, fix_pad, fix_eos_mismatch]


def fix_untrained(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Set untrained rows that matter (special/template/dataset tokens, or all) to the trained mean."""
    if not any(f.check == "embeddings.untrained" for f in findings):
        return
    from healer.embeddings.repair import checkpoint_untrained_rows, repair_untrained
    from healer.embeddings.usage import load_vocab, protected_ids, select_rows, token_use

    ckpt = draft.ckpt
    vocab = load_vocab(ckpt)
    untrained = checkpoint_untrained_rows(ckpt, protected_ids(ckpt, vocab))
    use = token_use(ckpt, vocab, opts.dataset)
    rows = select_rows(untrained, use, opts.all_untrained)
    if not rows:
        return
    # a zero pad/bos/eos row is not repaired (it is masked or never predicted), but it is not
    # trained either: keep it out of the mean too
    degenerate = checkpoint_untrained_rows(ckpt, ())
    draft.tensors.update(repair_untrained(ckpt, rows, set(untrained) | set(degenerate)))
    names = [vocab.id_to_token(r) if vocab else str(r) for r in rows[:20]]
    draft.change("embeddings.untrained", ckpt.embed_name or "embeddings",
                 f"{len(rows)} untrained rows set to the mean of the trained rows", "zero rows",
                 {"rows": rows, "tokens": names})


PASS_TWO: list[Fix] = [fix_untrained]


# ----------------------------------------------------------------------------- writing


def repair(path: str | Path, out: str | Path, *, chatml: bool = False, template: str | None = None,
           corpus: str | Path | None = None, dry_run: bool = False, force: bool = False,
           all_untrained: bool = False, dataset: str | Path | None = None,
           out_of_range: str = "auto") -> FixReport:
    """Repair the checkpoint at `path` into `out` (never touching `path`); returns what was done."""
    src = Checkpoint(path)
    out = Path(out)
    _check_output(out, force, [src.path, corpus, dataset])
    if not src.has_tokenizer:
        raise CheckpointError(f"{src.path}: no tokenizer files (tokenizer.json or tokenizer.model): fix repairs a "
                              "checkpoint against its tokenizer; copy the base model's tokenizer files in first")
    if dataset is not None:
        _check_dataset(Path(dataset))
    opts = Options(chatml=chatml, template=template, corpus=read_corpus(corpus), all_untrained=all_untrained,
                   dataset=str(dataset) if dataset else None, out_of_range=out_of_range)
    assert out_of_range in ("auto", "grow", "drop"), out_of_range
    before = diagnose(src.path, corpus=corpus)
    report = FixReport(model=str(src.path), out=str(out), before=before)
    draft = _plan(src, before.findings, opts, PASS_ONE)
    if dry_run:
        report.changes, report.unfixable = draft.changes, draft.unfixable
        report.changes += _plan(src, before.findings, opts, PASS_TWO).changes
        return report
    with terminate_as_interrupt(), _staging(out, src.path) as (stage_one, stage_two):
        _write(draft, stage_one)
        middle = Checkpoint(stage_one)
        mid_report = diagnose(stage_one, corpus=corpus)
        second = _plan(middle, mid_report.findings, opts, PASS_TWO)
        _write(second, stage_two)
        report.changes = draft.changes + second.changes
        report.unfixable = draft.unfixable + second.unfixable
        report.after = diagnose(stage_two, corpus=corpus)
        still = still_failing(report.claimed, [before, mid_report], report.after)
        if still:
            raise FixError(f"fix claimed to repair {', '.join(still)} but the output still fails "
                           f"{'it' if len(still) == 1 else 'them'}; nothing was written", report)
        # a path that is not UTF-8 goes into the JSON as an escape (\udcff), not refused
        (stage_two / REPORT_NAME).write_text(report.to_json(), encoding="utf-8", errors="backslashreplace")
        _replace(stage_two, out)
    report.written = True
    return report


SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}


def still_failing(claimed: set[str], earlier: list[Report], after: Report) -> list[str]:
    """Claimed checks the output still reports at their earlier severity or worse (or as errors).

    A lower severity is progress that counts: e.g. untrained rows nobody uses stay, by design,
    as a warning after the rows that matter were repaired.
    """
    def worst(report: Report, check: str) -> int:
        return max((SEVERITY_RANK[f.severity] for f in report.by_check(check)), default=-1)

    out = []
    for check in sorted(claimed):
        now = worst(after, check)
        was = max(worst(r, check) for r in earlier)
        if now >= 0 and (now >= was or now == SEVERITY_RANK["error"]):
            out.append(check)
    return out


def _plan(ckpt: Checkpoint, findings: list[Finding], opts: Options, fixes: list[Fix]) -> Draft:
    draft = Draft(ckpt)
    for fix in fixes:
        fix(draft, findings, opts)
    grow_rows(draft)
    return draft


def _check_dataset(path: Path) -> None:
    """A --dataset that cannot be read, or holds no record, is bad input even when no row needs it."""
    from healer.templates.formats import load_examples

    if not load_examples(path):
        raise CheckpointError(f"{path}: the dataset holds no records")


def _check_output(out: Path, force: bool, inputs: list[str | Path | None]) -> None:
    refuse_overlap(out, inputs)
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: parent directory of the output does not exist")
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f"{out.parent}: not writable")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputError(f"{out}: exists and is not empty (use --force to replace it)")


@contextmanager
def _staging(out: Path, src: Path) -> Iterator[tuple[Path, Path]]:
    """Two temp dirs beside `out`, removed on any exit, SIGTERM included; an OSError inside becomes a
    CheckpointError (reading a file of `src`) or an OutputError (writing: a full or read-only disk).

    The dir is named after this process (`.OUT.healer-PID`): what a SIGKILLed earlier run left
    there is removed here once its process is gone.
    """
    for tag in (STAGING_TAG, f"{STAGING_TAG}-old"):
        remove_stale_staging(out, tag)
    stage = staging_path(out, STAGING_TAG)
    remove(stage)
    stage.mkdir()
    try:
        one, two = stage / "pass1", stage / "pass2"
        one.mkdir()
        two.mkdir()
        yield one, two
    except OSError as e:
        name = os.fsdecode(e.filename) if e.filename is not None else ""
        # abspath, not resolve: a dangling symlink in the input resolves to somewhere else
        if name and any(Path(os.path.abspath(name)).is_relative_to(d) for d in (Path(os.path.abspath(src)),
                                                                               src.resolve())):
            raise CheckpointError(f"{name}: cannot read ({e.strerror or e})") from e
        raise OutputError(f"cannot write {out}: {e.strerror or e} (nothing was written)") from e
    finally:
        remove(stage)


def _replace(staged: Path, out: Path) -> None:
    """Rename `staged` to `out`; an existing `out` (--force) is moved aside first and removed after."""
    if out.exists() or out.is_symlink():
        old = staging_path(out, f"{STAGING_TAG}-old")
        remove(old)
        os.replace(out, old)
        os.replace(staged, out)
        remove(old)
    else:
        os.replace(staged, out)


def _write(draft: Draft, dest: Path) -> None:
    """Write the draft: replaced files, untouched files copied, weights linked or rewritten."""
    from healer.embeddings.shards import link_or_copy, write_weights

    src = draft.ckpt.path
    weights = {p.name for p in set(draft.ckpt.weight_map.values())} | set(WEIGHT_INDEXES)
    for p in sorted(src.iterdir()):
        if p.is_dir() or p.name in weights or p.name == REPORT_NAME or p.name in draft.files:
            continue
        shutil.copy2(p, dest / p.name)
    for name, data in draft.files.items():
        if data == b"":  # an emptied file means: leave it out of the output
            continue
        (dest / name).write_bytes(data)
    if draft.ckpt.has_weights:
        if all(p.suffix == ".safetensors" for p in draft.ckpt.weight_map.values()):
            write_weights(draft.ckpt, draft.tensors, dest)
        else:
            assert not draft.tensors, "tensor edits need safetensors weights"
            for name in weights:
                if (src / name).exists():
                    link_or_copy(src / name, dest / name)


__all__ = ["Change", "FixError", "FixReport", "repair"]
