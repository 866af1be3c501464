"""LoRA-fused projections with hand-written backward passes: one projection (lora_linear), and several of one
input, q, k and v (lora_projections).

One projection, y = x W^T + b + s (x A^T) B^T, over a frozen 16-bit nn.Linear or a bitsandbytes NF4
Linear4bit (W then lives in 4 bits and is dequantized when needed):

    forward    W = dequantize(W4) into a workspace; y = b + s (x A^T) B^T; y += x W^T  (addmm, in place)
    backward   W = dequantize(W4) again;  dX = s (dY B) A + dY W;  dA = s (dY B)^T x;  dB = s dY^T (x A^T)

The small LoRA product is written first and the big matmul accumulates onto it (beta = 1), which reads
y in its epilogue under its own arithmetic; adding the LoRA term afterwards was a separate memory-bound
pass over y (per-projection timings: bench/lora_order.py, bench/KERNEL_NOTES.md).

Saved for backward (named: _LinearSaved, _ProjectionsSaved): x, A, B and xa = x A^T. Not W: the
dequantized matrix goes into a workspace shared by every layer (trainer.kernels.lora_workspace). xa is
[tokens x r] (256 KB per projection at 4096 tokens and r=32 in bf16); recomputing it would re-read x
([tokens x in], 32 MB at hidden 4096), so it is saved. x itself is the caller's tensor (q, k and v save
the same one), where the plain path saves a separate low-precision copy of x per LoRA branch. All
products are cuBLAS matmuls; the LoRA terms are folded into the base output (and into dX) with addmm.

dtypes follow the plain path (trainer.lora.LoRALinear over nn.Linear or Linear4bit) exactly: under
torch.autocast every product runs in the autocast dtype (the float32 LoRA weights are cast to it, as
autocast casts them for the plain matmuls; see lora_workspace.cached_factor_casts) and A, B get float32
gradients; without autocast the base product runs in the base dtype and the LoRA product in float32. An
nn.Linear base returns the product's dtype; a Linear4bit returns its input's dtype, as bitsandbytes does.

With fp8=True (ModelOptions.fp8, `--fp8`) and a base fp8_capable says can, _Plan.fp8 runs the forward's
base product (and the recompute's) in e4m3 instead (see trainer.kernels.fp8); the LoRA term and bias are
added after it, since torch._scaled_mm cannot accumulate onto y. The backward's products are unchanged.

LoRA dropout is not handled here: with dropout the LoRA branch sees dropout(x), so dA needs the mask
or the dropped x (another [tokens x in] tensor per projection, the memory this saves); LoRALinear
keeps the plain path when dropout > 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from trainer.kernels.fp8 import quantize_rows
from trainer.kernels.lora_workspace import _cast, _stacked_cast, dense_weight, fp8_capable, fp8_weight


@dataclass(frozen=True)
class _Plan:
    """dtypes of one projection: base product, LoRA products, output; and the input's."""

    base: torch.dtype
    lora: torch.dtype
    out: torch.dtype
    x: torch.dtype
    fp8: bool = False  # the forward's base product in e4m3 (fp8_capable), the backward's in `base`


def _plan(x_dtype: torch.dtype, device_type: str, base: nn.Module, lora_A: torch.Tensor | None,
          fp8: bool = False) -> _Plan:
    """The dtypes the plain path would use for this projection under the caller's autocast state; with `fp8`
    the forward's base product in e4m3 where the base and the dtypes allow it."""
    cast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    lora = cast or (lora_A.dtype if lora_A is not None else x_dtype)
    if getattr(base.weight, "quant_state", None) is not None:
        # Linear4bit casts x to its compute dtype, multiplies (autocast applies inside), and returns
        # the result in x's dtype.
        compute = getattr(base, "compute_dtype", None) or x_dtype
        dtype = cast or compute
        # row-scaled e4m3 products return bf16 only, and the base product must land in that dtype (_project)
        fp8 = fp8 and dtype == x_dtype == lora == torch.bfloat16 and fp8_capable(base)
        return _Plan(dtype, lora, x_dtype, x_dtype, fp8)
    if cast is None:
        assert x_dtype == base.weight.dtype, (x_dtype, base.weight.dtype)
    dtype = cast or base.weight.dtype
    return _Plan(dtype, lora, dtype, x_dtype)


