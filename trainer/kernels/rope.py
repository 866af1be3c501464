"""Rotary position embedding on q and k in Triton (rotate-half pairing, optional partial rotation).

With r = cos.shape[-1] rotated dims per head and halves x1 = x[:r/2], x2 = x[r/2:r]:
    y1 = x1 * cos1 - x2 * sin1,   y2 = x2 * cos2 + x1 * sin2,   y[r:] = x[r:]
and the backward applies the transpose:
    dx1 = dy1 * cos1 + dy2 * sin2,   dx2 = dy2 * cos2 - dy1 * sin1.
Arithmetic in float32 with cos/sin read as float32 (trainer.models.ops.rope_tables), one rounding.

Design: one program per (batch, position) handles every q head and every k head of that token (several
tokens per program when heads are few and small), so the cos/sin row is read once for all of them (the plain path broadcasts it per head and materializes
the rotate-half concatenation and the float32 upcast). q and k are read through their strides: the
decoder's q is a [B, T, H, D] buffer viewed as [B, H, T, D], so a token's heads are one contiguous
run of memory and each program reads it in one coalesced sweep. Outputs keep the input's strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, y_ptr, cos_rows, sin_rows, b, t, tmask, sxb, sxh, sxt, syb, syh, syt, n_heads,
                  HALF: tl.constexpr, PASS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  BLOCK_PASS: tl.constexpr, BACKWARD: tl.constexpr):
    # Tiles are [tokens, heads, pair index]; b, t, tmask, cos_rows, sin_rows are [tokens, 1, 1].
    heads = tl.arange(0, BLOCK_H)[None, :, None]
    d = tl.arange(0, BLOCK_HALF)[None, None, :]
    mask = tmask & (heads < n_heads) & (d < HALF)
    x_base = x_ptr + b * sxb + t * sxt + heads * sxh
    y_base = y_ptr + b * syb + t * syt + heads * syh
    cmask = tmask & (d < HALF)
    c1 = tl.load(cos_rows + d, mask=cmask, other=0.0)
    c2 = tl.load(cos_rows + HALF + d, mask=cmask, other=0.0)
    s1 = tl.load(sin_rows + d, mask=cmask, other=0.0)
    s2 = tl.load(sin_rows + HALF + d, mask=cmask, other=0.0)
    x1 = tl.load(x_base + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + HALF + d, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(y_base + d, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_base + HALF + d, y2.to(y_ptr.dtype.element_ty), mask=mask)
    if PASS > 0:
        p = tl.arange(0, BLOCK_PASS)[None, None, :]
        pmask = tmask & (heads < n_heads) & (p < PASS)
        rest = tl.load(x_base + 2 * HALF + p, mask=pmask, other=0.0)
        tl.store(y_base + 2 * HALF + p, rest, mask=pmask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, n_tokens, n_pos,
                 sqb, sqh, sqt, skb, skh, skt, sob, soh, sot, spb, sph, spt, scb, sct,
                 n_q_heads, n_k_heads, HALF: tl.constexpr, PASS: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_PASS: tl.constexpr, BACKWARD: tl.constexpr):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None, None]
    tmask = tokens < n_tokens
    b = tokens // n_pos
    t = tokens % n_pos
    cos_rows = cos_ptr + b * scb + t * sct
    sin_rows = sin_ptr + b * scb + t * sct
    _rotate_heads(q_ptr, qo_ptr, cos_rows, sin_rows, b, t, tmask, sqb, sqh, sqt, sob, soh, sot, n_q_heads,
                  HALF, PASS, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS, BACKWARD)
    _rotate_heads(k_ptr, ko_ptr, cos_rows, sin_rows, b, t, tmask, skb, skh, skt, spb, sph, spt, n_k_heads,
                  HALF, PASS, BLOCK_HK, BLOCK_HALF, BLOCK_PASS, BACKWARD)


# Elements of the larger (q) tile a program handles: a whole token's heads at real sizes (32 heads x 64
# pairs for Llama 3 8B), several tokens per program at small head counts.
_TILE = 2048


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _unit_last(q), _unit_last(k)
    b, hq, t, d = q.shape
    hk = k.shape[1]
    r = cos.shape[-1]
    # Outputs keep the inputs' strides (empty_like preserves a dense permuted layout).
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if q.numel() == 0 and k.numel() == 0:
        return qo, ko
    half, rest = r // 2, d - r
    block_hq, block_half = triton.next_power_of_2(hq), triton.next_power_of_2(half)
    block_t = max(1, _TILE // (block_hq * block_half))
    n_tokens = b * t
    _rope_kernel[(triton.cdiv(n_tokens, block_t),)](
        q, k, qo, ko, cos, sin, n_tokens, t,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0), cos.stride(1), hq, hk,
        HALF=half, PASS=rest, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=triton.next_power_of_2(hk),
        BLOCK_HALF=block_half, BLOCK_PASS=triton.next_power_of_2(max(rest, 1)), BACKWARD=backward,
        num_warps=4)
    return qo, ko


class RopeFunction(torch.autograd.Function):
    """Autograd wrapper of the rotation kernel (its backward is the same kernel, transposed)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return _rope(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = _rope(dq, dk, cos, sin, backward=True)
        return dq_in, dk_in, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, H, T, D] and k [B, KV, T, D] (the first cos.shape[-1] dims; rotate-half pairing)."""
    b, _, t, d = q.shape
    r = cos.shape[-1]
    assert k.shape[0] == b and k.shape[2] == t and k.shape[3] == d, (q.shape, k.shape)
    assert cos.shape == sin.shape and cos.shape[-2] == t and r % 2 == 0 and r <= d, (cos.shape, q.shape)
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32, "cos/sin come from rope_tables in float32"
    assert not (cos.requires_grad or sin.requires_grad), "the kernel gives no gradient for cos/sin"
    # Broadcast a batch-1 table over the batch with a zero stride rather than a copy.
    cos, sin = cos.expand(b, t, r), sin.expand(b, t, r)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return RopeFunction.apply(q, k, cos, sin)
