"""Repair a checkpoint's embeddings: untrained rows and new rows get the unbiased trained mean.

Both functions read only the input embedding and (when separate) the lm_head, and return
the replaced tensors by name, in the checkpoint's dtype, ready for `write_weights`. The
lm_head mean is computed from the lm_head itself; a tied head is computed once and, when a
copy is also stored under lm_head's name, written there too so both stay identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from healer.checkpoint import Checkpoint
from healer.embeddings.rows import (
    EPS,
    Matrix,
    assign_trained_mean,
    row_chunks,
    stored_matrix,
    trained_mean,
    untrained_rows,
)
from healer.errors import CheckpointError


@dataclass(frozen=True)
class EmbeddingNames:
    """Tensor names of the input embedding and the output head as the checkpoint stores them."""

    embed: str
    lm_head: str | None  # a separately trained head (untied), read and repaired on its own
    tied_copy: str | None  # an lm_head stored although tied: kept equal to the embedding

    @classmethod
    def of(cls, ckpt: Checkpoint) -> EmbeddingNames:
        embed = ckpt.embed_name
        if embed is None:
            raise CheckpointError(f"{ckpt.path}: no input embedding tensor (looked for model.embed_tokens.weight, ...)")
        head = ckpt.lm_head_name
        if head is not None and not ckpt.tie_word_embeddings:
            return cls(embed, head, None)
        return cls(embed, None, head)


def _load(ckpt: Checkpoint, name: str) -> torch.Tensor:
    m = stored_matrix(ckpt, name)
    # a private, writable copy: repairs must never write through to the input's pages
    return m.load() if not isinstance(m, torch.Tensor) else m.clone()


def checkpoint_untrained_rows(ckpt: Checkpoint, protected_ids: Iterable[int] = (), eps: float = EPS,
                              absmax: torch.Tensor | None = None) -> dict[int, str]:
    """untrained_rows over the checkpoint's embedding and separate lm_head, streamed from disk."""
    names = EmbeddingNames.of(ckpt)
    head: Matrix | None = stored_matrix(ckpt, names.lm_head) if names.lm_head else None
    return untrained_rows(stored_matrix(ckpt, names.embed), head, eps=eps, protected_ids=protected_ids,
                          absmax=absmax)


def repair_untrained(ckpt: Checkpoint, rows: Iterable[int], untrained: Mapping[int, str] | Iterable[int],
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


def grow_embeddings(ckpt: Checkpoint, n_new: int, untrained: Mapping[int, str] | Iterable[int] | None = None,
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
