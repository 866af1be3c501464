"""RMSNorm forward/backward in Triton: y = x * rstd * (offset + w), rstd = 1/sqrt(mean(x^2) + eps),
and the fused residual add + RMSNorm: s = x + r, y = rms_norm(s), returning both.

Statistics in float32 whatever the input dtype; one rounding to x's dtype at the end, as in
trainer.models.ops.rms_norm. Gemma's (1 + w) is offset=1. The fused form rounds s to its dtype (the
promoted dtype of x and r, as `x + r` does) and normalizes the rounded s, so s and y are those of
the plain add followed by the plain norm; its backward adds the gradient arriving at s from the
residual stream to the norm's input gradient in float32 and rounds once.

Design: one program per row in the forward (a row of 3072-4096 elements fits one block; narrow rows
are batched several to a program), and the per-row rstd is saved so the backward needs no second
reduction over x^2. The fused add saves s, not x and r: s is the next layer's input and alive anyway,
and the backward needs nothing else (the add's gradient is the identity). The backward runs a fixed
number of programs that each walk a strided set of rows and keep their share of dw in registers, so
dw is written as a [programs, D] float32 partial sum instead of one atomic add per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trainer.kernels.triton_math import cdiv, next_power_of_2


@triton.jit
def _rms_norm_fwd(x_ptr, r_ptr, s_ptr, w_ptr, y_ptr, rstd_ptr, x_row_stride, r_row_stride, s_row_stride,
                  y_row_stride, n_rows, n_cols, eps, offset, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                  ADD: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(x_ptr + rows * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        r = tl.load(r_ptr + rows * r_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + rows * s_row_stride + cols, s, mask=mask)
        x = s.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1, keep_dims=True) / n_cols + eps)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)
    y = x * rstd * (offset + w)
    tl.store(y_ptr + rows * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(dy_ptr, ds_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, dy_row_stride, ds_row_stride,
                  x_row_stride, dx_row_stride, n_rows, n_cols, offset, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                  ADD_DS: tl.constexpr):
    # ADD_DS: the fused add's backward, where x is s and the residual stream's gradient ds joins dx.
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
        if ADD_DS:
            dx += tl.load(ds_ptr + rows * ds_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(dw_ptr + pid * n_cols + cols, tl.sum(dw, axis=0, keep_dims=True), mask=cols < n_cols)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_shape(n_cols: int) -> tuple[int, int, int]:
    """(rows per program, block width, warps): one row of 1024+ elements a program, several narrow rows."""
    block = next_power_of_2(n_cols)
    return max(1, 1024 // block), block, min(max(block // 256, 1), 16)


def _backward_programs(n_row_blocks: int, device: torch.device) -> int:
    # A few programs per SM keep the loads in flight; more only grows the dw partial sum.
    if device.type == "cuda":
        return min(n_row_blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_row_blocks, 4)


def _forward(x2: torch.Tensor, r2: torch.Tensor | None, weight: torch.Tensor, eps: float,
             offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, y, rstd) for row matrices; s is x2 itself without a residual."""
    n_rows, n_cols = x2.shape
    dtype = x2.dtype if r2 is None else torch.promote_types(x2.dtype, r2.dtype)
    s = x2 if r2 is None else torch.empty((n_rows, n_cols), dtype=dtype, device=x2.device)
    y = torch.empty((n_rows, n_cols), dtype=dtype, device=x2.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    rows, block, warps = _launch_shape(n_cols)
    if n_rows:
        r2 = x2 if r2 is None else r2  # a placeholder pointer: ADD=False never reads it
        _rms_norm_fwd[(cdiv(n_rows, rows),)](x2, r2, s, weight, y, rstd, x2.stride(0), r2.stride(0),
                                                    s.stride(0), y.stride(0), n_rows, n_cols, eps, offset,
                                                    ROWS=rows, BLOCK=block, ADD=s is not x2, num_warps=warps)
    return s, y, rstd


def _backward(dy2: torch.Tensor, ds2: torch.Tensor | None, x2: torch.Tensor, weight: torch.Tensor,
              rstd: torch.Tensor, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw partial sums [programs, D] in float32); ds2, the gradient reaching s directly, joins dx."""
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    rows, block, warps = _launch_shape(n_cols)
    programs = _backward_programs(cdiv(n_rows, rows), x2.device)
    # every program writes its whole row of partial sums: no zero fill (a launch) unless none runs
    dw_partial = (torch.empty if n_rows else torch.zeros)((max(programs, 1), n_cols), dtype=torch.float32,
                                                          device=x2.device)
    if n_rows:
        ds_arg = dy2 if ds2 is None else ds2  # placeholder when ADD_DS is False
        _rms_norm_bwd[(programs,)](dy2, ds_arg, x2, weight, rstd, dx, dw_partial, dy2.stride(0),
                                   ds_arg.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols, offset,
                                   ROWS=rows, BLOCK=block, ADD_DS=ds2 is not None, num_warps=warps)
    return dx, dw_partial


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper of the forward/backward kernels; see rms_norm."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        x2, weight = _rows(x), weight.contiguous()
        _, y, rstd = _forward(x2, None, weight, eps, offset)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.shape = offset, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw_partial = _backward(_rows(dy), None, x2, weight, rstd, ctx.offset)
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None, None


class AddRMSNormFunction(torch.autograd.Function):
    """Autograd wrapper of the fused residual add + RMSNorm; see add_rms_norm."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                offset: float) -> tuple[torch.Tensor, torch.Tensor]:
        weight = weight.contiguous()
        s, y, rstd = _forward(_rows(x), _rows(residual), weight, eps, offset)
        ctx.save_for_backward(s, weight, rstd)
        ctx.offset, ctx.shape, ctx.dtypes = offset, x.shape, (x.dtype, residual.dtype)
        # s may receive no gradient (a caller that drops it): no zero tensor is made up for it.
        ctx.set_materialize_grads(False)
        return s.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, ds: torch.Tensor | None, dy: torch.Tensor | None):
        s, weight, rstd = ctx.saved_tensors
        if dy is None:
            return ds.to(ctx.dtypes[0]), ds.to(ctx.dtypes[1]), None, None, None
        dy2 = _rows(dy)
        dsum, dw_partial = _backward(dy2, None if ds is None else _rows(ds), s, weight, rstd, ctx.offset)
        dsum = dsum.view(ctx.shape)
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        # x and r get the same gradient (one tensor when their dtypes agree, as AddBackward does).
        return dsum.to(ctx.dtypes[0]), dsum.to(ctx.dtypes[1]), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * (offset + weight), in float32, returned in x's dtype (Gemma: offset=1)."""
    assert x.shape[-1] == weight.shape[-1] and weight.dim() == 1, (x.shape, weight.shape)
    return RMSNormFunction.apply(x, weight, float(eps), float(offset))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s)) with s = x + residual in one pass: the residual stream and the next norm's output."""
    assert x.shape == residual.shape, (x.shape, residual.shape)
    assert x.shape[-1] == weight.shape[-1] and weight.dim() == 1, (x.shape, weight.shape)
    return AddRMSNormFunction.apply(x, residual, weight, float(eps), float(offset))
