"""Gated activations act(gate) * up in Triton: SwiGLU (silu) and GeGLU (gelu_tanh, exact gelu).

The activation and the product are one pass: the plain path reads gate, writes act(gate), reads it
back with up and writes the product (and autograd keeps act(gate) for the backward). Here the
forward reads gate and up once and writes the product; the backward recomputes act(gate) and its
derivative from gate instead of saving it, and writes both input gradients in the same pass.
Arithmetic is float32 with one rounding per output, so bf16 results are at least as close to the
exact value as the plain path's two roundings.

gate and up may be strided views (the halves of Phi-3's fused gate_up_proj output): the kernels take
a row stride per tensor, so no copy is made.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trainer.kernels.triton_math import cdiv, next_power_of_2

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


@triton.jit
def act_and_grad(g, ACT: tl.constexpr):
    """act(g) and act'(g) in float32 (the forward drops act'; the compiler removes its arithmetic)."""
    if ACT == 0:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        # With u = sqrt(2/pi) (g + 0.044715 g^3): (1 + tanh u) / 2 = sigmoid(2u) and (1 - tanh^2 u) / 2
        # = 2 sigmoid(2u) sigmoid(-2u). The sigmoid form keeps full relative precision in the negative
        # tail, where 1 + tanh(u) cancels (measured: 8e-6 absolute error in dgate at g = -5 with tanh).
        s = tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
        a = g * s
        da = s + 2.0 * g * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    else:
        # Phi(g) = (1 + erf(g / sqrt 2)) / 2 and phi(g) = exp(-g^2 / 2) / sqrt(2 pi)
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    return a, da


@triton.jit
def _gated_fwd(gate_ptr, up_ptr, out_ptr, gate_row_stride, up_row_stride, n_rows, n_cols,
               ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    g = tl.load(gate_ptr + rows * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = act_and_grad(g, ACT)
    tl.store(out_ptr + rows * n_cols + cols, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, dout_row_stride, gate_row_stride,
               up_row_stride, n_rows, n_cols, ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    do = tl.load(dout_ptr + rows * dout_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + rows * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = act_and_grad(g, ACT)
    tl.store(dgate_ptr + rows * n_cols + cols, (do * u * da).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + rows * n_cols + cols, (do * a).to(dup_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def tile_grid(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int, int]:
    """Tiles of 2048 elements (8 warps x 32 lanes x 8: 16-byte bf16 accesses): a slice of one row, or
    several short rows."""
    block = min(2048, next_power_of_2(n_cols))
    rows = 2048 // block
    return (cdiv(n_rows, rows), cdiv(n_cols, block)), rows, block


class GatedActivationFunction(torch.autograd.Function):
    """Autograd wrapper of the forward/backward kernels; see gated_activation."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
        shape = gate.shape
        g2, u2 = _rows(gate), _rows(up)
        n_rows, n_cols = g2.shape
        out = torch.empty((n_rows, n_cols), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        if out.numel():
            grid, rows, block = tile_grid(n_rows, n_cols)
            _gated_fwd[grid](g2, u2, out, g2.stride(0), u2.stride(0), n_rows, n_cols, ACT=act, ROWS=rows,
                             BLOCK=block, num_warps=8)
        ctx.save_for_backward(g2, u2)
        ctx.act, ctx.shape = act, shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        g2, u2 = ctx.saved_tensors
        d2 = _rows(dout)
        n_rows, n_cols = g2.shape
        dgate = torch.empty((n_rows, n_cols), dtype=g2.dtype, device=g2.device)
        dup = torch.empty((n_rows, n_cols), dtype=u2.dtype, device=u2.device)
        if dgate.numel():
            grid, rows, block = tile_grid(n_rows, n_cols)
            _gated_bwd[grid](d2, g2, u2, dgate, dup, d2.stride(0), g2.stride(0), u2.stride(0), n_rows, n_cols,
                             ACT=ctx.act, ROWS=rows, BLOCK=block, num_warps=8)
        return dgate.view(ctx.shape), dup.view(ctx.shape), None


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up: SwiGLU (silu) or GeGLU (gelu_tanh, or exact gelu)."""
    assert activation in ACTIVATIONS, activation
    assert gate.shape == up.shape, (gate.shape, up.shape)
    return GatedActivationFunction.apply(gate, up, ACTIVATIONS[activation])
