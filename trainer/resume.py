"""Resumable checkpoints of a run: written atomically under RUN_DIR/checkpoints, read back by --resume.

A checkpoint dir `step-000120` holds the PEFT adapter (for people and tools) and `trainer_state.pt`:
the exact trainable tensors, optimizer and scheduler states, the random states of python, numpy and
torch (CPU and CUDA) of every rank, and the step reached. The step is the data position, since the
step plan is a pure function of the config. Each checkpoint is written into a temp dir beside the
others and renamed into place, so a kill mid-write leaves the previous checkpoints whole; the last
KEEP are kept.

Under data parallelism the ranks draw different dropout masks, so each one's random state is gathered
to rank 0 and written in the same checkpoint (`rng_by_rank`); a resumed rank restores its own, which
needs the same number of ranks. Checkpoints of earlier versions hold one state (`rng`), read as one rank's.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from healer.errors import HealerError
from healer.outputs import replace_dir
from trainer.config import TrainConfig, config_fields, resolve_config
from trainer.distributed import DataParallel
from trainer.run_dir import RUN_MARKER, is_run_dir

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
KEEP = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")
# settings a resumed run may change: they alter neither tensor shapes nor the data plan
RESUME_OVERRIDABLE = ("device", "logging_steps", "save_steps", "max_bad_steps", "gradient_checkpointing",
                      "cuda_graphs", "fp8")


class ResumeError(HealerError):
    """--resume was given a dir that is not a run, or settings that do not fit its checkpoint."""


@dataclass
class Progress:
    """What the loop has done so far: per-step (loss, skipped), skipped steps, the current run of bad steps."""

    step: int = 0
    history: list[tuple[float, bool]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    bad_run_rows: list[list[int]] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp dirs of interrupted writes are not listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_states(dp: DataParallel | None) -> list[dict[str, Any]] | None:
    """Every rank's random states, by rank, on rank 0 (None on the others); every rank must call it."""
    mine = _rng_state()
    return [mine] if dp is None else dp.gather_to_main(mine)


def _saved_rng_states(state: dict[str, Any]) -> list[dict[str, Any]]:
    return state["rng_by_rank"] if "rng_by_rank" in state else [state["rng"]]


def _check_ranks(path: str | Path, saved: int, dp: DataParallel | None) -> None:
    ranks = dp.world_size if dp is not None else 1
    if saved != ranks:
        hint = f"torchrun --nproc-per-node {saved}" if saved > 1 else "one process (no torchrun)"
        raise ResumeError(f"{path}: the checkpoint holds the random states of {saved} process(es) but this run has "
                          f"{ranks}; each rank restores its own (dropout masks), so resume with {hint}")


def check_ranks(path: str | Path, dp: DataParallel | None) -> None:
    """ResumeError unless the checkpoint at path was written by as many ranks as this run has (one when dp is None).

    Reads only the checkpoint's small entries (mmap), so a run can fail on it before loading its model."""
    state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    _check_ranks(path, len(_saved_rng_states(state)), dp)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name, detached and on CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    progress: Progress, *, settings, base_model: str, keep: int = KEEP,
                    dp: DataParallel | None = None) -> Path | None:
    """Write checkpoints/step-NNNNNN atomically and drop all but the newest `keep`; return its path.

    Under data parallelism every rank calls it (their random states are gathered) and rank 0 alone
    writes; the other ranks return None."""
    from trainer.lora import save_adapter

    rng = _rng_states(dp)
    if rng is None:
        return None
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{progress.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp", dir=root))
    try:
        state = {"step": progress.step, "history": progress.history, "skipped": progress.skipped,
                 "bad_run_rows": progress.bad_run_rows, "tokens": progress.tokens, "wall_s": progress.wall_s,
                 "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng_by_rank": rng}
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        save_adapter(model, tmp / "adapter", settings, base_model=base_model)
        # an existing final is the same step saved by an earlier attempt of this run
        replace_dir(tmp, final, old=final.with_name(f".{final.name}.tmp-old"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    dp: DataParallel | None = None) -> Progress:
    """Restore trainable tensors, optimizer, scheduler and this rank's random states from a checkpoint dir."""
    state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    rng = _saved_rng_states(state)
    _check_ranks(path, len(rng), dp)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    if params.keys() != saved.keys():
        missing, extra = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
        raise ResumeError(f"{path}: the checkpoint's trainable tensors do not match this model and config "
                          f"(missing {missing[:3]}, unexpected {extra[:3]}); start a new run instead")
    for name, p in params.items():
        if p.shape != saved[name].shape:
            raise ResumeError(f"{path}: tensor {name} has shape {tuple(saved[name].shape)} in the checkpoint but "
                              f"{tuple(p.shape)} in this model (a different model or LoRA rank); start a new run")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(rng[dp.rank if dp is not None else 0])
    return Progress(state["step"], [tuple(h) for h in state["history"]], list(state["skipped"]),
                    [list(r) for r in state["bad_run_rows"]], state["tokens"], state["wall_s"])


def resume_config(run_dir: str | Path, **overrides: Any) -> TrainConfig:
    """The saved config of the run at run_dir (out=run_dir) with `overrides` that are not None applied;
    ResumeError if one of them would change tensor shapes or the data plan."""
    p = Path(run_dir)
    if not p.is_dir():
        raise ResumeError(f"{p}: no such run dir to resume")
    if not is_run_dir(p) or not (p / "config.yaml").is_file():
        raise ResumeError(f"{p}: not a trainer run dir (no {RUN_MARKER} and config.yaml); give the --out of an "
                          "earlier `trainer run`")
    saved = resolve_config(p / "config.yaml", out=str(p))
    requested = {k: v for k, v in overrides.items() if v is not None and k != "out"}
    merged = resolve_config(None, **{**saved.to_dict(), **requested, "out": str(p)})
    differ = [f.name for f in config_fields() if f.name not in RESUME_OVERRIDABLE
              and _norm(f.name, getattr(merged, f.name)) != _norm(f.name, getattr(saved, f.name))]
    if differ:
        raise ResumeError(f"{p}: cannot resume with a different {', '.join(differ)} (it would change tensor shapes "
                          f"or the data order); only {', '.join(RESUME_OVERRIDABLE)} may change")
    return merged


def _norm(name: str, value: Any) -> Any:
    if name in ("model", "data") and value is not None:
        return str(Path(value).resolve())
    return value
