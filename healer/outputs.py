"""Where a command may write, and the staging names it writes under first.

One rule for every command (`healer fix`, `trainer run`, `trainer export`): an output that is,
contains, or lies inside one of the command's inputs is refused, --force or not, because
replacing it would remove or overwrite what the command reads. Staging files and dirs beside an
output carry the writer's pid, so a later run can tell a crashed writer's leftovers (pid gone)
from a live one's and remove them.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from healer.errors import OutputError


def _real(path: str | Path) -> Path:
    # resolve() follows symlinks, so `-o link-to-model` counts as the model itself
    return Path(os.path.abspath(path)).resolve()


def refuse_overlap(out: str | Path, inputs: Iterable[str | Path | None], *, flag: str = "-o") -> None:
    """Raise OutputError if `out` is, contains, or lies inside any of `inputs` (None entries are skipped)."""
    o = _real(out)
    for given in inputs:
        if given is None:
            continue
        i = _real(given)
        if o == i:
            where = "is the input"
        elif i in o.parents:
            where = "lies inside the input"
        elif o in i.parents:
            where = "contains the input"
        else:
            continue
        raise OutputError(f"{out}: the output {where} {given}, which would be overwritten; "
                          f"choose another {flag} (--force does not change this)")


def staging_path(out: Path, tag: str) -> Path:
    """`.OUT.TAG-PID` beside `out`: where this process builds `out` before renaming it into place."""
    return out.parent / f".{out.name}.{tag}-{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (this one included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove(path: Path) -> None:
    """Remove a file, link or directory tree; nothing if it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_staging(out: Path, tag: str) -> list[Path]:
    """Remove `.OUT.TAG-PID...` entries beside `out` whose process is gone (a killed earlier run's)."""
    prefix = f".{out.name}.{tag}-"
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    removed = []
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        pid = p.name[len(prefix):].split("-", 1)[0].split(".", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            remove(p)
            removed.append(p)
    return removed


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (raised inside terminate_as_interrupt)."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM raises Terminated (a KeyboardInterrupt), so `finally` blocks remove staging files as
    Ctrl-C does; the default action would end the process on the spot and leave them. Once they have run,
    the process ends by SIGTERM after all, as its caller expects. Outside the main thread the caller owns
    signal handling and nothing changes."""
    def on_term(signum, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:
        previous = None
    try:
        yield
    except Terminated:
        if previous is None:
            raise
        signal.signal(signal.SIGTERM, previous)
        os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def short_write(e: OSError) -> str:
    """What an OSError says, with numpy's bare short write ('N requested and M written') named as a full disk."""
    if e.errno is None and "requested and" in str(e):
        return f"No space left on device ({e})"
    return e.strerror or str(e)


@contextmanager
def atomic_file(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temp file beside `path` for the body to write; renamed to `path` if the body finishes, removed if not,
    so `path` is never half-written. `suffix` for writers that pick a format by extension."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file through a temp file in the same directory and a rename: never half-written."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def replace_dir(staged: Path, out: Path, old: Path) -> None:
    """Rename the finished directory `staged` to `out`. An existing `out` is first renamed to `old` (a free
    staging name beside it) and removed after, so a reader sees the earlier or the new directory, never a mix."""
    if out.exists() or out.is_symlink():
        remove(old)
        os.replace(out, old)
        os.replace(staged, out)
        remove(old)
    else:
        os.replace(staged, out)
