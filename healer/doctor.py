"""Run every check over a Checkpoint and collect a Report.

A check is a function `(Checkpoint, Context) -> list[Finding]`. Each area keeps its checks
in its own package (`healer/tokenizers/checks.py`, `healer/templates/checks.py`,
`healer/embeddings/checks.py`) in a list named CHECKS; config checks live here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from healer.checkpoint import Checkpoint
from healer.errors import CheckpointError
from healer.report import Finding, Report


@dataclass
class Context:
    """Options that checks share: extra corpus lines, whether to stream all weights."""

    corpus: tuple[str, ...] = ()
    check_weights: bool = False


Check = Callable[[Checkpoint, Context], list[Finding]]


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
    ckpt = Checkpoint(path)
    ckpt.config  # unreadable config: nothing else can be diagnosed
    ctx = Context(corpus=read_corpus(corpus), check_weights=check_weights)
    report = Report(model=str(path))
    for fn in all_checks():
        report.findings.extend(fn(ckpt, ctx))
    return report


CONFIG_CHECKS: list[Check] = []
