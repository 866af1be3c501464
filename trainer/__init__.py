"""trainer: a compact QLoRA trainer with one decoder for six model families.

Library entry: `trainer.train(TrainConfig(model=..., data=..., out=...)) -> RunResult`.
Importing the package stays light (no torch) so the CLI starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.config import ConfigError, TrainConfig, resolve_config

if TYPE_CHECKING:
    from trainer.loop import RunResult


def train(config: TrainConfig, *, console=None) -> RunResult:
    """Fine-tune config.model on config.data with LoRA / QLoRA; write the run dir config.out."""
    from trainer.loop import train as run

    return run(config, console=console)


def __getattr__(name: str):
    if name in ("RunResult", "TrainingDiverged", "ModelCheckError"):
        import trainer.loop

        return getattr(trainer.loop, name)
    raise AttributeError(name)


__all__ = ["ConfigError", "ModelCheckError", "RunResult", "TrainConfig", "TrainingDiverged", "resolve_config",
           "train"]
