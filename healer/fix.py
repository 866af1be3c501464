"""Plan repairs from doctor's findings and write a repaired checkpoint next to the input.

Flow: diagnose the input, let each fix edit a Draft (tokenizer and config files in memory,
changed tensors), write the draft into a temp dir beside OUT (unchanged weight shards
hard-linked), diagnose the result, and rename the temp dir to OUT only if every check a fix
claimed is gone. The input directory is never written to.

The fixes live beside their checks (`healer/<area>/fixes.py`, each a list FIXES of `Fix` entries).
Their order is computed here from what each declares it needs (`order`). Embedding rows are
repaired in a second phase over the first phase's output, because which rows matter (special and
template tokens) depends on the repaired tokenizer.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from healer.doctor import diagnose, read_corpus
from healer.draft import Draft, Fix, Options
from healer.embeddings import fixes as embedding_fixes
from healer.errors import CheckpointError, HealerError, OutputError
from healer.model_dir import ModelDir
from healer.outputs import (
    refuse_overlap,
    remove,
    remove_stale_staging,
    replace_dir,
    staging_path,
    terminate_as_interrupt,
)
from healer.report import REPORT_NAME, Change, Finding, FixReport, Report
from healer.templates import fixes as template_fixes
from healer.tokenizers import fixes as tokenizer_fixes

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
STAGING_TAG = "healer"

# registration order decides only among fixes free to run (no need between them): templates, then
# tokenizers, then embeddings keeps the order fix has always listed its changes in
FIXES: tuple[Fix, ...] = (*template_fixes.FIXES, *tokenizer_fixes.FIXES, *embedding_fixes.FIXES)


def order(fixes: Sequence[Fix]) -> list[Fix]:
    """The run order: by phase, and within a phase each fix after every fix it needs.

    Among the fixes whose needs have all run, the first registered runs next, so the order (and
    the order of the report's changes) is stable. Raises ValueError on a duplicate name, a need
    that names no registered fix or one of a later phase, and on needs that form a cycle.
    """
    by_name: dict[str, Fix] = {}
    for fix in fixes:
        if fix.name in by_name:
            raise ValueError(f"two fixes are named {fix.name!r}")
        by_name[fix.name] = fix
    for fix in fixes:
        for need in fix.needs:
            if need not in by_name:
                raise ValueError(f"fix {fix.name!r} needs {need!r}, which is not a registered fix")
            if by_name[need].phase > fix.phase:
                raise ValueError(f"fix {fix.name!r} (phase {fix.phase}) needs {need!r}, which runs later "
                                 f"(phase {by_name[need].phase})")
    pending = sorted(fixes, key=lambda f: f.phase)  # stable: registration order within a phase
    done: list[Fix] = []
    ran: set[str] = set()
    while pending:
        phase = pending[0].phase
        ready = next((f for f in pending if f.phase == phase and ran.issuperset(f.needs)), None)
        if ready is None:
            stuck = [f.name for f in pending if f.phase == phase]
            raise ValueError(f"no fix can run first: their needs form a cycle (or wait on one): {', '.join(stuck)}")
        done.append(ready)
        ran.add(ready.name)
        pending.remove(ready)
    return done


RUN_ORDER: list[Fix] = order(FIXES)  # a broken declaration fails at import, not mid-repair
PHASE_ONE: list[Fix] = [f for f in RUN_ORDER if f.phase == 1]
PHASE_TWO: list[Fix] = [f for f in RUN_ORDER if f.phase == 2]


class FixError(HealerError):
    """The repaired checkpoint still fails a check a fix claimed to repair (exit 1, nothing written)."""

    def __init__(self, message: str, report: FixReport):
        super().__init__(message)
        self.report = report


def repair(path: str | Path, out: str | Path, *, chatml: bool = False, template: str | None = None,
           corpus: str | Path | None = None, dry_run: bool = False, force: bool = False,
           all_untrained: bool = False, dataset: str | Path | None = None,
           out_of_range: str = "auto") -> FixReport:
    """Repair the checkpoint at `path` into `out` (never touching `path`); returns what was done."""
    src = ModelDir(path)
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
    draft = _plan(src, before.findings, opts, PHASE_ONE)
    if dry_run:
        report.changes, report.unfixable = draft.changes, draft.unfixable
        report.changes += _plan(src, before.findings, opts, PHASE_TWO).changes
        return report
    with terminate_as_interrupt(), _staging(out, src.path) as (stage_one, stage_two):
        _write(draft, stage_one)
        middle = ModelDir(stage_one)
        mid_report = diagnose(stage_one, corpus=corpus)
        second = _plan(middle, mid_report.findings, opts, PHASE_TWO)
        _write(second, stage_two)
        report.changes = draft.changes + second.changes
        report.unfixable = draft.unfixable + second.unfixable
        # diagnosed where it is staged; the report names where it will be
        report.after = diagnose(stage_two, corpus=corpus).relocated(str(stage_two), str(out))
        still = still_failing(report.claimed, [before, mid_report], report.after)
        if still:
            why = next(f.message for f in report.after.findings if f.check in still)
            raise FixError(f"fix claimed to repair {', '.join(still)} but the output still fails "
                           f"{'it' if len(still) == 1 else 'them'} ({why}); nothing was written", report)
        # a path that is not UTF-8 goes into the JSON as an escape (\udcff), not refused
        (stage_two / REPORT_NAME).write_text(report.to_json(), encoding="utf-8", errors="backslashreplace")
        replace_dir(stage_two, out, old=staging_path(out, f"{STAGING_TAG}-old"))
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


def _plan(ckpt: ModelDir, findings: list[Finding], opts: Options, fixes: list[Fix]) -> Draft:
    draft = Draft(ckpt)
    for fix in fixes:
        fix.apply(draft, findings, opts)
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
