"""Shared tolerances and input helpers for the kernel tests.

Tolerances: a kernel computes in float32 and rounds each output once, so against a float32 (or
float64) reference an output may differ by one unit in the last place of its own dtype: relative
2**-7 for bf16 (8 significant bits), 2**-10 for fp16 (11 bits). float32 outputs carry only
accumulation-order error (~1e-6 relative over a few thousand terms), hence 1e-5. The absolute floor
(1% of that, relative to the largest reference value) covers values that cancel to near zero and
fp16 subnormals.
"""

from __future__ import annotations

import os

import torch

RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def device() -> torch.device:
    """The GPU when there is one, else the CPU (kernels then run under TRITON_INTERPRET=1)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    assert os.environ.get("TRITON_INTERPRET") == "1", "no GPU: tests/kernels/conftest.py sets TRITON_INTERPRET"
    return torch.device("cpu")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 rtol: float | None = None) -> None:
    """Elementwise |actual - expected| <= rtol |expected| + rtol/100 max|expected|; NaN never passes."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    rtol = RTOL[dtype] if rtol is None else rtol
    bound = rtol * e.abs() + rtol * 1e-2 * e.abs().max()
    excess = (a - e).abs() - bound
    worst = int(excess.flatten().argmax())
    assert excess.max() <= 0, (f"{what}: {a.flatten()[worst].item()} vs {e.flatten()[worst].item()} "
                               f"(max abs err {(a - e).abs().max().item():.3g}, rtol {rtol:.3g})")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp(min=1e-300)).item()
