"""The LoRA-fused gated MLP, down(act(gate(x)) * up(x)), as one Function with a hand-written backward, and the
Triton kernels of its activation.

Each projection runs as in trainer.kernels.lora_projection. The Function's forward keeps only x, the LoRA
factors and the three small xa's (named: _MLPSaved). The backward recomputes gate(x) and up(x) (two
matmuls) instead of saving them, and its Triton kernel overwrites gate with dgate, up with dup and dh with h
in place. At 2 x 2048 tokens, Llama-3-8B shape (intermediate 14336, bf16), one [tokens x intermediate]
tensor is 117 MB; the plain path keeps gate and up (for the activation's backward), a bf16 copy of
h = act(gate) * up (down's LoRA branch) and two bf16 copies of x (gate's and up's LoRA branches):
3 x 117 + 2 x 32 = about 415 MB per layer until that layer's backward, 13 GB over 32 layers without
gradient checkpointing. This Function keeps x (32 MB) and the small factors. With gradient checkpointing
the layer's forward runs again right before its backward, so there `recompute=False` (keep gate and up:
234 MB for one layer at a time) saves the two extra matmuls.

Under fp8 (_Plan.fp8), where torch._scaled_mm cannot accumulate onto its output, gate's and up's LoRA terms
are computed on each tile of the activation kernels (tl.dot of the [rows x r] and [r x cols] factor tiles)
and added in float32 there, so the [tokens x intermediate] outputs are not read and written once more each.
The backward's products are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import nn

from trainer.kernels.fp8 import quantize_rows
from trainer.kernels.gated_act import ACTIVATIONS, act_and_grad, gated_activation, tile_grid
from trainer.kernels.lora_projection import (
    _factor_pairs,
    _Factors,
    _grad_A,
    _grad_B,
    _input_grad,
    _interleaved,
    _lora_dy,
    _lora_x,
    _no_autocast,
    _Plan,
    _plan,
    _project,
    _projection,
)
from trainer.kernels.lora_workspace import _cast
from trainer.kernels.triton_math import INTERPRETED, cdiv, next_power_of_2


@triton.jit
def _lora_term_t(b_ptr, cols, n_cols, rank, RANK: tl.constexpr):
    """B^T [RANK, BLOCK] for the tile's columns (B [n_cols, rank] contiguous; padded ranks read zero)."""
    k = tl.arange(0, RANK)[:, None]
    return tl.load(b_ptr + cols * rank + k, mask=(cols < n_cols) & (k < rank), other=0.0)


@triton.jit
def _lora_term(xa_ptr, bt, rows, n_rows, rank, scale, RANK: tl.constexpr):
    """s (x A^T) B^T for the tile's rows, float32 [ROWS, BLOCK] (xa [n_rows, rank] contiguous)."""
    k = tl.arange(0, RANK)[None, :]
    xa = tl.load(xa_ptr + rows * rank + k, mask=(rows < n_rows) & (k < rank), other=0.0)
    # float32 operands: exact for the 16-bit factors (8 or 10 mantissa bits fit tf32's 10, which a GPU's float32
    # tl.dot uses), and Triton's interpreter multiplies bf16 operands wrongly
    return scale * tl.dot(xa.to(tl.float32), bt.to(tl.float32))


