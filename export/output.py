"""Atomic outputs: write under a temp name beside the destination, rename at the end."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from healer.errors import OutputError
from healer.outputs import (
    refuse_overlap,
    remove_stale_staging,
    replace_dir,
    short_write,
    staging_path,
    terminate_as_interrupt,
)
from healer.outputs import remove as _remove


@contextmanager
def atomic_output(out: Path, force: bool, inputs: Iterable[Path | None] = ()) -> Iterator[Path]:
    """Yield a temp path beside `out`; it becomes `out` only if the body finishes.

    On any failure (including Ctrl-C) the temp path is removed, so no partial output is
    ever left under the final name; an existing `out` is refused unless `force`, and an `out`
    that is, contains or lies inside one of `inputs` always. Temp paths of killed earlier
    runs (their pid gone) are removed first.
    """
    refuse_overlap(out, inputs)
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputError(f"{out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: no such directory to write {out.name} into")
    for tag in ("tmp", "old"):
        remove_stale_staging(out, tag)
    tmp = staging_path(out, "tmp")
    _remove(tmp)
    with terminate_as_interrupt():
        try:
            yield tmp
            replace_dir(tmp, out, old=staging_path(out, "old"))
        except OSError as e:
            _remove(tmp)
            raise OutputError(f"cannot write {out}: {short_write(e)} (nothing was written)") from e
        except BaseException:
            _remove(tmp)
            raise
