"""LoRA-fused projections with hand-written backward passes: one projection, and the gated MLP.

One projection, y = x W^T + b + s (x A^T) B^T, over a frozen 16-bit nn.Linear or a bitsandbytes NF4
Linear4bit (W then lives in 4 bits and is dequantized when needed):

    forward    W = dequantize(W4) into a workspace; y = b + s (x A^T) B^T; y += x W^T  (addmm, in place)
    backward   W = dequantize(W4) again;  dX = s (dY B) A + dY W;  dA = s (dY B)^T x;  dB = s dY^T (x A^T)

The small LoRA product is written first and the big matmul accumulates onto it (beta = 1), which reads
y in its epilogue under its own arithmetic; adding the LoRA term afterwards was a separate memory-bound
pass over y (per-projection timings: bench/lora_order.py, bench/KERNEL_NOTES.md).
Under torch.autocast the float32 factors are cast to the autocast dtype; inside cached_factor_casts
(trainer.loop.train_step opens it for each optimizer step) once per step instead of once per use.

Saved for backward: x, A, B and xa = x A^T. Not W: the dequantized matrix goes into one workspace per
(device, dtype), sized for the largest matrix and shared by every layer (the layers run one after
another on one stream, so a matrix is dead before the next layer dequantizes into the same memory);
the plain bitsandbytes path allocates and frees a fresh one per call. xa is [tokens x r] (256 KB per
projection at 4096 tokens and r=32 in bf16); recomputing it would re-read x ([tokens x in], 32 MB at
hidden 4096), so it is saved. x itself is the caller's tensor (q, k and v save the same one), where
the plain path saves a separate low-precision copy of x per LoRA branch. All products are cuBLAS
matmuls; the LoRA terms are folded into the base output (and into dX) with addmm.

The gated MLP, down(act(gate(x)) * up(x)) with each projection as above, is one Function whose
forward keeps only x, the LoRA factors and the three small xa's. The backward recomputes gate(x) and
up(x) (two matmuls) instead of saving them, and its Triton kernel overwrites gate with dgate, up with
dup and dh with h in place. At 2 x 2048 tokens, Llama-3-8B shape (intermediate 14336, bf16), one
[tokens x intermediate] tensor is 117 MB; the plain path keeps gate and up (for the activation's
backward), a bf16 copy of h = act(gate) * up (down's LoRA branch) and two bf16 copies of x (gate's
and up's LoRA branches): 3 x 117 + 2 x 32 = about 415 MB per layer until that layer's backward, 13 GB
over 32 layers without gradient checkpointing. This Function keeps x (32 MB) and the small factors.
With gradient checkpointing the layer's forward runs again right before its backward, so there
`recompute=False` (keep gate and up: 234 MB for one layer at a time) saves the two extra matmuls.

dtypes follow the plain path (trainer.lora.LoRALinear over nn.Linear or Linear4bit) exactly: under
torch.autocast every product runs in the autocast dtype (the float32 LoRA weights are cast to it, as
autocast casts them for the plain matmuls) and A, B get float32 gradients; without autocast the
base product runs in the base dtype and the LoRA product in float32. An nn.Linear base returns the
product's dtype; a Linear4bit returns its input's dtype, as bitsandbytes does.

With fp8=True (ModelOptions.fp8, `--fp8`) and a base fp8_capable says can, _Plan.fp8 runs the forward's base product
(and the recompute's) in e4m3 instead (see trainer.kernels.fp8); the LoRA term and bias are added after it,
since torch._scaled_mm cannot accumulate onto y. In the gated MLP, gate's and up's LoRA terms are instead
computed on each tile of the activation kernels (tl.dot of the [rows x r] and [r x cols] factor tiles) and
added in float32 there, so the [tokens x intermediate] outputs are not read and written once more each.
The backward's products are unchanged.

LoRA dropout is not handled here: with dropout the LoRA branch sees dropout(x), so dA needs the mask
or the dropped x (another [tokens x in] tensor per projection, the memory this saves); LoRALinear
keeps the plain path when dropout > 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from trainer.kernels.fp8 import E4M3, quantize_rows
from trainer.kernels.gated_act import ACTIVATIONS, act_and_grad, gated_activation, tile_grid
from trainer.kernels.nf4 import NF4_GPU_BLOCKSIZES, block_scales, dequantize_nf4, row_absmax
from trainer.kernels.triton_math import E4M3_MAX, INTERPRETED, cdiv, next_power_of_2

_WORKSPACES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


# (device, dtype, shape) -> that view of the buffer: made once, not sliced and viewed again on every call
_VIEWS: dict[tuple[torch.device, torch.dtype, tuple[int, ...]], torch.Tensor] = {}


def _workspace(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [shape] view of the shared (device, dtype) buffer, grown to the largest request seen."""
    view = _VIEWS.get((device, dtype, tuple(shape)))
    if view is not None:
        return view
    numel = math.prod(shape)
    key = (device, dtype)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        # drop the smaller buffer (and every view of it) first so its memory can be reused
        _WORKSPACES.pop(key, None)
        for k in [k for k in _VIEWS if k[:2] == key]:
            del _VIEWS[k]
        buf = _WORKSPACES[key] = torch.empty(numel, dtype=dtype, device=device)
    view = _VIEWS[(device, dtype, tuple(shape))] = buf[:numel].view(shape)
    return view


