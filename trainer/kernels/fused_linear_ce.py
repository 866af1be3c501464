"""Fused lm_head + cross-entropy: loss and gradients without the [tokens x vocab] logits.

The plain path materializes logits [N, V] in the model dtype, a float32 copy for the loss, and a
float32 gradient of the same size: for 4096 tokens of Llama 3 (V = 128256) that is 1 GB + 2 GB + 2 GB.
Here the tokens go through in chunks of C rows. Per chunk:
  0. (once) rows whose target is ignore_index (-100) are dropped: they carry no loss or gradient;
  1. logits = h_chunk @ W^T on cuBLAS, in the model dtype (the same numbers lm_head produces);
  2. a Triton kernel walks each row over the vocabulary in blocks (any V: an online max and sum of
     exponentials, in float32), writes the row's loss, and overwrites the logits in place with
     dloss/dlogits (softmax - onehot, times the softcap's derivative and 1 / num_items);
  3. grad_h_chunk = dlogits @ W and grad_W += dlogits^T @ h_chunk, again on cuBLAS.
The gradients are computed in the forward (the loss is a scalar, so the backward only scales them
by grad_output) and only one [C, V] buffer lives at a time.

Numerics match trainer.models.ops.causal_lm_loss on the same logits: float32 softmax statistics, the
Gemma 2 softcap cap * tanh(x / cap) applied in float32 before the softmax, ignore_index -100, mean over
counted targets or sum / num_items_in_batch. grad_W accumulates across chunks in float32 and is
rounded to W's dtype once, like the plain path's single product (this costs a float32 V x H buffer
while lm_head is trained; QLoRA freezes it and skips grad_W altogether).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trainer.kernels.triton_math import next_power_of_2, tanh

IGNORE_INDEX = -100
_BLOCK_V = 4096
# Logit buffer of about 2**27 elements (256 MB in bf16): large enough that every cuBLAS product is
# efficient (C >= 1024 rows for V = 128256), small next to the 2 GB+ of the plain path.
_CHUNK_ELEMENTS = 2**27


@triton.jit
def _ce_rows(logits_ptr, row_stride, targets_ptr, loss_ptr, scale_ptr, n_vocab, softcap,
             HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    # ignore_index (-100) rows reach the kernel only where dropping them would wait for the GPU (CUDA
    # graph capture): they get no loss and a zero gradient row.
    counted = target >= 0
    target = tl.where(counted, target, 0)
    # Pass 1: running max m and sum of exp(z - m) over the row, per lane, merged at the end.
    m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_vocab
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, z)
        # Lanes past the vocabulary stay at -inf; shifting them by 0 instead of -inf keeps s = 0
        # where exp(-inf - -inf) would give NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(z - shift)
        m = m_new
    row_max = tl.max(m, axis=0)
    # lse = row_max + log_sum, kept apart: with logits spread over ~60, a float32 lse has lost the
    # low bits exp(x - lse) needs (dh error 1e-6 instead of the plain path's 5e-8)
    log_sum = tl.log(tl.sum(s * tl.exp(m - row_max), axis=0))
    zt = tl.load(base + target).to(tl.float32)
    if HAS_SOFTCAP:
        zt = softcap * tanh(zt / softcap)
    tl.store(loss_ptr + row, tl.where(counted, (row_max - zt) + log_sum, 0.0))
    if WRITE_GRAD:
        scale = tl.where(counted, tl.load(scale_ptr), 0.0)
        # Pass 2: dloss/dlogits, in place (each element is read before its slot is written).
        for start in range(0, n_vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_vocab
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                # d(cap tanh(x / cap))/dx = 1 - tanh^2 = 4 sigmoid(2x/cap) sigmoid(-2x/cap): no cancellation
                # where the cap saturates.
                sg = tl.sigmoid(2.0 * x / softcap)
                z = softcap * tanh(x / softcap)
                p = tl.exp((z - row_max) - log_sum)
                g = (p - tl.where(cols == target, 1.0, 0.0)) * (4.0 * sg * (1.0 - sg))
            else:
                g = tl.exp((x - row_max) - log_sum) - tl.where(cols == target, 1.0, 0.0)
            tl.store(base + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def _chunk_rows(n_vocab: int) -> int:
    return max(128, (_CHUNK_ELEMENTS // max(n_vocab, 1)) // 128 * 128)


def _ce_chunk(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor,
              softcap: float | None, write_grad: bool) -> None:
    n_rows, n_vocab = logits.shape
    block = min(_BLOCK_V, next_power_of_2(n_vocab))
    _ce_rows[(n_rows,)](logits, logits.stride(0), targets, loss, scale, n_vocab,
                        float(softcap) if softcap is not None else 1.0,
                        HAS_SOFTCAP=softcap is not None, WRITE_GRAD=write_grad, BLOCK_V=block,
                        num_warps=16 if block >= 4096 else 4)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc (+)= a @ b with acc in float32 and a, b in the model dtype, without a float32 copy of a or b.

    The first product overwrites acc (beta 0: cuBLAS does not read it), which saves zero-filling and
    reading a V x H float32 buffer once each (bench/KERNEL_NOTES.md, fused linear cross-entropy).
    """
    beta = 0.0 if first else 1.0
    if a.dtype == acc.dtype:
        torch.addmm(acc, a, b, beta=beta, out=acc)
    elif acc.is_cuda:
        # cuBLAS reads and writes the float32 C directly (addmm's out_dtype overload).
        torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
    else:
        torch.addmm(acc, a.float(), b.float(), beta=beta, out=acc)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Loss forward with gradients precomputed per chunk; the backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                softcap: float | None, num_items: int | torch.Tensor | None, chunk_size: int,
                grad_enabled: bool) -> torch.Tensor:
        n_tokens = hidden.shape[0]
        rows = None
        capturing = hidden.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing:
            # A CUDA graph (trainer.graphs) cannot wait for the GPU: every row goes through, the kernel
            # gives ignored ones no loss or gradient, and the caller has checked the target range.
            if num_items is None:
                num_items = (targets != IGNORE_INDEX).sum().clamp(min=1)
        else:
            # Rows with nothing to predict (prompt tokens under assistant-only labels, padding, the last
            # position) contribute neither loss nor gradient: drop them before the lm_head product. This
            # costs one host sync (nonzero) and saves their share of the three V x H products.
            counted = (targets != IGNORE_INDEX).nonzero().squeeze(1)
            if num_items is None:
                num_items = max(counted.numel(), 1)
            rows = counted if counted.numel() < n_tokens else None
        h_all, t_all = (hidden[rows], targets[rows]) if rows is not None else (hidden, targets)
        n_rows = h_all.shape[0]
        if n_rows and not capturing:
            # The row kernel reads logits[target] unchecked; F.cross_entropy raises on such a target.
            low, high = torch.stack((t_all.min(), t_all.max())).tolist()
            assert 0 <= low and high < weight.shape[0], f"targets outside [0, {weight.shape[0]}): {low}..{high}"
        # 1 / num_items as a device scalar the kernel reads, made without a host sync: filled from a
        # Python number (a copy from host memory would wait for the GPU) or computed from a tensor.
        if isinstance(num_items, torch.Tensor):
            scale = (1.0 / num_items.to(device=hidden.device, dtype=torch.float64)).float().reshape(1)
        else:
            scale = torch.full((1,), 1.0 / num_items, dtype=torch.float32, device=hidden.device)
        # forward() always runs with grad mode off; the caller's mode says whether a backward will follow.
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        grad_rows = torch.empty((n_rows, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device) if need_h else None
        # dW sums every chunk's product: a float32 accumulator keeps the sum to one final rounding.
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        # One logits buffer reused by every chunk: allocating per chunk held two at the peak (the next
        # chunk's product is allocated before the previous buffer is released; bench/KERNEL_NOTES.md, fused
        # linear cross-entropy).
        logits_buf = torch.empty((min(chunk_size, n_rows), weight.shape[0]), dtype=hidden.dtype, device=hidden.device)
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            h = h_all[start:end]
            logits = torch.mm(h, weight.t(), out=logits_buf[: end - start])
            _ce_chunk(logits, t_all[start:end], losses[start:end], scale, softcap, need_h or need_w)
            if need_h:
                torch.mm(logits, weight, out=grad_rows[start:end])
            if need_w:
                _accumulate(grad_w, logits.t(), h, first=start == 0)
        grad_h = grad_rows
        if need_h and rows is not None:
            grad_h = torch.zeros_like(hidden, memory_format=torch.contiguous_format).index_copy_(0, rows, grad_rows)
        if need_w:
            grad_w = grad_w.to(weight.dtype) if n_rows else torch.zeros_like(weight)
        ctx.save_for_backward(grad_h, grad_w)
        return losses.sum() / num_items

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # Scaling is a pass over grad_W (V x H): cheaper than a host sync to test grad_output == 1.
        if grad_h is not None:
            grad_h = grad_h * grad_output.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_output.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               softcap: float | None = None,
                               num_items_in_batch: int | torch.Tensor | None = None,
                               chunk_size: int | None = None) -> torch.Tensor:
    """causal_lm_loss(hidden @ weight.T, targets, ...) without materializing the logits.

    hidden [..., H], weight [V, H] (lm_head, no bias), targets [...] already shifted (ops.shift_targets),
    IGNORE_INDEX where nothing is predicted. chunk_size: tokens per chunk (default: a ~2**27-element
    logit buffer, at least 128 rows).
    """
    assert hidden.shape[:-1] == targets.shape, (hidden.shape, targets.shape)
    assert weight.dim() == 2 and weight.shape[1] == hidden.shape[-1], (weight.shape, hidden.shape)
    assert hidden.dtype == weight.dtype, (hidden.dtype, weight.dtype)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1).contiguous()
    chunk = chunk_size if chunk_size is not None else _chunk_rows(weight.shape[0])
    assert chunk > 0, chunk
    return FusedLinearCrossEntropyFunction.apply(h2, weight, t1, softcap, num_items_in_batch, chunk,
                                                 torch.is_grad_enabled())
