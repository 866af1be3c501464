"""healer.outputs: the one rule on where a command may write, and the staging names it writes under."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from healer.errors import OutputError
from healer.outputs import refuse_overlap, remove_stale_staging, staging_path

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("out, where", [
    ("model", "is the input"),
    ("model/fixed", "lies inside the input"),
    (".", "contains the input"),
    ("link", "is the input"),
    ("model/../model", "is the input"),
])
def test_an_output_on_around_or_inside_an_input_is_refused(tmp_path, out, where):
    (tmp_path / "model").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "model")
    with pytest.raises(OutputError, match=where):
        refuse_overlap(tmp_path / out, [None, tmp_path / "data.jsonl", tmp_path / "model"])


@pytest.mark.parametrize("out", ["model2", "mode", "fixed", "data.jsonl.out"])
def test_an_output_beside_the_inputs_is_allowed(tmp_path, out):
    (tmp_path / "model").mkdir()
    refuse_overlap(tmp_path / out, [tmp_path / "model", tmp_path / "data.jsonl"])


def test_only_leftovers_of_processes_that_are_gone_are_removed(tmp_path):
    out = tmp_path / "out"
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        dead_dir = tmp_path / f".out.healer-{gone.pid}"
        (dead_dir / "pass1").mkdir(parents=True)
        dead_file = tmp_path / f".out.healer-{gone.pid}.json"
        dead_file.write_text("x")
        live = tmp_path / f".out.healer-{alive.pid}"
        live.mkdir()
        mine = staging_path(out, "healer")
        mine.mkdir()
        others = [tmp_path / ".out2.healer-1", tmp_path / ".out.tmp-1", tmp_path / ".out.healer-notapid"]
        for p in others:
            p.write_text("x")
        assert sorted(remove_stale_staging(out, "healer")) == sorted([dead_dir, dead_file])
        assert live.is_dir() and mine.is_dir() and all(p.exists() for p in others)
    finally:
        alive.kill()
        alive.wait()


TERMINATED = """
import os, signal, sys, time
from pathlib import Path
from healer.outputs import terminate_as_interrupt

marker = Path(sys.argv[1])
with terminate_as_interrupt():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    finally:
        marker.write_text("cleaned up")
print("not reached")
"""


def test_sigterm_runs_the_cleanup_then_ends_the_process_by_sigterm(tmp_path):
    marker = tmp_path / "marker"
    proc = subprocess.run([sys.executable, "-c", TERMINATED, str(marker)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert marker.read_text() == "cleaned up" and "not reached" not in proc.stdout
