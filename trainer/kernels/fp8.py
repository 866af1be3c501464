"""FP8 (e4m3) operands for the frozen base products: activations scaled per row, cast in one pass.

With `--fp8` the forward products x W^T of NF4 base layers (the forward and the checkpointed recompute)
run as torch._scaled_mm on float8_e4m3fn operands; the backward stays in bf16 (its products need the weight
transposed, a second e4m3 copy per use: not built). x gets one float32 scale per row (its largest magnitude
/ 448, so the row fills e4m3's range); W one per output row, from its NF4 block scales (trainer.kernels.nf4
writes it in e4m3 directly, one byte per element where bf16 takes two). The product comes back in bf16
with both scales applied in the matmul's epilogue.

Casting with plain torch ops costs more than the e4m3 product saves, hence these one-pass kernels
(per-product timings: bench/KERNEL_NOTES.md, FP8 forward products; the training step: bench/README.md,
FP8 forward products).

What it costs in accuracy: e4m3 keeps 3 mantissa bits, so each operand carries up to 1/16 relative
rounding error (bf16: 1/256). The measured product and loss errors are in bench/README.md (FP8 forward
products, accuracy); tests/kernels/test_fp8.py bounds them through the tiny test decoder.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trainer.kernels.triton_math import E4M3_MAX, INTERPRETED, e4m3_bits, next_power_of_2

E4M3 = torch.float8_e4m3fn
# Rows up to this many columns are read once and kept in registers (Llama-3-8B's down input is 14336 wide;
# read twice, the cast is bandwidth-bound: bench/KERNEL_NOTES.md, FP8 forward products); wider ones are
# read twice.
_ONE_PASS_MAX = 16384
_BLOCK_MAX = 4096  # columns per loop iteration of the two-pass form
_E4M3_MAX_C = tl.constexpr(E4M3_MAX)  # a jitted function reads a global only as a constexpr


@triton.jit
def _store_e4m3(ptrs, v, mask, BY_BITS: tl.constexpr):
    """float32 v into e4m3 memory: the hardware cast, or under the interpreter its bits (ptrs then uint8)."""
    if BY_BITS:
        tl.store(ptrs, e4m3_bits(v), mask=mask)
    else:
        tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_rows(x_ptr, out_ptr, scale_ptr, n_cols, x_row_stride, out_row_stride, BLOCK: tl.constexpr,
                   ONE_PASS: tl.constexpr, BY_BITS: tl.constexpr):
    """One program per row: m = max |x|, out = e4m3(x * (448 / m)), scale = m / 448 (float32, rounded
    divisions: Triton's default float32 division is approximate). ONE_PASS: the row fits in one BLOCK and
    stays in registers between its maximum and its cast (read once); otherwise it is read twice."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    out_row = out_ptr + row * out_row_stride
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        m = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-12)  # an all-zero row (padding) gets a harmless scale
        tl.store(scale_ptr + row, tl.math.div_rn(m, _E4M3_MAX_C))
        _store_e4m3(out_row + cols, v * tl.math.div_rn(_E4M3_MAX_C, m), mask, BY_BITS)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        m = tl.maximum(tl.max(amax, axis=0), 1e-12)
        inv = tl.math.div_rn(_E4M3_MAX_C, m)
        tl.store(scale_ptr + row, tl.math.div_rn(m, _E4M3_MAX_C))
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            _store_e4m3(out_row + cols, tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32) * inv, mask, BY_BITS)


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x2 in e4m3 scaled per row, the row scales [rows, 1] float32) for a 2-D x2 with unit column stride,
    so that x2 ~ out * scale: the operand and scale_a of torch._scaled_mm."""
    assert x2.dim() == 2 and x2.stride(1) == 1, (x2.shape, x2.stride())
    assert x2.is_cuda or INTERPRETED, "the Triton kernel needs a GPU (or TRITON_INTERPRET=1 at import)"
    n_rows, n_cols = x2.shape
    out = torch.empty((n_rows, n_cols), dtype=E4M3, device=x2.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x2.device)
    if n_rows and n_cols:
        one_pass = n_cols <= _ONE_PASS_MAX
        block = next_power_of_2(n_cols) if one_pass else _BLOCK_MAX
        target = out.view(torch.uint8) if INTERPRETED else out
        _quantize_rows[(n_rows,)](x2, target, scale, n_cols, x2.stride(0), out.stride(0), BLOCK=block,
                                  ONE_PASS=one_pass, BY_BITS=INTERPRETED,
                                  num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4)
    return out, scale
