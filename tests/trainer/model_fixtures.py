"""Tiny transformers checkpoints with weights spread wide enough that every family switch shows
(builders.spread_weights says why)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from builders import save_tiny_model

VOCAB = 128


def hf_checkpoint(out: Path, family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                  **overrides: Any):
    """Save a tiny random `family` model with spread weights to `out` and return the transformers model (eval mode)."""
    return save_tiny_model(out, family, VOCAB, seed=seed, dtype=dtype, spread=True, **overrides)
