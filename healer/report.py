"""Findings and reports: what doctor found and what fix changed, for people (rich tables) and pipelines (JSON).

Also what a check is (`Check`, with the `Context` checks share) and the fix command a finding
names, so every area's checks build on this module alone (doctor runs them; nothing imports back).
A fix records each edit as a `Change`; `FixReport` is what `healer.fix.repair` returns.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from healer.model_dir import ModelDir

REPORT_NAME = "healer_report.json"  # the FixReport fix writes into its output

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")


@dataclass
class Context:
    """Options that checks share: extra corpus lines, whether to stream all weights."""

    corpus: tuple[str, ...] = ()
    check_weights: bool = False


def fix_command(ckpt: ModelDir, extra: str = "") -> str:
    """The command that repairs `ckpt`, writing beside it (the input is never modified)."""
    out = ckpt.path.parent / f"{ckpt.path.name}-fixed"
    return f"healer fix {ckpt.path} -o {out}{extra}"


@dataclass
class Finding:
    """One problem found by one check. `check` is a stable id such as `tokenizer.fast_mismatch`."""

    check: str
    severity: Severity
    message: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.severity in SEVERITIES, self.severity

    @property
    def area(self) -> str:
        return self.check.split(".", 1)[0]


Check = Callable[["ModelDir", Context], list[Finding]]
"""A check: a small function over a model dir with a stable id per finding (`tokenizer.fast_mismatch`, ...)."""


@dataclass
class Report:
    """All findings for one model directory."""

    model: str
    findings: list[Finding] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}

    @property
    def has_errors(self) -> bool:
        return any(f.severity == "error" for f in self.findings)

    def checks(self) -> set[str]:
        return {f.check for f in self.findings}

    def relocated(self, old: str, new: str) -> Report:
        """This report with the directory `old` named `new` in its paths, messages, fix commands and details:
        for a directory diagnosed in its staging place before it was renamed into place (healer fix)."""
        def move(value: Any) -> Any:
            if isinstance(value, str):
                return value.replace(old, new)
            if isinstance(value, list):
                return [move(v) for v in value]
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            return value

        return Report(model=move(self.model), findings=[
            dataclasses.replace(f, message=move(f.message), fix=move(f.fix), details=move(f.details))
            for f in self.findings])

    def by_check(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "findings": [asdict(f) for f in self.findings],
            "summary": self.summary(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=_jsonable)

    def render(self, console) -> None:
        """Print a table grouped by area (tokenizer, template, embeddings, ...), errors first."""
        from rich.markup import escape
        from rich.table import Table

        styles = {"error": "bold red", "warning": "yellow", "info": "cyan"}
        if not self.findings:
            console.print(f"[green]No problems found[/green] in {escape(self.model)}")
            return
        order = {s: i for i, s in enumerate(SEVERITIES)}
        findings = sorted(self.findings, key=lambda f: (f.area, order[f.severity], f.check))
        table = Table(title=f"healer doctor: {escape(self.model)}", expand=True, show_lines=True)
        table.add_column("severity", no_wrap=True)
        table.add_column("check", no_wrap=True)
        table.add_column("finding and fix", ratio=1, overflow="fold")
        last_area = None
        for f in findings:
            if f.area != last_area:
                table.add_row(f"[bold]{f.area}[/]", "", "", end_section=False)
                last_area = f.area
            text = escape(f.message) + (f"\n[dim]fix:[/] [bold]{escape(f.fix)}[/]" if f.fix else "")
            table.add_row(f"[{styles[f.severity]}]{f.severity}[/]", f.check, text)
        console.print(table)
        s = self.summary()
        console.print(f"{s['error']} error(s), {s['warning']} warning(s), {s['info']} info")


@dataclass
class Change:
    """One edit of the output: which check it answers, what was there, what is there now."""

    check: str
    target: str
    description: str
    before: Any = None
    after: Any = None


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


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