def _add_product(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """target += scale * a @ b in place; one rounding when the dtypes agree."""
    if target.dtype == a.dtype:
        target.addmm_(a, b, alpha=scale)
    else:  # no autocast, 16-bit base, float32 LoRA: the product stays float32 until the add
        target.add_(torch.mm(a, b), alpha=scale)


def _project(x2: torch.Tensor, base: nn.Module, A: torch.Tensor | None, B: torch.Tensor | None, scale: float,
             plan: _Plan, lead: tuple[int, ...] | None = None, xa: torch.Tensor | None = None,
             x8: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x2 W^T + b + s x2 A^T B^T in plan.out, x2 A^T in plan.lora or None without LoRA) for x2 [N, in];
    `xa`, where the caller has x2 A^T already (lora_projections), is used instead of computing it, and so
    is `x8`, x2 quantized by fp8.quantize_rows, under plan.fp8.

    The output is a new [*lead, out] tensor (lead defaults to (N,)) written through a 2-D view, so it is
    never itself a view: the decoder's RoPE may then rotate a q or k projection in place (autograd
    forbids in-place changes to a view that a custom Function returned).
    """
    n = x2.shape[0]
    y = torch.empty((*(lead if lead is not None else (n,)), base.out_features), dtype=plan.out, device=x2.device)
    y2 = y.view(n, base.out_features)
    if plan.fp8:
        w8, w_scale = fp8_weight(base)
        xq, x_scale = quantize_rows(x2) if x8 is None else x8
        # fast accumulation (Hopper's FP8 MMA without its periodic promotion to float32): forward products only,
        # as torchao's float8 training does; its error is small beside the operands' e4m3 rounding
        torch._scaled_mm(xq, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=plan.out, out=y2,
                         use_fast_accum=True)
        if base.bias is not None:
            y2.add_(base.bias.to(plan.out))
        if A is None:
            return y, None
        xa = _lora_x(x2, A, plan) if xa is None else xa
        # the LoRA term cannot be accumulated onto by _scaled_mm (no beta), so it is added after
        y2.addmm_(xa, _cast(B, plan.lora).t(), alpha=scale)
        return y, xa
    w = dense_weight(base, plan.base)
    bias = None if base.bias is None else base.bias.to(plan.base)
    xb = x2.to(plan.base)
    if A is not None and plan.base == plan.out == plan.lora:
        # LoRA term first, written (b + s xa B^T), then the base product accumulated onto it: the big matmul
        # reads y in its epilogue, hidden under its arithmetic, where adding the LoRA term afterwards re-reads
        # and re-writes all of y in a memory-bound pass (bench/lora_order.py).
        xa = _lora_x(x2, A, plan) if xa is None else xa
        if bias is None:
            y2.addmm_(xa, _cast(B, plan.lora).t(), beta=0, alpha=scale)  # beta=0: y2's old contents are ignored
        else:
            torch.addmm(bias, xa, _cast(B, plan.lora).t(), alpha=scale, out=y2)
        y2.addmm_(xb, w.t())
        return y, xa
    if plan.base != plan.out:  # a Linear4bit without autocast returns its input's dtype
        y2.copy_(F.linear(xb, w, bias))
    elif bias is None:
        torch.mm(xb, w.t(), out=y2)
    else:
        torch.addmm(bias, xb, w.t(), out=y2)
    if A is None:
        return y, None
    xa = _lora_x(x2, A, plan)
    _add_product(y2, xa, _cast(B, plan.lora).t(), scale)
    return y, xa


def _input_grad(dy2: torch.Tensor, base: nn.Module, A: torch.Tensor | None, dyB: torch.Tensor | None,
                scale: float, plan: _Plan, out: torch.Tensor | None = None) -> torch.Tensor:
    """dY W + s (dY B) A in plan.x (added to `out` when given); dyB = dY B from _lora_dy."""
    w = dense_weight(base, plan.base)
    dy_base = dy2.to(plan.base)
    if A is not None and out is None and plan.base == plan.x == plan.lora:
        # as in _project: the LoRA term written first, the big product accumulated onto it
        return _scaled_product(dyB, _cast(A, plan.lora), scale, plan.x).addmm_(dy_base, w)
    if out is not None and out.dtype == plan.base:
        out.addmm_(dy_base, w)
        dx = out
    else:
        dx = torch.mm(dy_base, w).to(plan.x)
        if out is not None:
            dx = out.add_(dx)
    if A is not None:
        _add_product(dx, dyB, _cast(A, plan.lora), scale)
    return dx


def _lora_x(x2: torch.Tensor, A: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """x A^T [N, r] in the LoRA dtype (unscaled): what the LoRA-B product and dB both start from."""
    return torch.mm(x2.to(plan.lora), _cast(A, plan.lora).t())


def _lora_dy(dy2: torch.Tensor, B: torch.Tensor | None, plan: _Plan) -> torch.Tensor | None:
    """dY B [N, r] in the LoRA dtype (unscaled)."""
    return None if B is None else torch.mm(dy2.to(plan.lora), _cast(B, plan.lora))


def _scaled_product(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """s a b in a's dtype (the scale applied in the matmul's float32 epilogue: one rounding), then in dtype."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    return out.addmm_(a, b, beta=0, alpha=scale).to(dtype)


