import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CI runs the kernels on CPU

import pytest  # noqa: E402
from kernel_checks import DTYPES, assert_close, device  # noqa: E402

from trainer.kernels.rms_norm import rms_norm  # noqa: E402
from trainer.models import ops  # noqa: E402


def _check(shape: tuple[int, ...], dtype: torch.dtype, offset: float, eps: float = 1e-6,
           weight_dtype: torch.dtype | None = None, transpose_input: bool = False) -> None:
    dev = device()
    hidden = shape[-1]
    x = torch.randn(shape, device=dev) * 3 + 0.5
    if transpose_input:  # same values, rows no longer contiguous
        x = x.transpose(0, -2).contiguous().transpose(0, -2)
    x = x.to(dtype).requires_grad_()
    w = (torch.randn(hidden, device=dev) * 0.5 + (0.0 if offset else 1.0)).to(weight_dtype or dtype).requires_grad_()
    dy = torch.randn(shape, device=dev).to(dtype)

    y = rms_norm(x, w, eps, offset)
    dx, dw = torch.autograd.grad(y, (x, w), dy)

    # Reference: ops.rms_norm on float32 copies (it computes in float32 for every input dtype).
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = ops.rms_norm(xr, wr, eps, offset)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.float())

    assert y.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == w.dtype
    assert_close(y, yr, dtype, "y")
    assert_close(dx, dxr, dtype, "dx")
    # dw sums over every row: float32 accumulation order adds ~sqrt(rows) ulps of float32.
    assert_close(dw, dwr, w.dtype, "dw", rtol=None if w.dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 64), (13, 96), (3, 5, 100)], ids=str)
def test_rms_norm_matches_reference_forward_and_backward(shape, dtype):
    torch.manual_seed(hash((shape, str(dtype))) % 2**31)
    _check(shape, dtype, offset=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemma_offset_norm_scales_by_one_plus_weight(dtype):
    torch.manual_seed(1)
    _check((3, 11, 96), dtype, offset=1.0, eps=1e-6)


def test_rms_norm_accepts_strided_rows_and_float32_weight():
    torch.manual_seed(2)
    _check((5, 6, 100), torch.bfloat16, offset=0.0, eps=1e-5, weight_dtype=torch.float32, transpose_input=True)


def test_rms_norm_without_weight_grad_gives_input_grad():
    torch.manual_seed(3)
    dev = device()
    x = torch.randn(4, 64, device=dev, requires_grad=True)
    w = torch.randn(64, device=dev)
    (dx,) = torch.autograd.grad(rms_norm(x, w, 1e-6).square().sum(), (x,))
    xr = x.detach().clone().requires_grad_()
    (dxr,) = torch.autograd.grad(ops.rms_norm(xr, w, 1e-6).square().sum(), (xr,))
    assert_close(dx, dxr, torch.float32, "dx")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [4096, 3072], ids=str)
def test_rms_norm_full_size_matches_reference(hidden, dtype):
    torch.manual_seed(hidden)
    _check((2, 2047, hidden), dtype, offset=0.0)
    _check((1, 4099, hidden), dtype, offset=1.0)
