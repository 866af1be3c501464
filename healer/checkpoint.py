"""Deprecated name of healer.model_dir: a Hugging Face model directory is a `ModelDir` now ("checkpoint" names
only a trainer run's resumable state). This module and the name `Checkpoint` stay for one release."""

from __future__ import annotations

import warnings
from typing import Any

from healer import model_dir as _model_dir


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # the import system's own lookups (__path__, ...)
        raise AttributeError(name)
    warnings.warn("healer.checkpoint is deprecated: import from healer.model_dir (Checkpoint is now ModelDir)",
                  DeprecationWarning, stacklevel=2)
    return _model_dir.ModelDir if name == "Checkpoint" else getattr(_model_dir, name)