def _grad_A(dyB: torch.Tensor, x2: torch.Tensor, A: torch.Tensor, scale: float, plan: _Plan) -> torch.Tensor:
    """s (dY B)^T x, in A's dtype."""
    return _scaled_product(dyB.t(), x2.to(plan.lora), scale, A.dtype)


def _grad_B(dy2: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, scale: float, plan: _Plan) -> torch.Tensor:
    """s dY^T (x A^T), in B's dtype."""
    return _scaled_product(dy2.to(plan.lora).t(), xa, scale, B.dtype)


def _no_autocast(device_type: str) -> torch.autocast:
    # Every dtype is chosen explicitly (see _plan); autocast inside would re-cast the products.
    return torch.autocast(device_type, enabled=False)


class Projection(NamedTuple):
    """A LoRALinear by its parts (or a bare base: A, B None, scale 0)."""

    base: nn.Module
    A: torch.Tensor | None
    B: torch.Tensor | None
    scale: float


def _projection(module: nn.Module) -> Projection:
    # a trainer.lora.LoRALinear, by its parts: this module sits below trainer.lora, which calls it
    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
        assert isinstance(module.lora_dropout, nn.Identity), "LoRA dropout: use the plain path"
        return Projection(module.base_layer, module.lora_A.weight, module.lora_B.weight, module.scaling)
    return Projection(module, None, None, 0.0)


_T = TypeVar("_T")


class _Factors(NamedTuple, Generic[_T]):
    """One projection's A and B: the LoRA factors A [r, in] and B [out, r] (both None for a projection without
    LoRA), or their flags in ctx.needs_input_grad."""

    A: _T
    B: _T


