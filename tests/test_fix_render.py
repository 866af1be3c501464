"""The fix report's one rendering (used by `healer fix` and `healer demo`): changes, what was not fixed, where it wrote."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

import cli
from healer.example import build_example
from healer.report import REPORT_NAME, Change, Finding, FixReport, Report

MARKUP_DESCRIPTION = "set [bold]x[/] to 1"


def rendered(report: FixReport, **kwargs) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    report.render(console, **kwargs)
    return console.file.getvalue()


def written_report() -> FixReport:
    after = Report("out", [Finding("a.b", "error", "m"), Finding("c.d", "warning", "w"),
                           Finding("e.f", "warning", "w")])
    return FixReport(model="in", out="out-dir", changes=[Change("tokenizer.pad_is_eos", "config.json", "pad = 6"),
                                                         Change("x.y", "t.weight", MARKUP_DESCRIPTION)],
                     unfixable=[Finding("e.f", "warning", "cannot [fix] this")], after=after, written=True)


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in ln.strip("│ ").split("│")] for ln in text.splitlines() if ln.startswith("│")]


def test_render_lists_every_change_with_its_description_verbatim():
    report = written_report()
    assert table_rows(rendered(report)) == [[c.check, c.target, c.description] for c in report.changes]


def test_render_names_unfixed_checks_and_counts_what_the_output_still_reports():
    report = written_report()
    text = rendered(report)
    assert "not fixed e.f: cannot [fix] this" in text
    left = report.after.summary()
    assert f"Wrote out-dir ({left['error']} error(s), {left['warning']} warning(s) left); details in {REPORT_NAME}" in text


def test_dry_run_render_titles_the_plan_and_claims_no_write():
    report = written_report()
    report.written, report.after = False, None
    text = rendered(report, dry_run=True)
    assert text.lstrip().startswith("planned changes")
    assert "--dry-run: nothing written" in text and "Wrote" not in text


def test_render_says_nothing_to_change_for_an_empty_report():
    text = rendered(FixReport(model="in", out="out", after=Report("out"), written=True))
    assert "Nothing to change." in text and "┏" not in text


def test_render_uses_the_callers_title():
    assert rendered(written_report(), title="healer fix: changes").lstrip().startswith("healer fix: changes")


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    return build_example(tmp_path_factory.mktemp("ex") / "example")


def test_cli_dry_run_table_rows_are_the_changes_of_the_json_report(example, tmp_path):
    args = ["fix", str(example), "-o", str(tmp_path / "out"), "--chatml", "--dry-run"]
    as_json = CliRunner().invoke(cli.healer, [*args, "--json"])
    as_table = CliRunner().invoke(cli.healer, args, env={"COLUMNS": "400"})
    assert as_json.exit_code == as_table.exit_code == 0, as_table.output
    changes = json.loads(as_json.output)["changes"]
    assert changes
    assert table_rows(as_table.output) == [[c["check"], c["target"], c["description"]] for c in changes]
    assert "--dry-run: nothing written" in as_table.output
    assert not (tmp_path / "out").exists()
