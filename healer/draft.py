"""What every fix works on: the Draft of the output, the fix Options, and how a fix is registered.

Each area keeps its fixes beside its checks (`healer/tokenizers/fixes.py`, `healer/templates/fixes.py`,
`healer/embeddings/fixes.py`) in a list named FIXES of `Fix` entries; `healer.fix` orders them by
their declared `needs` and runs them. Area modules build on this module, never on `healer.fix`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from healer.model_dir import ModelDir
from healer.report import Change, Finding


@dataclass
class Options:
    chatml: bool = False
    template: str | None = None
    corpus: tuple[str, ...] = ()
    all_untrained: bool = False
    dataset: str | None = None
    out_of_range: str = "auto"  # auto | grow | drop


class Draft:
    """The output being planned: replaced files (bytes) and tensors, over an input ModelDir."""

    def __init__(self, ckpt: ModelDir):
        self.ckpt = ckpt
        self.files: dict[str, bytes] = {}
        self.tensors: dict[str, Any] = {}
        self.changes: list[Change] = []
        self.unfixable: list[Finding] = []
        self.rows_needed = 0  # embedding rows the new tokenizer needs (grown once, by embeddings.grow_rows)
        self.rows_grown = False

    def need_rows(self, n: int) -> None:
        """Record that the tokenizer now holds ids up to `n` - 1; embeddings.grow_rows adds the rows.

        A fix calling this must be among grow_rows' `needs`: the rows are grown once.
        """
        assert not self.rows_grown, "embedding rows already grown: declare this fix in embeddings.grow_rows' needs"
        self.rows_needed = max(self.rows_needed, n)

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


Apply = Callable[[Draft, list[Finding], Options], None]
"""A fix's work: read the findings and options, edit the draft (files, tensors) and record its changes."""


@dataclass(frozen=True)
class Fix:
    """One fix, registered as data.

    name:   a stable id other fixes name in `needs` (`tokenizer.out_of_range`, ...).
    checks: the checks it repairs (the ids its changes are recorded under).
    needs:  fixes that must run before it in the same draft: ones whose edits it reads (token ids,
            the template, tokenizer.json) or whose writes to the same file or key it must follow.
            `healer.fix` orders the fixes by these, and refuses an unknown name or a cycle.
    phase:  1 plans tokenizer, template and config files; 2 plans embedding rows on the written,
            re-diagnosed output of phase 1 (which rows matter depends on the repaired tokenizer).
    """

    name: str
    apply: Apply
    checks: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    phase: Literal[1, 2] = 1
