"""Doctor checks on embeddings and weights: untrained rows (stop tokens among them), NaN/Inf values.

Only the input embedding and lm_head are read (row chunks through plain file reads), once
per checkpoint: both embedding checks share one scan. `weights.nonfinite` streams every
tensor, one chunk at a time, and runs only under --check-weights.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any

import torch

from healer.embeddings.repair import EmbeddingNames, checkpoint_untrained_rows
from healer.embeddings.rows import EPS, StoredMatrix, row_absmax, row_chunks, stored_matrix
from healer.embeddings.usage import Vocab, describe, load_vocab, protected_ids, special_token_ids, token_use
from healer.errors import CheckpointError
from healer.model_dir import ModelDir
from healer.report import Check, Context, Finding

SHOWN = 20
_absmax_cache: weakref.WeakKeyDictionary[ModelDir, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def _absmax(ckpt: ModelDir, name: str) -> torch.Tensor:
    cache = _absmax_cache.setdefault(ckpt, {})
    if name not in cache:
        cache[name] = row_absmax(stored_matrix(ckpt, name))
    return cache[name]


def _vocab(ckpt: ModelDir) -> Vocab | None:
    try:
        return load_vocab(ckpt)
    except CheckpointError:
        return None  # the tokenizer checks report unreadable tokenizer files


def _fix_command(ckpt: ModelDir, *flags: str) -> str:
    return " ".join([f"healer fix {ckpt.path} -o OUT", *flags])


def check_untrained(ckpt: ModelDir, ctx: Context) -> list[Finding]:
    """Embedding rows within 1e-16 of zero (confirmed on a separate lm_head) that were never trained."""
    if not ckpt.has_weights or ckpt.embed_name is None:
        return []
    names = EmbeddingNames.of(ckpt)
    absmax = _absmax(ckpt, names.embed)
    if not checkpoint_untrained_rows(ckpt, absmax=absmax):
        return []  # healthy: no need to load the tokenizer for protected ids
    vocab = _vocab(ckpt)
    protected = protected_ids(ckpt, vocab)
    untrained = checkpoint_untrained_rows(ckpt, protected, absmax=absmax)
    if vocab is not None:
        # Rows no token id maps to (Qwen3 pads 151,669 tokens to 151,936 rows) are not tokens at all:
        # no data can reach them; config.vocab_mismatch reports the padding.
        untrained = {r: why for r, why in untrained.items() if vocab.id_to_token(r) is not None}
    if not untrained:
        return []
    use = token_use(ckpt, vocab)
    rows = list(untrained)
    special = [r for r in rows if r in use.special]
    template = [r for r in rows if r in use.template]
    used = sorted(set(special) | set(template))
    confirm = ", confirmed on lm_head" if names.lm_head else ""
    details: dict[str, Any] = {
        "count": len(rows),
        "rules": dict(Counter(untrained.values())),
        "first": [{**d, "rule": untrained[d["id"]], "used_by": use.reasons(d["id"])}
                  for d in describe(rows[:SHOWN], vocab)],
        "special": describe(special, vocab),
        "template": describe(template, vocab),
        "unused_count": len(rows) - len(used),
        "protected_zero": describe([i for i in sorted(protected) if i < len(absmax) and absmax[i] <= EPS], vocab),
    }
    if used:
        shown = ", ".join(f"{d['token']!s} ({d['id']})" for d in describe(used[:5], vocab))
        more = f" and {len(used) - 5} more" if len(used) > 5 else ""
        return [Finding(
            "embeddings.untrained", "error",
            f"{len(rows)} embedding rows are untrained (all values within {EPS:g} of 0{confirm}); "
            f"{len(used)} belong to special or chat-template tokens: {shown}{more}.",
            fix=_fix_command(ckpt), details=details,
        )]
    return [Finding(
        "embeddings.untrained", "warning",
        f"{len(rows)} embedding rows are untrained (all values within {EPS:g} of 0{confirm}); no special or "
        "chat-template token uses them, but training data containing these tokens would.",
        fix=_fix_command(ckpt, "--all-untrained"), details=details,
    )]


STOP_ROLES = ("eos", "config.eos_token_id", "generation_config.eos_token_id")
END_OF_TURN = "template end of turn"


def stop_token_ids(ckpt: ModelDir, vocab: Vocab | None) -> dict[int, list[str]]:
    """id -> why generation stops at it: eos_token, the config/generation_config eos ids, the template's end of turn."""
    from healer.templates.checks import template_end_of_turn

    out = {i: [r for r in roles if r in STOP_ROLES] for i, roles in special_token_ids(ckpt, vocab).items()}
    out = {i: roles for i, roles in out.items() if roles}
    eot = template_end_of_turn(ckpt) if vocab is not None and ckpt.has_tokenizer else None
    eot_id = vocab.token_to_id(eot) if eot is not None else None
    if eot_id is not None:
        out.setdefault(eot_id, []).append(END_OF_TURN)
    return dict(sorted(out.items()))


