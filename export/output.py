"""Atomic outputs: write under a temp name beside the destination, rename at the end."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from healer.errors import OutputError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextmanager
def atomic_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temp path beside `out`; it becomes `out` only if the body finishes.

    On any failure (including Ctrl-C) the temp path is removed, so no partial output is
    ever left under the final name; an existing `out` is refused unless `force`.
    """
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputError(f"{out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: no such directory to write {out.name} into")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
    except OSError as e:
        _remove(tmp)
        raise OutputError(f"cannot write {out}: {e.strerror or e} (nothing was written)") from e
    except BaseException:
        _remove(tmp)
        raise
