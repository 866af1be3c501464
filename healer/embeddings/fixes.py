"""Embedding fixes, beside the checks they answer (`healer/embeddings/checks.py`).

grow_rows adds the rows the tokenizer fixes' new ids need (phase 1, after them); fix_untrained
sets the untrained rows that matter to the trained mean (phase 2: on phase 1's written output,
since which rows matter, special and template tokens, depends on the repaired tokenizer).
"""

from __future__ import annotations

from healer.draft import Draft, Fix, Options
from healer.report import Finding


def grow_rows(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Grow embed_tokens/lm_head to the rows new tokens need (mean-initialized), once, after the fixes adding ids."""
    draft.rows_grown = True
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


FIXES: list[Fix] = [
    # once, after every fix that adds ids (Draft.need_rows refuses one that runs after)
    Fix("embeddings.grow_rows", grow_rows, checks=("tokenizer.id_out_of_range",),
        needs=("tokenizer.dangling_added_tokens", "tokenizer.out_of_range", "template.chatml", "tokenizer.pad")),
    Fix("embeddings.untrained", fix_untrained, checks=("embeddings.untrained",), phase=2),
]