def _factor_pairs(flat: Sequence[_T]) -> list[_Factors[_T]]:
    """(A_0, B_0, A_1, B_1, ...), the order in which the Functions take the factors, save them and return their
    gradients, as one _Factors per projection."""
    assert len(flat) % 2 == 0, len(flat)
    return [_Factors(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _interleaved(As: Sequence, Bs: Sequence) -> tuple:
    """(A_0, B_0, A_1, B_1, ...) from the A's and the B's (or their gradients): _factor_pairs' flat order."""
    return tuple(t for pair in zip(As, Bs, strict=True) for t in pair)


class _LinearSaved(NamedTuple):
    """What LoRALinearFunction keeps for its backward, through ctx.save_for_backward in this order."""

    x: torch.Tensor  # the input [..., in]
    A: torch.Tensor  # lora_A [r, in]
    B: torch.Tensor  # lora_B [out, r]
    xa: torch.Tensor  # x A^T [N, r] in plan.lora

    def save(self, ctx) -> None:
        ctx.save_for_backward(self.x, self.A, self.B, self.xa)

    @classmethod
    def load(cls, ctx) -> _LinearSaved:
        return cls(*ctx.saved_tensors)


class LoRALinearFunction(torch.autograd.Function):
    """y = base(x) + s x A^T B^T with the backward written out; see lora_linear."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, base: nn.Module, scale: float,
                plan: _Plan) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        with _no_autocast(x.device.type):
            y, xa = _project(x2, base, lora_A, lora_B, scale, plan, lead=x.shape[:-1])
        _LinearSaved(x, lora_A, lora_B, xa).save(ctx)
        ctx.base, ctx.scale, ctx.plan = base, scale, plan
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, A, B, xa = _LinearSaved.load(ctx)
        base, scale, plan = ctx.base, ctx.scale, ctx.plan
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = dA = dB = None
        with _no_autocast(x.device.type):
            dyB = _lora_dy(dy2, B, plan) if need_x or need_A else None
            if need_x:
                dx = _input_grad(dy2, base, A, dyB, scale, plan).view(x.shape)
            if need_A:
                dA = _grad_A(dyB, x2, A, scale, plan)
            if need_B:
                dB = _grad_B(dy2, xa, B, scale, plan)
        return dx, dA, dB, None, None, None


def lora_linear(x: torch.Tensor, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, *, fp8: bool = False) -> torch.Tensor:
    """base(x) + scaling * x A^T B^T for a frozen nn.Linear or NF4 Linear4bit base (no dropout).

    Same values (up to rounding order) and dtypes as trainer.lora.LoRALinear's plain path, with or
    without autocast; the dequantized base weight is never kept between calls. `fp8`: the forward's base
    product in e4m3 where fp8_capable(base) and the dtypes are bfloat16.
    """
    assert not any(p.requires_grad for p in base.parameters()), "the base layer must be frozen"
    plan = _plan(x.dtype, x.device.type, base, lora_A, fp8)
    return LoRALinearFunction.apply(x, lora_A, lora_B, base, scaling, plan)


class _ProjectionsSaved(NamedTuple):
    """What LoRAProjectionsFunction keeps for its backward, through ctx.save_for_backward as
    (x, xa, A_0, B_0, A_1, B_1, ...)."""

    x: torch.Tensor  # the input [..., in], shared by every projection
    xa: torch.Tensor  # x [A_0; A_1; ...]^T [N, sum of ranks] in plan.lora
    As: Sequence[torch.Tensor]  # each projection's A [r_i, in]
    Bs: Sequence[torch.Tensor]  # each projection's B [out_i, r_i]

    def save(self, ctx) -> None:
        ctx.save_for_backward(self.x, self.xa, *_interleaved(self.As, self.Bs))

    @classmethod
    def load(cls, ctx) -> _ProjectionsSaved:
        x, xa, *factors = ctx.saved_tensors
        pairs = _factor_pairs(factors)
        return cls(x, xa, [p.A for p in pairs], [p.B for p in pairs])


# LoRAProjectionsFunction.forward's arguments before the factors: x, bases, scales, plan
_PROJECTIONS_ARGS = 4


class LoRAProjectionsFunction(torch.autograd.Function):
    """Several LoRA projections of one input (q, k and v): (y_i = x W_i^T + b_i + s x A_i^T B_i^T for each i).

    Apart, each projection reads x for its own x A_i^T in forward and for its own dA_i in backward, writes
    its own LoRA term of dX, and autograd then adds the three [tokens x in] gradients. Here the A's are
    stacked: x A^T is one product (x read once), dA is one product, and dX is one buffer that starts as
    (dY B) A over the stacked rank and takes each dY_i W_i in place. Saved: x, x A^T and the factors.
    Only where every projection runs all its products in one dtype (plan.base == plan.out == plan.lora ==
    plan.x: under autocast, or a 16-bit base without autocast in its own dtype); lora_projections falls
    back to one lora_linear each otherwise.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bases: tuple[nn.Module, ...], scales: tuple[float, ...], plan: _Plan,
                *factors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x2 = x.reshape(-1, x.shape[-1])
        pairs = _factor_pairs(factors)
        As, Bs = [p.A for p in pairs], [p.B for p in pairs]
        ranks = [A.shape[0] for A in As]
        with _no_autocast(x.device.type):
            xa = torch.mm(x2, _stacked_cast(As, plan.lora).t())  # [N, sum of ranks]
            x8 = quantize_rows(x2) if plan.fp8 else None  # once for the three
            outs = [_project(x2, base, A, B, scale, plan, lead=x.shape[:-1], xa=xa_i, x8=x8)[0]
                    for base, A, B, xa_i, scale in zip(bases, As, Bs, xa.split(ranks, dim=1), scales, strict=True)]
        _ProjectionsSaved(x, xa, As, Bs).save(ctx)
        ctx.bases, ctx.scales, ctx.plan, ctx.ranks = bases, scales, plan, ranks
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor | None):
        x, xa, As, Bs = _ProjectionsSaved.load(ctx)
        bases, scales, plan, ranks = ctx.bases, ctx.scales, ctx.plan, ctx.ranks
        x2 = x.reshape(-1, x.shape[-1])
        need_x = ctx.needs_input_grad[0]
        need = _factor_pairs(ctx.needs_input_grad[_PROJECTIONS_ARGS:])
        dAs: list[torch.Tensor | None] = [None] * len(As)
        dBs: list[torch.Tensor | None] = [None] * len(Bs)
        dx = None
        with _no_autocast(x.device.type):
            dy2s = [None if dy is None else dy.reshape(-1, dy.shape[-1]) for dy in dys]
            # One scale for all (the usual case) goes into the products' float32 epilogues, as lora_linear
            # applies it; different ones scale each dY_i B_i first.
            common = scales[0] if len(set(scales)) == 1 else 1.0
            # dY_i B_i side by side: [N, sum of ranks] (a projection without a gradient adds zeros)
            parts = []
            for dy2, B, r, scale in zip(dy2s, Bs, ranks, scales, strict=True):
                if dy2 is None:
                    parts.append(torch.zeros((x2.shape[0], r), dtype=plan.lora, device=x.device))
                    continue
                parts.append(torch.mm(dy2, _cast(B, plan.lora)))
                if scale != common:
                    parts[-1].mul_(scale / common)
            dyB = torch.cat(parts, dim=1)
            if need_x:
                dx = _scaled_product(dyB, _stacked_cast(As, plan.lora), common, plan.x)
                for dy2, base in zip(dy2s, bases, strict=True):
                    if dy2 is not None:
                        dx.addmm_(dy2, dense_weight(base, plan.base))
                dx = dx.view(x.shape)
            if any(n.A for n in need):
                dA = _scaled_product(dyB.t(), x2, common, plan.lora)  # [sum of ranks, in]
                for i, (dA_i, A) in enumerate(zip(dA.split(ranks), As, strict=True)):
                    dAs[i] = dA_i.to(A.dtype, copy=True) if need[i].A else None
            for i, (dy2, xa_i, B, scale) in enumerate(zip(dy2s, xa.split(ranks, dim=1), Bs, scales, strict=True)):
                if dy2 is not None and need[i].B:
                    dBs[i] = _grad_B(dy2, xa_i, B, scale, plan)
        return (dx, None, None, None, *_interleaved(dAs, dBs))


def lora_projections(x: torch.Tensor, modules: tuple[nn.Module, ...], *,
                     fp8: bool = False) -> tuple[torch.Tensor, ...]:
    """(m(x) for m in modules), LoRALinear's without dropout over frozen bases, as one Function (see
    LoRAProjectionsFunction) where all run in one dtype, else as one lora_linear each; `fp8` as lora_linear's."""
    projections = [_projection(m) for m in modules]
    for base, A, _, _ in projections:
        assert A is not None, "every projection must be LoRA-adapted"
        assert not any(p.requires_grad for p in base.parameters()), "base layers must be frozen"
    plans = {_plan(x.dtype, x.device.type, base, A, fp8) for base, A, _, _ in projections}
    plan = plans.pop() if len(plans) == 1 else None
    if plan is None or not plan.base == plan.out == plan.lora == plan.x:
        return tuple(lora_linear(x, base, A, B, scale, fp8=fp8) for base, A, B, scale in projections)
    return LoRAProjectionsFunction.apply(x, tuple(p.base for p in projections), tuple(p.scale for p in projections),
                                         plan, *_interleaved([p.A for p in projections], [p.B for p in projections]))
