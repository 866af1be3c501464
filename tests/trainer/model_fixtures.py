"""Tiny transformers checkpoints with weights spread wide enough that every family switch shows.

transformers initializes linears with std 0.02, which makes attention nearly uniform and leaves
sliding windows, softcaps and norm offsets almost invisible in the logits; a parity test on such
weights could pass with a switch missing. Here linears get std 1/sqrt(fan_in), norms +-30%, biases 0.1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from builders import tiny_config

VOCAB = 128


def hf_checkpoint(out: Path, family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                  **overrides: Any):
    """Save a tiny random `family` model to `out` and return the transformers model (eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, VOCAB, **overrides), dtype=dtype).eval()
    gemma_norm = family.startswith("gemma")  # Gemma's norms scale by (1 + w): weights spread around 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if gemma_norm else 1.0))
            elif p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1)
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return model
