"""trainer: a compact QLoRA trainer with one decoder for six model families.

Library entry: `trainer.train(TrainConfig(model=..., data=..., out=...)) -> RunResult`; to continue an
interrupted run, `trainer.train(trainer.resume_config(run_dir), resume=True)`. Under torchrun the same
call trains data-parallel.
Importing the package stays light (no torch) so the CLI starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.config import ConfigError, TrainConfig, resolve_config

PREVIEW_REQUIRED = ("model", "data")  # a preview writes nothing: no --out

if TYPE_CHECKING:
    from trainer.loop import RunResult


def train(config: TrainConfig, *, console=None, resume: bool = False) -> RunResult:
    """Fine-tune config.model on config.data with LoRA / QLoRA; write the run dir config.out
    (resume=True: continue it from its latest checkpoint)."""
    from trainer.loop import train as run

    return run(config, console=console, resume=resume)


def preview(config: TrainConfig, n: int):
    """The first `n` examples exactly as `train(config)` would train them (ids, labels -100 where no loss
    is taken), and the tokenizer; loads no weights and writes nothing."""
    from healer.model_dir import ModelDir
    from trainer.config import check_template_file, validate
    from trainer.data import prepare_model_data

    cfg = validate(config, required=PREVIEW_REQUIRED)
    check_template_file(cfg.template)  # the checks `train` makes before it loads anything
    ckpt = ModelDir(cfg.model)
    _, data = prepare_model_data(ckpt, cfg.data, cfg.template, max_seq_len=cfg.max_seq_len,
                                 train_on_inputs=cfg.train_on_inputs, limit=n)
    return data.examples, ckpt.hf_tokenizer()


def resume_config(run_dir, **overrides) -> TrainConfig:
    """The saved config of the run at run_dir, for `train(..., resume=True)`; ResumeError if not a run."""
    from trainer.resume import resume_config as saved

    return saved(run_dir, **overrides)


def __getattr__(name: str):
    if name in ("RunResult", "TrainingDiverged", "ModelCheckError"):
        import trainer.loop

        return getattr(trainer.loop, name)
    if name == "ResumeError":
        import trainer.resume

        return trainer.resume.ResumeError
    raise AttributeError(name)


__all__ = ["ConfigError", "ModelCheckError", "ResumeError", "RunResult", "TrainConfig", "TrainingDiverged",
           "preview", "resolve_config", "resume_config", "train"]
