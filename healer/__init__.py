"""healer: diagnose and repair Hugging Face checkpoints before fine-tuning."""

from healer.checkpoint import Checkpoint
from healer.doctor import diagnose
from healer.errors import CheckpointError, HealerError, OutputError
from healer.report import Finding, Report

__all__ = ["Checkpoint", "CheckpointError", "Finding", "HealerError", "OutputError", "Report", "diagnose"]