def check_untrained_stop_tokens(ckpt: ModelDir, ctx: Context) -> list[Finding]:
    """Tokens generation stops at (eos ids, the template's end of turn) with an untrained embedding or lm_head row.

    embeddings.untrained leaves bos/eos/pad/unk out by design (a zero pad row is normal), so a base model
    whose eos was switched to a token it never trained (Llama 3's <|eot_id|>) is caught here instead.
    """
    if not ckpt.has_weights or ckpt.embed_name is None:
        return []
    names = EmbeddingNames.of(ckpt)
    zero = {name: _absmax(ckpt, name) <= EPS for name in filter(None, (names.embed, names.lm_head))}
    if not any(bool(z.any()) for z in zero.values()):
        return []  # healthy: no need to load the tokenizer or render the template
    vocab = _vocab(ckpt)
    stops = stop_token_ids(ckpt, vocab)
    bad = {i: [name for name, z in zero.items() if i < len(z) and bool(z[i])] for i in stops}
    bad = {i: where for i, where in bad.items() if where}
    if not bad:
        return []
    tokens = [{**d, "stops_as": stops[d["id"]], "untrained_in": bad[d["id"]]} for d in describe(list(bad), vocab)]
    shown = "; ".join(f"{t['token']!s} (id {t['id']}: {', '.join(t['stops_as'])}; zero in {', '.join(t['untrained_in'])})"
                      for t in tokens)
    # healer fix repairs the untrained rows of special and template tokens, but never protected (bos/eos/pad/unk)
    # rows, nor a zero lm_head row whose embedding row is trained
    repairable = checkpoint_untrained_rows(ckpt, protected_ids(ckpt, vocab), absmax=_absmax(ckpt, names.embed))
    if set(bad) <= set(repairable):
        fix = _fix_command(ckpt)
    else:
        modules = "embed_tokens,lm_head" if names.lm_head else "embed_tokens"
        fix = f"train these rows: trainer run --model {ckpt.path} ... --modules-to-save {modules}"
    return [Finding(
        "embeddings.untrained_stop_token", "warning",
        f"{len(bad)} token(s) that end generation have untrained rows (all values within {EPS:g} of 0): {shown}. "
        "Generation stops only when the model predicts one of them, and an untrained row holds nothing it "
        "learned about that token.",
        fix=fix, details={"tokens": tokens},
    )]


def check_embeddings_nonfinite(ckpt: ModelDir, ctx: Context) -> list[Finding]:
    """NaN or Inf anywhere in the input embedding or lm_head."""
    if not ckpt.has_weights or ckpt.embed_name is None:
        return []
    vocab = None
    bad: dict[str, Any] = {}
    for name in filter(None, (ckpt.embed_name, ckpt.lm_head_name)):
        absmax = _absmax(ckpt, name)
        nan = torch.nonzero(torch.isnan(absmax)).reshape(-1).tolist()
        inf = torch.nonzero(torch.isinf(absmax)).reshape(-1).tolist()
        if nan or inf:
            vocab = vocab or _vocab(ckpt)
            bad[name] = {"rows_with_nan": len(nan), "rows_with_inf": len(inf),
                         "first": describe(sorted(nan + inf)[:SHOWN], vocab)}
    if not bad:
        return []
    what = "; ".join(f"{n}: {d['rows_with_nan']} rows with NaN, {d['rows_with_inf']} rows with Inf"
                     for n, d in bad.items())
    return [Finding("embeddings.nonfinite", "error", f"Non-finite values in the embeddings ({what}).",
                    details=bad)]


def _nonfinite_count(ckpt: ModelDir, name: str) -> int:
    path = ckpt.weight_map[name]
    if path.suffix == ".safetensors":
        m: StoredMatrix | torch.Tensor = StoredMatrix(path, name, any_shape=True)
    else:
        m = ckpt.tensor(name)
        m = m.reshape(m.shape[0] if m.dim() else 1, -1)
    if not m.dtype.is_floating_point:
        return 0
    return sum(int((~torch.isfinite(chunk)).sum()) for _, chunk in row_chunks(m))


def check_weights_nonfinite(ckpt: ModelDir, ctx: Context) -> list[Finding]:
    """NaN or Inf in any tensor (every tensor streamed; only with --check-weights)."""
    if not ctx.check_weights or not ckpt.has_weights:
        return []
    bad = {name: n for name in ckpt.tensor_names() if (n := _nonfinite_count(ckpt, name))}
    if not bad:
        return []
    first = ", ".join(list(bad)[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return [Finding("weights.nonfinite", "error",
                    f"{len(bad)} tensors hold NaN or Inf values ({sum(bad.values())} values): {first}.",
                    details={"tensors": bad})]


CHECKS: list[Check] = [check_untrained, check_untrained_stop_tokens, check_embeddings_nonfinite,
                       check_weights_nonfinite]
