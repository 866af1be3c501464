"""Rotary position embedding on q and k in Triton, in place (rotate-half pairing, optional partial rotation).

With r = cos.shape[-1] rotated dims per head and halves x1 = x[:r/2], x2 = x[r/2:r]:
    y1 = x1 * cos1 - x2 * sin1,   y2 = x2 * cos2 + x1 * sin2,   y[r:] = x[r:]
and the backward applies the transpose (the rotation by -theta):
    dx1 = dy1 * cos1 + dy2 * sin2,   dx2 = dy2 * cos2 - dy1 * sin1.
Arithmetic in float32 with cos/sin read as float32 (trainer.models.ops.rope_tables), one rounding.

Design: one program per (batch, position) handles every q head and every k head of that token (several
tokens per program when heads are few and small), so the cos/sin row is read once for all of them (the
plain path broadcasts it per head and materializes the rotate-half concatenation and the float32
upcast). q and k are the projection outputs [B, T, H * D], so a token's heads are one contiguous run of
memory and each program reads it in one coalesced sweep.

In place: the rotation overwrites q and k (the autograd Function marks them dirty, so autograd's
version counter catches any node that saved them earlier), and the backward overwrites the incoming
gradient. The bytes moved are those of the out-of-place version; what it saves is the new q/k and
dq/dk allocations (and for partial rotation the copy of the unrotated dims).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trainer.kernels.triton_math import cdiv, next_power_of_2


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


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, H, T, D] view of a [B, T, H * D] projection output (splitting the last dim is always a view)."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qo: torch.Tensor,
          ko: torch.Tensor, backward: bool) -> None:
    """Rotate q, k [B, H, T, D] into qo, ko (which may be q, k themselves: each program loads a token's
    values before it stores them). Every last dim must have unit stride."""
    assert q.stride(-1) == k.stride(-1) == qo.stride(-1) == ko.stride(-1) == 1
    b, hq, t, d = q.shape
    hk = k.shape[1]
    r = cos.shape[-1]
    if q.numel() == 0 and k.numel() == 0:
        return
    # In place the unrotated dims of a partial rotation are already where they belong.
    half, rest = r // 2, (0 if qo.data_ptr() == q.data_ptr() else d - r)
    block_hq, block_half = next_power_of_2(hq), next_power_of_2(half)
    block_t = max(1, _TILE // (block_hq * block_half))
    n_tokens = b * t
    _rope_kernel[(cdiv(n_tokens, block_t),)](
        q, k, qo, ko, cos, sin, n_tokens, t,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0), cos.stride(1), hq, hk,
        HALF=half, PASS=rest, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=next_power_of_2(hk),
        BLOCK_HALF=block_half, BLOCK_PASS=next_power_of_2(max(rest, 1)), BACKWARD=backward,
        num_warps=4)


def rotatable_in_place(x: torch.Tensor) -> bool:
    """Whether apply_rope may rotate the projection output x in place (otherwise it writes a new tensor).

    A view is rotated out of place: autograd forbids modifying an output of split in place (Phi-3's
    q, k, v are split from one qkv buffer), and for other views it rebases the base's history through
    CopySlices, whose backward copies the whole base gradient, more traffic than the new tensor costs.
    A leaf that requires grad may not be modified in place at all.
    """
    return x._base is None and x.stride(-1) == 1 and not (x.is_leaf and x.requires_grad)


def _non_overlapping(x: torch.Tensor) -> bool:
    """No two indices of x address the same element (an expanded gradient fails this), unit last stride."""
    dims = sorted((st, size) for st, size in zip(x.stride(), x.shape) if size > 1)
    reach = 1
    for st, size in dims:
        if st < reach:
            return False
        reach = st * size
    return x.stride(-1) == 1


class RopeFunction(torch.autograd.Function):
    """Autograd wrapper of the rotation kernel; its backward is the same kernel rotating by -theta."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
                in_place: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        ctx.head_dim = head_dim
        if in_place:
            qh, kh = _heads(q, head_dim), _heads(k, head_dim)
            _rope(qh, kh, cos, sin, qh, kh, backward=False)
            ctx.mark_dirty(q, k)
            return q, k
        qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        qv, kv = _heads(_unit_last(q), head_dim), _heads(_unit_last(k), head_dim)
        _rope(qv, kv, cos, sin, _heads(qo, head_dim), _heads(ko, head_dim), backward=False)
        return qo, ko

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        # The incoming gradients are rotated in place: in the decoder they come straight from attention's
        # backward and nothing else reads them. One that overlaps itself (expanded) gets a new tensor.
        dq_in = dq if _non_overlapping(dq) else torch.empty(dq.shape, dtype=dq.dtype, device=dq.device)
        dk_in = dk if _non_overlapping(dk) else torch.empty(dk.shape, dtype=dk.dtype, device=dk.device)
        dqv, dkv = _heads(_unit_last(dq), ctx.head_dim), _heads(_unit_last(dk), ctx.head_dim)
        _rope(dqv, dkv, cos, sin, _heads(dq_in, ctx.head_dim), _heads(dk_in, ctx.head_dim), backward=True)
        return dq_in, dk_in, None, None, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the projection outputs q [B, T, H * head_dim] and k [B, T, KV * head_dim] (the first
    cos.shape[-1] dims of each head; rotate-half pairing). In place when both allow it (see
    rotatable_in_place): use the returned tensors, not the arguments."""
    b, t = q.shape[:2]
    r = cos.shape[-1]
    assert q.dim() == k.dim() == 3 and k.shape[:2] == (b, t), (q.shape, k.shape)
    assert q.shape[-1] % head_dim == 0 and k.shape[-1] % head_dim == 0, (q.shape, k.shape, head_dim)
    assert cos.shape == sin.shape and cos.shape[-2] == t and r % 2 == 0 and r <= head_dim, (cos.shape, q.shape)
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32, "cos/sin come from rope_tables in float32"
    assert not (cos.requires_grad or sin.requires_grad), "the kernel gives no gradient for cos/sin"
    # Broadcast a batch-1 table over the batch with a zero stride rather than a copy.
    cos, sin = cos.expand(b, t, r), sin.expand(b, t, r)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    in_place = rotatable_in_place(q) and rotatable_in_place(k) and q.data_ptr() != k.data_ptr()
    return RopeFunction.apply(q, k, cos, sin, head_dim, in_place)