@triton.jit
def _gate_up_tile(gate_ptr, up_ptr, gate_row_stride, up_row_stride, rows, cols, mask, n_rows, xag_ptr, xau_ptr,
                  btg, btu, scale_g, scale_u, rank_g, rank_u, LORA: tl.constexpr, RANK_G: tl.constexpr,
                  RANK_U: tl.constexpr):
    """g and u of one tile in float32: gate's and up's values, with LORA plus s (x A^T) B^T each (btg, btu:
    the column block's B^T tiles from _lora_term_t). The forward and the backward read them alike."""
    g = tl.load(gate_ptr + rows * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if LORA:
        g += _lora_term(xag_ptr, btg, rows, n_rows, rank_g, scale_g, RANK_G)
        u += _lora_term(xau_ptr, btu, rows, n_rows, rank_u, scale_u, RANK_U)
    return g, u


@triton.jit
def _gated_lora_fwd(gate_ptr, up_ptr, out_ptr, gate_row_stride, up_row_stride, n_rows, n_cols, xag_ptr, bg_ptr,
                    xau_ptr, bu_ptr, scale_g, scale_u, rank_g, rank_u, ACT: tl.constexpr, RANK_G: tl.constexpr,
                    RANK_U: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ROW_TILES: tl.constexpr):
    """out = act(g) * u with g = gate + s_g (xa_g B_g^T), u = up + s_u (xa_u B_u^T): the LoRA terms added in
    float32 on the tile, never written (see gated_lora_activation). A program takes ROW_TILES tiles down
    one column block, so its B tiles are read once for all of them."""
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    btg = _lora_term_t(bg_ptr, cols, n_cols, rank_g, RANK_G)
    btu = _lora_term_t(bu_ptr, cols, n_cols, rank_u, RANK_U)
    for t in tl.static_range(ROW_TILES):
        rows = (tl.program_id(0).to(tl.int64) * ROW_TILES + t) * ROWS + tl.arange(0, ROWS)[:, None]
        mask = (rows < n_rows) & (cols < n_cols)
        g, u = _gate_up_tile(gate_ptr, up_ptr, gate_row_stride, up_row_stride, rows, cols, mask, n_rows, xag_ptr,
                             xau_ptr, btg, btu, scale_g, scale_u, rank_g, rank_u, True, RANK_G, RANK_U)
        a, _ = act_and_grad(g, ACT)
        tl.store(out_ptr + rows * n_cols + cols, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_in_place(gate_ptr, up_ptr, dh_ptr, gate_row_stride, up_row_stride, dh_row_stride, n_rows, n_cols,
                        xag_ptr, bg_ptr, xau_ptr, bu_ptr, scale_g, scale_u, rank_g, rank_u, ACT: tl.constexpr,
                        LORA: tl.constexpr, RANK_G: tl.constexpr, RANK_U: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK: tl.constexpr, ROW_TILES: tl.constexpr):
    """gate <- dh * up * act'(gate), up <- dh * act(gate), dh <- act(gate) * up (the forward's h); with LORA,
    gate and up hold the base products only and the LoRA terms are added on the tile, as in _gated_lora_fwd."""
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    btg = None  # unread without LORA
    btu = None
    if LORA:
        btg = _lora_term_t(bg_ptr, cols, n_cols, rank_g, RANK_G)
        btu = _lora_term_t(bu_ptr, cols, n_cols, rank_u, RANK_U)
    for t in tl.static_range(ROW_TILES):
        rows = (tl.program_id(0).to(tl.int64) * ROW_TILES + t) * ROWS + tl.arange(0, ROWS)[:, None]
        mask = (rows < n_rows) & (cols < n_cols)
        g, u = _gate_up_tile(gate_ptr, up_ptr, gate_row_stride, up_row_stride, rows, cols, mask, n_rows, xag_ptr,
                             xau_ptr, btg, btu, scale_g, scale_u, rank_g, rank_u, LORA, RANK_G, RANK_U)
        d_ptrs = dh_ptr + rows * dh_row_stride + cols
        d = tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
        a, da = act_and_grad(g, ACT)
        tl.store(gate_ptr + rows * gate_row_stride + cols, (d * u * da).to(gate_ptr.dtype.element_ty), mask=mask)
        tl.store(up_ptr + rows * up_row_stride + cols, (d * a).to(up_ptr.dtype.element_ty), mask=mask)
        tl.store(d_ptrs, (a * u).to(dh_ptr.dtype.element_ty), mask=mask)


# Tiles of the LoRA-fused gated kernels: tl.dot needs 16 rows or more; 64 x 128 with 8 warps, four tiles per
# program so that each [128 x r] B tile is read once per 256 rows
_LORA_ROWS, _LORA_BLOCK, _LORA_ROW_TILES = 64, 128, 4

GatedLoRA = tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, torch.Tensor, float]  # xa_g, B_g, s_g, xa_u, B_u, s_u


def _lora_launch(g2: torch.Tensor, lora: GatedLoRA | None) -> tuple[tuple, tuple, dict]:
    """(grid, the LoRA arguments (xa_g, B_g, xa_u, B_u, s_g, s_u, r_g, r_u), constexpr keywords) of a gated
    kernel over g2's [rows, cols]; without LoRA, g2 stands in for the factors (LORA=False never reads them)."""
    n_rows, n_cols = g2.shape
    if lora is None:
        grid, rows, block = tile_grid(n_rows, n_cols)
        return grid, (g2, g2, g2, g2, 1.0, 1.0, 1, 1), dict(RANK_G=16, RANK_U=16, ROWS=rows, BLOCK=block, ROW_TILES=1)
    xa_g, b_g, s_g, xa_u, b_u, s_u = lora
    for xa, b in ((xa_g, b_g), (xa_u, b_u)):
        assert xa.is_contiguous() and b.is_contiguous() and xa.shape == (n_rows, b.shape[1]), (xa.shape, b.shape)
        assert b.shape[0] == n_cols and xa.dtype == b.dtype, (b.shape, n_cols, xa.dtype, b.dtype)
        assert b.dtype in (torch.bfloat16, torch.float16), f"{b.dtype}: the kernels' tf32 products are exact for 16-bit only"
    grid = (cdiv(n_rows, _LORA_ROWS * _LORA_ROW_TILES), cdiv(n_cols, _LORA_BLOCK))
    meta = dict(RANK_G=max(16, next_power_of_2(b_g.shape[1])), RANK_U=max(16, next_power_of_2(b_u.shape[1])),
                ROWS=_LORA_ROWS, BLOCK=_LORA_BLOCK, ROW_TILES=_LORA_ROW_TILES)
    return grid, (xa_g, b_g, xa_u, b_u, s_g, s_u, b_g.shape[1], b_u.shape[1]), meta


def gated_lora_activation(gate: torch.Tensor, up: torch.Tensor, lora: GatedLoRA, activation: str) -> torch.Tensor:
    """act(g) * u, [rows, n] in gate's dtype, for g = gate + s_g xa_g B_g^T and u = up + s_u xa_u B_u^T with
    gate and up the base products only: the rank-r LoRA terms are computed on each tile (tl.dot) and added in
    float32, instead of a separate pass that reads and writes all of gate and up (needed under --fp8, where
    _scaled_mm cannot accumulate onto its output). No autograd: LoRAMLPFunction's forward."""
    assert gate.shape == up.shape and gate.dim() == 2 and gate.stride(1) == up.stride(1) == 1, (gate.shape, up.shape)
    n_rows, n_cols = gate.shape
    out = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if out.numel():
        grid, lora_args, meta = _lora_launch(gate, lora)
        _gated_lora_fwd[grid](gate, up, out, gate.stride(0), up.stride(0), n_rows, n_cols, *lora_args,
                              ACT=ACTIVATIONS[activation], num_warps=8, **meta)
    return out


def gated_backward_in_place(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, activation: str,
                            lora: GatedLoRA | None = None) -> None:
    """For h = act(gate) * up: overwrite gate with dL/dgate, up with dL/dup and dh (= dL/dh) with h.

    All three are [..., n] with unit column stride (gate and up may be the two halves of one fused
    projection output); no memory is allocated, which is the point: the MLP backward holds three
    [tokens x intermediate] tensors at its peak instead of six. With `lora`, gate and up are the base
    products only and the LoRA terms are added on the tile, as gated_lora_activation does.
    """
    assert gate.shape == up.shape == dh.shape, (gate.shape, up.shape, dh.shape)
    assert gate.is_cuda or INTERPRETED, "the Triton kernel needs a GPU (or TRITON_INTERPRET=1 at import)"
    n_cols = gate.shape[-1]
    g2, u2, d2 = (t.view(-1, n_cols) for t in (gate, up, dh))  # view, never a copy: the writes must land
    assert g2.stride(1) == u2.stride(1) == d2.stride(1) == 1
    n_rows = g2.shape[0]
    if n_rows and n_cols:
        grid, lora_args, meta = _lora_launch(g2, lora)
        _gated_bwd_in_place[grid](g2, u2, d2, g2.stride(0), u2.stride(0), d2.stride(0), n_rows, n_cols, *lora_args,
                                  ACT=ACTIVATIONS[activation], LORA=lora is not None, num_warps=8, **meta)


def _lora_on_tiles(plans: Sequence[_Plan], inputs: Sequence[_Factors]) -> bool:
    """Whether gate's and up's LoRA terms go into the gated kernels (gated_lora_activation) instead of onto
    their outputs: under --fp8, where _scaled_mm cannot accumulate onto its output and adding each term
    afterwards is a pass that reads and writes all of gate and up (2 x 117 MB each at 4,096 tokens, Llama-3-8B)."""
    return len(plans) == 2 and all(p.fp8 for p in plans) and all(t is not None for f in inputs for t in f)


def _gated_lora(xas, inputs: Sequence[_Factors], scales, plans) -> GatedLoRA:
    gate, up = inputs
    return (xas[0], _cast(gate.B, plans[0].lora), scales[0], xas[1], _cast(up.B, plans[1].lora), scales[1])


def _shared_x8(x2: torch.Tensor, plans: tuple[_Plan, ...] | list[_Plan]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x2 in e4m3 once for gate and up when both run e4m3 (a separate quantization each otherwise)."""
    return quantize_rows(x2) if all(p.fp8 for p in plans) and len(plans) > 1 else None


class _MLPSaved(NamedTuple):
    """What LoRAMLPFunction keeps for its backward, through ctx.save_for_backward as
    (x, ha, A_0, B_0, ..., A_down, B_down, *xas, *kept)."""

    x: torch.Tensor  # the input [..., hidden]
    ha: torch.Tensor | None  # h A_down^T [N, r] (None without LoRA on down)
    inputs: tuple[_Factors, ...]  # the input projections' factors: gate's and up's, or Phi-3's fused gate_up's
    down: _Factors  # down's factors
    xas: tuple[torch.Tensor | None, ...]  # x A^T [N, r] of each input projection (None without LoRA)
    kept: tuple[torch.Tensor, ...]  # the input projections' outputs with recompute=False, else ()

    def save(self, ctx) -> None:
        factors = (t for pair in (*self.inputs, self.down) for t in pair)
        ctx.save_for_backward(self.x, self.ha, *factors, *self.xas, *self.kept)

    @classmethod
    def load(cls, ctx, n_in: int) -> _MLPSaved:
        """The saved tensors of a LoRAMLPFunction with n_in input projections (2: gate and up; 1: gate_up)."""
        x, ha, *rest = ctx.saved_tensors
        n_factors = 2 * (n_in + 1)
        *inputs, down = _factor_pairs(rest[:n_factors])
        return cls(x, ha, tuple(inputs), down, tuple(rest[n_factors:n_factors + n_in]), tuple(rest[n_factors + n_in:]))


# LoRAMLPFunction.forward's arguments before the factors: x, activation, recompute, output, bases, scales, plans
_MLP_ARGS = 7


class LoRAMLPFunction(torch.autograd.Function):
    """down(act(gate(x)) * up(x)), each projection optionally LoRA-adapted; see lora_mlp.

    `bases`, `scales` and `plans` list the input projections (gate and up, or Phi-3's fused gate_up),
    then down; `factors` holds each one's A and B (None, None for a projection without LoRA).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, activation: str, recompute: bool, output: bool, bases: tuple[nn.Module, ...],
                scales: tuple[float, ...], plans: tuple[_Plan, ...], *factors: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        n_in = len(bases) - 1
        *inputs, down = _factor_pairs(factors)
        with _no_autocast(x.device.type):
            outs, xas = [], []
            x8 = _shared_x8(x2, plans[:n_in])
            fused = _lora_on_tiles(plans[:n_in], inputs)
            for i, (A, B) in enumerate(inputs):
                if fused:  # the base product alone; its LoRA term is added inside the activation kernel
                    y, xa = _project(x2, bases[i], None, None, scales[i], plans[i], x8=x8)[0], _lora_x(x2, A, plans[i])
                else:
                    y, xa = _project(x2, bases[i], A, B, scales[i], plans[i], x8=x8)
                outs.append(y)
                xas.append(xa)
            gate, up = outs if n_in == 2 else outs[0].chunk(2, dim=-1)
            if fused:
                h = gated_lora_activation(gate, up, _gated_lora(xas, inputs, scales, plans), activation)
            else:
                h = gated_activation(gate, up, activation)
            if recompute:
                del outs, gate, up  # free them before the down product
            if output:
                y, ha = _project(h, bases[-1], down.A, down.B, scales[-1], plans[-1], lead=x.shape[:-1])
            else:  # only what the backward keeps: h A^T, not the down product itself
                ha = None if down.A is None else _lora_x(h.view(-1, h.shape[-1]), down.A, plans[-1])
                y = torch.empty((*x.shape[:-1], bases[-1].out_features), dtype=plans[-1].out, device=x.device)
        _MLPSaved(x, ha, tuple(inputs), down, tuple(xas), () if recompute else tuple(outs)).save(ctx)
        ctx.activation, ctx.bases, ctx.scales, ctx.plans, ctx.recompute = activation, bases, scales, plans, recompute
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        bases, scales, plans = ctx.bases, ctx.scales, ctx.plans
        n_in = len(bases) - 1
        x, ha, inputs, down, xas, kept = _MLPSaved.load(ctx, n_in)
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        need_x = ctx.needs_input_grad[0]
        *need_inputs, need_down = _factor_pairs(ctx.needs_input_grad[_MLP_ARGS:])
        # the factors' gradients: the input projections', then down's (last)
        dAs: list[torch.Tensor | None] = [None] * len(bases)
        dBs: list[torch.Tensor | None] = [None] * len(bases)
        dx = None
        with _no_autocast(x.device.type):
            # down first: dh needs only dY, and gate/up are recomputed after dY's products are done
            dyB = _lora_dy(dy2, down.B, plans[-1])
            if down.B is not None and need_down.B:
                dBs[-1] = _grad_B(dy2, ha, down.B, scales[-1], plans[-1])
            dh = _input_grad(dy2, bases[-1], down.A, dyB, scales[-1], plans[-1])
            fused = _lora_on_tiles(plans[:n_in], inputs)  # then outs are the base products alone
            if ctx.recompute:
                x8 = _shared_x8(x2, plans[:n_in])
                outs = [_project(x2, bases[i], *((None, None) if fused else inputs[i]), scales[i],
                                 plans[i], x8=x8)[0] for i in range(n_in)]
            else:
                outs = list(kept)
            gate, up = outs if n_in == 2 else outs[0].chunk(2, dim=-1)
            # gate, up, dh now hold dgate, dup, h
            gated_backward_in_place(gate, up, dh, ctx.activation,
                                    lora=_gated_lora(xas, inputs, scales, plans) if fused else None)
            if down.A is not None and need_down.A:
                dAs[-1] = _grad_A(dyB, dh, down.A, scales[-1], plans[-1])
            del dh, gate, up
            for i, dout in enumerate(outs):  # dgate and dup (or Phi-3's [dgate | dup])
                A, B = inputs[i]
                dyB = _lora_dy(dout, B, plans[i])
                if need_x:
                    dx = _input_grad(dout, bases[i], A, dyB, scales[i], plans[i], out=dx)
                if A is not None and need_inputs[i].A:
                    dAs[i] = _grad_A(dyB, x2, A, scales[i], plans[i])
                if B is not None and need_inputs[i].B:
                    dBs[i] = _grad_B(dout, xas[i], B, scales[i], plans[i])
        dx = None if dx is None else dx.view(x.shape)
        return (dx, None, None, None, None, None, None, *_interleaved(dAs, dBs))


def lora_mlp(x: torch.Tensor, gate_proj: nn.Module, up_proj: nn.Module | None, down_proj: nn.Module,
             activation: str, *, recompute: bool = True, output: bool = True, fp8: bool = False) -> torch.Tensor:
    """down_proj(act(gate_proj(x)) * up_proj(x)) as one Function (SwiGLU: silu; GeGLU: gelu_tanh, gelu).

    Each projection is a LoRALinear without dropout or a frozen base linear (nn.Linear or Linear4bit);
    up_proj None means gate_proj is Phi-3's fused gate_up_proj ([gate | up] along the last dim). With
    `recompute` the backward recomputes gate(x) and up(x) instead of keeping them from the forward.
    With `output` False the down product is not computed and the returned tensor's values are undefined
    (uninitialized memory): for a checkpointed layer's recompute, whose outputs autograd only
    differentiates, never reads. The backward is the same either way: it needs no output value. `fp8`: the
    forward's base products in e4m3 as in lora_linear. Needs CUDA (or TRITON_INTERPRET=1) for the in-place activation backward.
    """
    assert activation in ACTIVATIONS, activation
    assert x.is_cuda or INTERPRETED, "the Triton kernels need a GPU (or TRITON_INTERPRET=1 at import)"
    modules = (gate_proj, down_proj) if up_proj is None else (gate_proj, up_proj, down_proj)
    projections = [_projection(m) for m in modules]
    for base, *_ in projections:
        assert not any(p.requires_grad for p in base.parameters()), "base layers must be frozen"
    device_type = x.device.type
    plans = [_plan(x.dtype, device_type, base, A, fp8) for base, A, _, _ in projections[:-1]]
    h_dtype = plans[0].out if up_proj is None else torch.promote_types(plans[0].out, plans[1].out)
    down = projections[-1]
    plans.append(_plan(h_dtype, device_type, down.base, down.A, fp8))
    return LoRAMLPFunction.apply(x, activation, recompute, output, tuple(p.base for p in projections),
                                 tuple(p.scale for p in projections), tuple(plans),
                                 *_interleaved([p.A for p in projections], [p.B for p in projections]))
