"""healer: diagnose and repair Hugging Face checkpoints before fine-tuning.

Library entry: `healer.diagnose(model_dir) -> Report`; `healer.repair(model_dir, out, ...) -> FixReport`
writes the repaired copy; `healer.ModelDir(path)` is the read-only view of a model directory both use.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from healer.doctor import diagnose
from healer.errors import CheckpointError, HealerError, OutputError
from healer.model_dir import ModelDir
from healer.report import Finding, FixReport, Report

if TYPE_CHECKING:
    from healer.fix import repair


def __getattr__(name: str) -> Any:
    if name == "repair":  # imported on first use: it loads every area's fixes
        from healer.fix import repair

        return repair
    if name == "Checkpoint":
        warnings.warn("healer.Checkpoint is deprecated: it is healer.ModelDir", DeprecationWarning, stacklevel=2)
        return ModelDir
    raise AttributeError(f"module 'healer' has no attribute {name!r}")


__all__ = ["CheckpointError", "Finding", "FixReport", "HealerError", "ModelDir", "OutputError", "Report", "diagnose",
           "repair"]
