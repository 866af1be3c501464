"""Run every check over a ModelDir and collect a Report.

A check is a function `(ModelDir, Context) -> list[Finding]`. Each area keeps its checks
in its own package (`healer/tokenizers/checks.py`, `healer/templates/checks.py`,
`healer/embeddings/checks.py`) in a list named CHECKS; config checks live here.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from healer.errors import CheckpointError
from healer.model_dir import ModelDir
from healer.report import Check, Context, Finding, Report, fix_command


def all_checks() -> list[Check]:
    from healer.embeddings import checks as embeddings
    from healer.templates import checks as templates
    from healer.tokenizers import checks as tokenizers

    return [*CONFIG_CHECKS, *tokenizers.CHECKS, *templates.CHECKS, *embeddings.CHECKS]


def read_corpus(path: str | Path | None) -> tuple[str, ...]:
    """Lines of a user corpus file (newlines stripped; empty lines kept out)."""
    if path is None:
        return ()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{p}: corpus file not found") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{p}: corpus is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read corpus ({e.strerror})") from None
    return tuple(line for line in text.split("\n") if line)


def diagnose(path: str | Path, *, corpus: str | Path | None = None, check_weights: bool = False) -> Report:
    """Run every check on the model dir at `path`; raises CheckpointError if it cannot be read at all."""
    with gc_paused():
        ckpt = ModelDir(path)
        _ = ckpt.config, ckpt.generation_config  # unreadable configs: nothing else can be diagnosed
        if ckpt.has_weights:
            ckpt.check_head_tensors()  # a transposed or integer embedding: every check on it would mislead
        ctx = Context(corpus=read_corpus(corpus), check_weights=check_weights)
        report = Report(model=str(path))
        for fn in all_checks():
            report.findings.extend(fn(ckpt, ctx))
    return report


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for the block (restored after, also on errors).

    Parsing a 262K-token tokenizer.json, and transformers building its tokenizer from one, allocate
    millions of lists and dicts; the collector's passes over them were a large part of `healer doctor`'s
    CPU time on Gemma 3 (bench/results/doctor-real-vocab-2cpu.txt). Reference counting still frees
    everything that is not a cycle; the cycles wait for the next collection after the block.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def check_vocab_sizes(ckpt: ModelDir, ctx: Context) -> list[Finding]:
    """config.vocab_size, embedding rows, lm_head rows and tokenizer length must fit together."""
    from healer.tokenizers.inventory import inventory

    sizes: dict[str, int] = {}
    if isinstance(ckpt.config.get("vocab_size"), int):
        sizes["config.vocab_size"] = ckpt.config["vocab_size"]
    if ckpt.embed_name:
        sizes["embedding rows"] = ckpt.tensor_shape(ckpt.embed_name)[0]
    if ckpt.lm_head_name:
        sizes["lm_head rows"] = ckpt.tensor_shape(ckpt.lm_head_name)[0]
    if ckpt.has_tokenizer:
        sizes["tokenizer length"] = inventory(ckpt).max_id + 1
    fix = fix_command(ckpt)
    rows = [v for k, v in sizes.items() if k != "tokenizer length"]
    findings = []
    if len(set(rows)) > 1:
        findings.append(Finding(
            "config.vocab_mismatch", "error",
            "config.vocab_size and the embedding/lm_head rows disagree: " + _sizes(sizes) + ".",
            fix=fix, details=sizes,
        ))
    elif rows and "tokenizer length" in sizes:
        n_rows, n_tok = rows[0], sizes["tokenizer length"]
        if n_tok > n_rows:
            findings.append(Finding(
                "config.vocab_mismatch", "error",
                f"The tokenizer has {n_tok} ids but the model has {n_rows} rows: " + _sizes(sizes) + ".",
                fix=fix, details=sizes,
            ))
        elif n_rows > n_tok:
            findings.append(Finding(
                "config.vocab_mismatch", "info",
                f"The model has {n_rows - n_tok} more rows than the tokenizer has ids (padding, which is normal).",
                details=sizes,
            ))
    return findings


def _sizes(sizes: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sizes.items())


def check_tied(ckpt: ModelDir, ctx: Context) -> list[Finding]:
    """tie_word_embeddings must agree with whether an lm_head tensor is stored."""
    if not ckpt.has_weights or ckpt.embed_name is None:
        return []
    has_head = ckpt.lm_head_name is not None
    tied = ckpt.tie_word_embeddings
    if tied == has_head:
        what = ("says the head is tied but an lm_head tensor is stored (loaders ignore it)" if tied
                else "says the head is separate but no lm_head tensor is stored (loaders initialize it randomly)")
        return [Finding(
            "config.tied_mismatch", "warning", f"config.json tie_word_embeddings={tied} {what}.",
            details={"tie_word_embeddings": tied, "lm_head_present": has_head},
        )]
    return []


CONFIG_CHECKS: list[Check] = [check_vocab_sizes, check_tied]
