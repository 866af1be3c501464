"""Repair a checkpoint's embeddings: untrained rows and new rows get the unbiased trained mean.

Both functions read only the input embedding and (when separate) the lm_head, and return
the replaced tensors by name, in the checkpoint's dtype, ready for `write_weights`. The
lm_head mean is computed from the lm_head itself; a tied head is computed once and, when a
copy is also stored under lm_head's name, written there too so both stay identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from healer.embeddings.rows import (
    EPS,
    Matrix,
    assign_trained_mean,
    row_chunks,
    stored_matrix,
    trained_mean,
    untrained_rows,
)
from healer.embeddings.usage import (
    TokenUse,
    Vocab,
    describe,
    load_vocab,
    protected_ids,
    select_rows,
    token_use,
)
from healer.errors import CheckpointError
from healer.model_dir import ModelDir


@dataclass(frozen=True)
class EmbeddingNames:
    """Tensor names of the input embedding and the output head as the checkpoint stores them."""

    embed: str
    lm_head: str | None  # a separately trained head (untied), read and repaired on its own
    tied_copy: str | None  # an lm_head stored although tied: kept equal to the embedding

    @classmethod
    def of(cls, ckpt: ModelDir) -> EmbeddingNames:
        embed = ckpt.embed_name
        if embed is None:
            raise CheckpointError(f"{ckpt.path}: no input embedding tensor (looked for model.embed_tokens.weight, ...)")
        head = ckpt.lm_head_name
        if head is not None and not ckpt.tie_word_embeddings:
            return cls(embed, head, None)
        return cls(embed, None, head)


def _load(ckpt: ModelDir, name: str) -> torch.Tensor:
    m = stored_matrix(ckpt, name)
    # a private, writable copy: repairs must never write through to the input's pages
    return m.load() if not isinstance(m, torch.Tensor) else m.clone()


def checkpoint_untrained_rows(ckpt: ModelDir, protected_ids: Iterable[int] = (), eps: float = EPS,
                              absmax: torch.Tensor | None = None) -> dict[int, str]:
    """untrained_rows over the checkpoint's embedding and separate lm_head, streamed from disk."""
    names = EmbeddingNames.of(ckpt)
    head: Matrix | None = stored_matrix(ckpt, names.lm_head) if names.lm_head else None
    return untrained_rows(stored_matrix(ckpt, names.embed), head, eps=eps, protected_ids=protected_ids,
                          absmax=absmax)


def repair_untrained(ckpt: ModelDir, rows: Iterable[int], untrained: Mapping[int, str] | Iterable[int],
                     ) -> dict[str, torch.Tensor]:
    """New embedding (and lm_head) tensors whose `rows` hold the mean of the trained rows.

    `untrained` is every untrained row (from checkpoint_untrained_rows): all of them are left
    out of the mean, whichever subset `rows` repairs. Returns {} when `rows` is empty.
    """
    skip = {int(r) for r in untrained}
    fix = sorted({int(r) for r in rows})
    assert set(fix) <= skip, f"rows to repair that are not untrained: {sorted(set(fix) - skip)[:10]}"
    if not fix:
        return {}
    names = EmbeddingNames.of(ckpt)
    out = {names.embed: assign_trained_mean(_load(ckpt, names.embed), fix, skip)}
    if names.lm_head is not None:
        out[names.lm_head] = assign_trained_mean(_load(ckpt, names.lm_head), fix, skip)
    elif names.tied_copy is not None:
        out[names.tied_copy] = out[names.embed]
    return out


def grow_embeddings(ckpt: ModelDir, n_new: int, untrained: Mapping[int, str] | Iterable[int] | None = None,
                    protected_ids: Iterable[int] = ()) -> dict[str, torch.Tensor]:
    """Embedding (and lm_head) tensors with `n_new` rows appended, each the mean of the trained rows.

    `untrained` defaults to checkpoint_untrained_rows(ckpt, protected_ids). The caller updates
    config.vocab_size (and the tokenizer) to match.
    """
    assert n_new > 0, n_new
    skip = set(checkpoint_untrained_rows(ckpt, protected_ids) if untrained is None else untrained)
    names = EmbeddingNames.of(ckpt)

    def grown(name: str) -> torch.Tensor:
        m = stored_matrix(ckpt, name)
        n = m.shape[0]
        out = torch.empty((n + n_new, m.shape[1]), dtype=m.dtype)
        for start, chunk in row_chunks(m):  # straight into the grown tensor: no second full copy
            out[start:start + len(chunk)] = chunk
        out[n:] = trained_mean(out[:n], skip).to(m.dtype)
        return out

    out = {names.embed: grown(names.embed)}
    if names.lm_head is not None:
        out[names.lm_head] = grown(names.lm_head)
    elif names.tied_copy is not None:
        out[names.tied_copy] = out[names.embed]
    return out


@dataclass
class RepairPlan:
    """What `healer fix` repairs for embeddings.untrained, and why (see healer.embeddings.usage)."""

    untrained: dict[int, str]  # every untrained row -> detection rule
    rows: list[int]  # the rows to repair
    use: TokenUse
    vocab: Vocab | None

    def updates(self, ckpt: ModelDir) -> dict[str, torch.Tensor]:
        """The replaced tensors, for write_weights."""
        return repair_untrained(ckpt, self.rows, self.untrained)

    def summary(self, top: int = 20) -> dict[str, Any]:
        """JSON-able record for healer_report.json: repaired tokens with reasons, what was left, dataset counts."""
        repaired = [{**d, "rule": self.untrained[d["id"]], "used_by": self.use.reasons(d["id"])}
                    for d in describe(self.rows, self.vocab)]
        seen = sorted((r for r in self.untrained if self.use.dataset[r]), key=lambda r: -self.use.dataset[r])
        return {
            "untrained_count": len(self.untrained),
            "repaired_count": len(self.rows),
            "left_untrained_count": len(self.untrained) - len(self.rows),
            "repaired": repaired,
            "dataset_top": [{**d, "count": self.use.dataset[d["id"]]} for d in describe(seen[:top], self.vocab)],
            "value": "mean of the trained rows (float32, cast to the checkpoint dtype), embed and lm_head each",
        }


def plan_repair(ckpt: ModelDir, dataset: str | Path | None = None, all_untrained: bool = False) -> RepairPlan:
    """Find the untrained rows and choose those to repair: special, template and dataset tokens, or all."""
    vocab = load_vocab(ckpt) if ckpt.has_tokenizer else None
    untrained = checkpoint_untrained_rows(ckpt, protected_ids(ckpt, vocab))
    use = token_use(ckpt, vocab, dataset=dataset)
    return RepairPlan(untrained, select_rows(untrained, use, all_untrained), use, vocab)