def clear_workspaces() -> None:
    """Free the dequantization buffers (they are re-created on the next call)."""
    _WORKSPACES.clear()
    _VIEWS.clear()


def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """base's weight [out, in] in `dtype`: the parameter itself when it already is, else a workspace view
    that stays valid only until the next dense_weight call on that device and dtype."""
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is None:
        return w if w.dtype == dtype else _workspace(w.shape, dtype, w.device).copy_(w)
    out = _workspace(qs.shape, dtype, w.device)
    if (w.is_cuda or INTERPRETED) and qs.quant_type == "nf4" and qs.blocksize in NF4_GPU_BLOCKSIZES:
        # One launch instead of bnb's three (nested absmax, + offset, 4-bit), same values bit for bit, in
        # less host time per call (bench/nf4_dequant.py; bench/README.md, where a step's time goes).
        return dequantize_nf4(w, qs, out)
    args = (w, block_scales(qs), qs.blocksize, qs.quant_type, list(qs.shape), dtype)
    if w.is_cuda:
        torch.ops.bitsandbytes.dequantize_4bit.out(*args, out=out)
    else:  # bitsandbytes has no CPU kernel writing into a given tensor
        out.copy_(torch.ops.bitsandbytes.dequantize_4bit.default(*args))
    return out


# weight -> (448 / row_absmax [out], row_absmax / 448 as [1, out]): the e4m3 weight's row scales, computed once
# (the base is frozen) and kept as long as the weight
_FP8_SCALES = WeakIdKeyDictionary()


def fp8_capable(base: nn.Module) -> bool:
    """Whether base's forward products can run in e4m3: an NF4 weight that trainer.kernels.nf4 dequantizes
    (on CUDA, or under the interpreter)."""
    w = base.weight
    qs = getattr(w, "quant_state", None)
    # cuBLAS's e4m3 products want both sizes of the weight in multiples of 16
    return (qs is not None and qs.quant_type == "nf4"
            and qs.blocksize in NF4_GPU_BLOCKSIZES and (w.is_cuda or INTERPRETED)
            and qs.shape[0] % 16 == 0 and qs.shape[1] % 16 == 0)


