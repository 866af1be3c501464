"""The run dir of `trainer run`: how to recognise one, what state it is in, and whether a run may use it.

run.json marks a directory as a run dir (kind "trainer-run") and records its status: running
(with the pid), finished or failed. A run into an earlier one needs --resume or --force.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from healer.errors import OutputError
from healer.outputs import process_alive, write_atomic

RUN_MARKER = "run.json"


def is_run_dir(path: Path) -> bool:
    marker = path / RUN_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("kind") == "trainer-run"
    except (json.JSONDecodeError, AttributeError):
        return False


def run_status(path: Path) -> str:
    """What run.json says of the run: running, killed (running, but its process is gone), finished or failed."""
    try:
        record = json.loads((path / RUN_MARKER).read_text(encoding="utf-8"))
        status = str(record.get("status", "finished"))
    except (OSError, ValueError, AttributeError):
        return "unknown"
    if status == "running" and isinstance(record.get("pid"), int) and not process_alive(record["pid"]):
        return "killed"
    return status


def check_out_dir(path: str | Path, *, resume: bool = False, force: bool = False) -> Path:
    """The run dir to use; OutputError if it is a file or a non-empty directory that is not a run dir,
    or an earlier run (finished, failed or killed) that neither `resume` nor `force` lets us touch."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p}: exists and is not a directory")
    if p.is_dir() and any(p.iterdir()):
        if not is_run_dir(p):
            raise OutputError(f"{p}: directory is not empty and is not a trainer run dir; choose another --out")
        if not (resume or force):
            raise OutputError(f"{p}: holds an earlier run ({run_status(p)}); pass --resume {p} to continue it, "
                              f"--force to replace it, or choose another --out")
    return p


def mark_run(out: Path, status: str, **fields: Any) -> None:
    """Record the run's status in run.json, keeping what is there (best effort: the disk may be full)."""
    try:
        record = json.loads((out / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {"kind": "trainer-run"}
    record.update(status=status, **fields)
    try:
        write_atomic(out / RUN_MARKER, json.dumps(record) + "\n")
    except OSError:
        pass  # the run's own error is the one to report
