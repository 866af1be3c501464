"""RMSNorm forward/backward in Triton: y = x * rstd * (offset + w), rstd = 1/sqrt(mean(x^2) + eps).

Statistics in float32 whatever the input dtype; one rounding to x's dtype at the end, as in
trainer.models.ops.rms_norm. Gemma's (1 + w) is offset=1.

Design: one program per row in the forward (a row of 3072-4096 elements fits one block; narrow rows
are batched several to a program), and the
per-row rstd is saved so the backward needs no second reduction over x^2. The backward runs a fixed
number of programs that each walk a strided set of rows and keep their share of dw in registers, so
dw is written as a [programs, D] float32 partial sum instead of one atomic add per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, x_row_stride, y_row_stride, n_rows, n_cols, eps, offset,
                  ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(x_ptr + rows * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1, keep_dims=True) / n_cols + eps)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)
    y = x * rstd * (offset + w)
    tl.store(y_ptr + rows * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, dy_row_stride, x_row_stride,
                  dx_row_stride, n_rows, n_cols, offset, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # int64 start: the loop variable inherits it, so row * stride cannot overflow on long inputs.
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)[None, :]
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for first in range(pid * ROWS, n_rows, programs * ROWS):
        rows = first + tl.arange(0, ROWS)[:, None]
        mask = (rows < n_rows) & (cols < n_cols)
        dy = tl.load(dy_ptr + rows * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=1, keep_dims=True) / n_cols))
        tl.store(dx_ptr + rows * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(dw_ptr + pid * n_cols + cols, tl.sum(dw, axis=0, keep_dims=True), mask=cols < n_cols)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_shape(n_cols: int) -> tuple[int, int, int]:
    """(rows per program, block width, warps): one row of 1024+ elements a program, several narrow rows."""
    block = triton.next_power_of_2(n_cols)
    return max(1, 1024 // block), block, min(max(block // 256, 1), 16)


def _backward_programs(n_row_blocks: int, device: torch.device) -> int:
    # A few programs per SM keep the loads in flight; more only grows the dw partial sum.
    if device.type == "cuda":
        return min(n_row_blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_row_blocks, 4)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper of the forward/backward kernels; see rms_norm."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        shape = x.shape
        x2, weight = _rows(x), weight.contiguous()
        n_rows, n_cols = x2.shape
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rows, block, warps = _launch_shape(n_cols)
        if n_rows:
            _rms_norm_fwd[(triton.cdiv(n_rows, rows),)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n_rows,
                                                        n_cols, eps, offset, ROWS=rows, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.shape = offset, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        n_rows, n_cols = x2.shape
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
        rows, block, warps = _launch_shape(n_cols)
        programs = _backward_programs(triton.cdiv(n_rows, rows), x2.device)
        dw_partial = torch.zeros((max(programs, 1), n_cols), dtype=torch.float32, device=x2.device)
        if n_rows:
            _rms_norm_bwd[(programs,)](dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0),
                                       dx.stride(0), n_rows, n_cols, ctx.offset, ROWS=rows, BLOCK=block,
                                       num_warps=warps)
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * (offset + weight), in float32, returned in x's dtype (Gemma: offset=1)."""
    assert x.shape[-1] == weight.shape[-1] and weight.dim() == 1, (x.shape, weight.shape)
    return RMSNormFunction.apply(x, weight, float(eps), float(offset))