def fp8_weight(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(base's NF4 weight [out, in] in e4m3, each row scaled to fill e4m3's range; the row scales [1, out]
    float32): the second operand and scale_b of torch._scaled_mm. The matrix is a workspace view, valid
    until the next fp8_weight call on that device."""
    w = base.weight
    qs = w.quant_state
    scales = _FP8_SCALES.get(w)
    if scales is None:
        amax = row_absmax(w, qs).clamp(min=1e-12)
        scales = _FP8_SCALES[w] = (E4M3_MAX / amax, (amax / E4M3_MAX).view(1, -1))
    return dequantize_nf4(w, qs, _workspace(qs.shape, E4M3, w.device), row_scale=scales[0]), scales[1]


# While cached_factor_casts() is open: (data pointer, shape, strides, dtype) -> (tensor, its version, its copy
# in dtype). Keyed by memory, not object: backward sees the factors as other tensor objects (checkpointing
# saves detached aliases), which share the data and the version counter. The entry holds the tensor, so its
# memory cannot be reused by another tensor while the entry lives. A module global, not thread-local:
# backward runs on the autograd engine's thread.
_CASTS: dict[tuple, tuple[tuple[torch.Tensor, ...], tuple[int, ...], torch.Tensor]] | None = None


@contextmanager
def cached_factor_casts(*, fresh: bool = False) -> Iterator[None]:
    """Within: each LoRA factor is cast to the product dtype once and the copy reused, instead of once per
    use. Open it around the micro-batches of one optimizer step (trainer.loop.train_step): the float32
    factors do not change there, and a step uses each cast six times per micro-batch (forward, recompute,
    backward; A and B), about 5,400 casts per step at the Llama-3-8B shape with accumulation 4, each an
    allocation and a launch on the host. The copies (168 MB there, in bf16) are freed on exit.

    Nested, it shares the enclosing cache, unless `fresh`: a CUDA graph capture (trainer.graphs) must
    make its own copies, since a replay re-runs only the casts it captured."""
    global _CASTS
    outer = _CASTS
    _CASTS = {} if outer is None or fresh else outer
    try:
        yield
    finally:
        _CASTS = outer


def _cached_copy(sources: tuple[torch.Tensor, ...], dtype: torch.dtype, make) -> torch.Tensor:
    """make(), a copy of `sources` in dtype: while cached_factor_casts is open, made once and reused as long as
    the sources (by memory) are unchanged (by version)."""
    if _CASTS is None:
        return make()
    key = (tuple((t.data_ptr(), t.shape, t.stride()) for t in sources), dtype)
    versions = tuple(t._version for t in sources)
    hit = _CASTS.get(key)
    if hit is not None and hit[1] == versions:
        return hit[2]
    copy = make()
    _CASTS[key] = (sources, versions, copy)
    return copy


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype: t itself, a copy cached by cached_factor_casts (same tensor, unchanged since), or a new copy."""
    if t.dtype == dtype:
        return t
    return _cached_copy((t,), dtype, lambda: t.detach().to(dtype))


def _stacked_cast(ts: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """The factors stacked along dim 0, in dtype: one new tensor, cached like _cast's copies."""
    return _cached_copy(ts, dtype, lambda: torch.cat([t.detach().to(dtype) for t in ts]))


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


class LoRALinearFunction(torch.autograd.Function):
    """y = base(x) + s x A^T B^T with the backward written out; see lora_linear."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, base: nn.Module, scale: float,
                plan: _Plan) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        with _no_autocast(x.device.type):
            y, xa = _project(x2, base, lora_A, lora_B, scale, plan, lead=x.shape[:-1])
        ctx.save_for_backward(x, lora_A, lora_B, xa)
        ctx.base, ctx.scale, ctx.plan = base, scale, plan
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, A, B, xa = ctx.saved_tensors
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
        As, Bs = factors[0::2], factors[1::2]
        ranks = [A.shape[0] for A in As]
        with _no_autocast(x.device.type):
            xa = torch.mm(x2, _stacked_cast(As, plan.lora).t())  # [N, sum of ranks]
            x8 = quantize_rows(x2) if plan.fp8 else None  # once for the three
            outs = [_project(x2, base, A, B, scale, plan, lead=x.shape[:-1], xa=xa_i, x8=x8)[0]
                    for base, A, B, xa_i, scale in zip(bases, As, Bs, xa.split(ranks, dim=1), scales, strict=True)]
        ctx.save_for_backward(x, xa, *factors)
        ctx.bases, ctx.scales, ctx.plan, ctx.ranks = bases, scales, plan, ranks
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor | None):
        x, xa, *factors = ctx.saved_tensors
        bases, scales, plan, ranks = ctx.bases, ctx.scales, ctx.plan, ctx.ranks
        As, Bs = factors[0::2], factors[1::2]
        x2 = x.reshape(-1, x.shape[-1])
        need_x, need_factor = ctx.needs_input_grad[0], ctx.needs_input_grad[4:]
        grads: list[torch.Tensor | None] = [None] * len(factors)
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
            if any(need_factor[0::2]):
                dA = _scaled_product(dyB.t(), x2, common, plan.lora)  # [sum of ranks, in]
                for i, (dA_i, A) in enumerate(zip(dA.split(ranks), As, strict=True)):
                    grads[2 * i] = dA_i.to(A.dtype, copy=True) if need_factor[2 * i] else None
            for i, (dy2, xa_i, B, scale) in enumerate(zip(dy2s, xa.split(ranks, dim=1), Bs, scales, strict=True)):
                if dy2 is not None and need_factor[2 * i + 1]:
                    grads[2 * i + 1] = _grad_B(dy2, xa_i, B, scale, plan)
        return (dx, None, None, None, *grads)


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
    return LoRAProjectionsFunction.apply(x, tuple(p[0] for p in projections), tuple(p[3] for p in projections),
                                         plan, *(t for p in projections for t in p[1:3]))


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


Projection = tuple[nn.Module, torch.Tensor | None, torch.Tensor | None, float]  # base, A, B, scaling


def _projection(module: nn.Module) -> Projection:
    # a trainer.lora.LoRALinear, by its parts: this module sits below trainer.lora, which calls it
    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
        assert isinstance(module.lora_dropout, nn.Identity), "LoRA dropout: use the plain path"
        return module.base_layer, module.lora_A.weight, module.lora_B.weight, module.scaling
    return module, None, None, 0.0


def _lora_on_tiles(plans, factors) -> bool:
    """Whether gate's and up's LoRA terms go into the gated kernels (gated_lora_activation) instead of onto
    their outputs: under --fp8, where _scaled_mm cannot accumulate onto its output and adding each term
    afterwards is a pass that reads and writes all of gate and up (2 x 117 MB each at 4,096 tokens, Llama-3-8B)."""
    return len(plans) == 2 and all(p.fp8 for p in plans) and all(f is not None for f in factors)


def _gated_lora(xas, factors, scales, plans) -> GatedLoRA:
    return (xas[0], _cast(factors[1], plans[0].lora), scales[0], xas[1], _cast(factors[3], plans[1].lora), scales[1])


def _shared_x8(x2: torch.Tensor, plans: tuple[_Plan, ...] | list[_Plan]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x2 in e4m3 once for gate and up when both run e4m3 (a separate quantization each otherwise)."""
    return quantize_rows(x2) if all(p.fp8 for p in plans) and len(plans) > 1 else None


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
        with _no_autocast(x.device.type):
            outs, xas = [], []
            x8 = _shared_x8(x2, plans[:n_in])
            fused = _lora_on_tiles(plans[:n_in], factors[:2 * n_in])
            for i in range(n_in):
                A, B = factors[2 * i], factors[2 * i + 1]
                if fused:  # the base product alone; its LoRA term is added inside the activation kernel
                    y, xa = _project(x2, bases[i], None, None, scales[i], plans[i], x8=x8)[0], _lora_x(x2, A, plans[i])
                else:
                    y, xa = _project(x2, bases[i], A, B, scales[i], plans[i], x8=x8)
                outs.append(y)
                xas.append(xa)
            gate, up = outs if n_in == 2 else outs[0].chunk(2, dim=-1)
            if fused:
                h = gated_lora_activation(gate, up, _gated_lora(xas, factors, scales, plans), activation)
            else:
                h = gated_activation(gate, up, activation)
            if recompute:
                del outs, gate, up  # free them before the down product
            if output:
                y, ha = _project(h, bases[-1], factors[-2], factors[-1], scales[-1], plans[-1], lead=x.shape[:-1])
            else:  # only what the backward keeps: h A^T, not the down product itself
                A = factors[-2]
                ha = None if A is None else _lora_x(h.view(-1, h.shape[-1]), A, plans[-1])
                y = torch.empty((*x.shape[:-1], bases[-1].out_features), dtype=plans[-1].out, device=x.device)
        ctx.save_for_backward(x, ha, *factors, *xas, *([] if recompute else outs))
        ctx.activation, ctx.bases, ctx.scales, ctx.plans, ctx.recompute = activation, bases, scales, plans, recompute
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        bases, scales, plans = ctx.bases, ctx.scales, ctx.plans
        n_in, n_factors = len(bases) - 1, 2 * len(bases)
        x, ha, *rest = ctx.saved_tensors
        factors, xas, kept = rest[:n_factors], rest[n_factors:n_factors + n_in], rest[n_factors + n_in:]
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        need_x, need_factor = ctx.needs_input_grad[0], ctx.needs_input_grad[7:]
        grads: list[torch.Tensor | None] = [None] * n_factors
        dx = None
        with _no_autocast(x.device.type):
            # down first: dh needs only dY, and gate/up are recomputed after dY's products are done
            A, B = factors[-2:]
            dyB = _lora_dy(dy2, B, plans[-1])
            if B is not None and need_factor[-1]:
                grads[-1] = _grad_B(dy2, ha, B, scales[-1], plans[-1])
            dh = _input_grad(dy2, bases[-1], A, dyB, scales[-1], plans[-1])
            fused = _lora_on_tiles(plans[:n_in], factors[:2 * n_in])  # then outs are the base products alone
            if ctx.recompute:
                x8 = _shared_x8(x2, plans[:n_in])
                outs = [_project(x2, bases[i], *((None, None) if fused else factors[2 * i:2 * i + 2]), scales[i],
                                 plans[i], x8=x8)[0] for i in range(n_in)]
            else:
                outs = list(kept)
            gate, up = outs if n_in == 2 else outs[0].chunk(2, dim=-1)
            # gate, up, dh now hold dgate, dup, h
            gated_backward_in_place(gate, up, dh, ctx.activation,
                                    lora=_gated_lora(xas, factors, scales, plans) if fused else None)
            if A is not None and need_factor[-2]:
                grads[-2] = _grad_A(dyB, dh, A, scales[-1], plans[-1])
            del dh, gate, up
            for i, dout in enumerate(outs):  # dgate and dup (or Phi-3's [dgate | dup])
                A, B = factors[2 * i], factors[2 * i + 1]
                dyB = _lora_dy(dout, B, plans[i])
                if need_x:
                    dx = _input_grad(dout, bases[i], A, dyB, scales[i], plans[i], out=dx)
                if A is not None and need_factor[2 * i]:
                    grads[2 * i] = _grad_A(dyB, x2, A, scales[i], plans[i])
                if B is not None and need_factor[2 * i + 1]:
                    grads[2 * i + 1] = _grad_B(dout, xas[i], B, scales[i], plans[i])
        dx = None if dx is None else dx.view(x.shape)
        return (dx, None, None, None, None, None, None, *grads)


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
    plans.append(_plan(h_dtype, device_type, projections[-1][0], projections[-1][1], fp8))
    return LoRAMLPFunction.apply(x, activation, recompute, output, tuple(p[0] for p in projections),
                                 tuple(p[3] for p in projections), tuple(plans),
                                 *(t for p in projections for t in p[1:3]))
