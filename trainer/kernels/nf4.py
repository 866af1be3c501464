"""Dequantize a bitsandbytes 4-bit weight (NF4 or FP4, with or without double quantization) in one launch.

bitsandbytes' own path for a double-quantized weight is three steps: dequantize_blockwise(absmax codes,
state2) (a kernel and a float32 allocation), `+ offset` (a second kernel), then dequantize_4bit. This
kernel reads the packed codes, the uint8 absmax codes, state2's float32 absmax and 256-entry code, and
the offset, and writes the weight into a given tensor: one launch, no intermediate absmax.

The values are bitsandbytes' bit for bit (tests/kernels/test_nf4.py compares with dequantize_4bit
exactly). Layout, as bnb packs it: element 2i is the high nibble of byte i, element 2i+1 the low one;
elements are numbered flat over the logical [out, in] shape, and element e belongs to absmax block
e // blocksize. With double quantization absmax block b is stored as a uint8 code and its scale is

    scale[b] = code2[absmax_u8[b]] * absmax2[b // blocksize2] + offset

in float32, rounded after the product and again after the sum, as bnb's dequantize_blockwise followed
by `+= offset` does; the launch turns off Triton's mul+add -> fma contraction so that holds on a GPU.
Then value = code[nibble] * scale[b] in float32, rounded once to the output dtype.

Design: one program per ROWS whole absmax blocks, as a [ROWS, blocksize/2] tile of packed bytes, so a
scale is computed once per block (a row) and broadcast over its bytes; the two nibbles' values are
interleaved into a [ROWS, blocksize] tile and stored contiguously. The 16-entry code table is read
with a gather from global memory (64 bytes, cached), not a compare tree: a gather is one load per
element, a tree of tl.where about 20 ALU operations. A program covers elements_per_program output
elements (one whole block when a block is larger); the tail past the last element is masked, so any
element count works, including an odd one (the last byte's low nibble is padding).

Under TRITON_INTERPRET=1 a float32 -> bfloat16 cast truncates (numpy has no bfloat16), so there the
kernel rounds to nearest even with integer operations on the float32 bits and stores the 16-bit
pattern; on a GPU it uses the hardware conversion, which rounds to nearest even.

It takes less GPU time than bnb's three steps (bench/nf4_dequant.py). The host time matters as much: a training step makes about 2,300 of these calls, and the
step is partly host-bound. So the arguments of each weight's launch are worked out and checked once and
kept (keyed weakly by the weight, so they go with it); a call then costs the Triton launch itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from trainer.kernels.triton_math import INTERPRETED, cdiv, e4m3_bits

_ELEMENTS = 4096  # output elements per program (a power of two)
_WARPS = 4
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # those bnb's quantize_4bit accepts
# Verified bit for bit against bnb's CUDA kernels on the H100 (bnb's default 4-bit blocksize is 64). At 256
# the GPU test run stopped with "CUDA error: misaligned address" (not investigated yet), so larger
# blocksizes keep bitsandbytes' own path in dense_weight; the interpreter (CI) passes them all.
NF4_GPU_BLOCKSIZES = (32, 64, 128)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)

_CODES: dict[tuple[str, torch.device], torch.Tensor] = {}
# weight -> (the quant state, {(out dtype, out shape, elements_per_program, num_warps, row_scale's address):
# (grid, arguments after the packed codes and before out, sizes, constexpr keywords)}). Nothing in a value
# refers to the weight itself (the quant state does not), or the entry would keep its key alive.
_LAUNCHES = WeakIdKeyDictionary()  # by identity: a tensor's == compares elements


@triton.jit
def _dequantize_4bit(packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, row_scale_ptr, out_ptr,
                     n_elements, n_blocks, n_cols, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                     ROWS: tl.constexpr, NESTED: tl.constexpr, ROW_SCALED: tl.constexpr,
                     BF16_BY_BITS: tl.constexpr, E4M3_BY_BITS: tl.constexpr):
    HALF: tl.constexpr = BLOCKSIZE // 2
    blocks = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # absmax block of each row
    block_mask = blocks < n_blocks
    if NESTED:
        q = tl.load(absmax_ptr + blocks, mask=block_mask, other=0).to(tl.int32)
        absmax2 = tl.load(absmax2_ptr + blocks // BLOCKSIZE2, mask=block_mask, other=0.0)
        scale = tl.load(code2_ptr + q) * absmax2 + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blocks, mask=block_mask, other=0.0).to(tl.float32)
    byte_idx = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
    packed = tl.load(packed_ptr + byte_idx, mask=byte_idx < (n_elements + 1) // 2, other=0,
                     eviction_policy="evict_first").to(tl.int32)
    high = tl.load(code_ptr + (packed >> 4), eviction_policy="evict_last") * scale[:, None]
    low = tl.load(code_ptr + (packed & 15), eviction_policy="evict_last") * scale[:, None]
    values = tl.interleave(high, low)  # [ROWS, BLOCKSIZE]: element 2i from the high nibble of byte i
    elem_idx = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    mask = elem_idx < n_elements
    if ROW_SCALED:  # times the output row's scale (rounded again): a block lies within one row
        row_scale = tl.load(row_scale_ptr + blocks * BLOCKSIZE // n_cols, mask=block_mask, other=0.0)
        values = values * row_scale[:, None]
    if E4M3_BY_BITS:
        tl.store(out_ptr + elem_idx, e4m3_bits(values), mask=mask)
    elif BF16_BY_BITS:
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even (finite inputs)
        tl.store(out_ptr + elem_idx, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + elem_idx, values.to(out_ptr.dtype.element_ty), mask=mask)


def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16 float32 values of quant_type as bitsandbytes' kernels use them (its quant_state.code may be absent
    or elsewhere; bnb's dequantize_4bit ignores it too)."""
    key = (quant_type, device)
    if key not in _CODES:
        from bitsandbytes.functional import get_4bit_type

        _CODES[key] = get_4bit_type(quant_type, device=device).float().contiguous()
    return _CODES[key]


def dequantize_nf4(weight: torch.Tensor, quant_state, out: torch.Tensor, *, row_scale: torch.Tensor | None = None,
                   elements_per_program: int = _ELEMENTS, num_warps: int = _WARPS) -> torch.Tensor:
    """Write the bitsandbytes 4-bit weight `weight` (packed codes, e.g. a Params4bit) with its QuantState into
    `out` ([*quant_state.shape], bf16/fp16/fp32, contiguous) and return `out`: the values of
    bitsandbytes.functional.dequantize_4bit, bit for bit. NF4 or FP4, double-quantized (nested) or not.

    With `row_scale` (float32, one per output row) each value is multiplied by its row's entry in float32
    before the cast; out may then be float8_e4m3fn (trainer.kernels.fp8: row_scale = 448 / row_absmax).

    elements_per_program (a power of two) and num_warps set the launch shape; bench/nf4_dequant.py sweeps them.
    """
    key = (out.dtype, out.shape, elements_per_program, num_warps, None if row_scale is None else row_scale.data_ptr())
    launches = _LAUNCHES.get(weight)
    if launches is None or launches[0] is not quant_state:
        launches = _LAUNCHES[weight] = (quant_state, {})
    launch = launches[1].get(key)
    if launch is None:  # one per key: the forward (e4m3) and the backward (bf16) alternate on one weight
        launch = launches[1][key] = _launch(weight, quant_state, out, row_scale, elements_per_program, num_warps)
    grid, args, sizes, meta = launch
    if grid is not None:
        assert out.is_contiguous() and out.device == weight.device, "out: contiguous, on the weight's device"
        packed = weight if weight.dtype == torch.uint8 else weight.view(torch.uint8)  # any quant_storage dtype
        target = out.view(torch.uint8) if meta["E4M3_BY_BITS"] else out
        _dequantize_4bit[grid](packed, *args, target, *sizes, **meta)
    return out


def block_scales(quant_state) -> torch.Tensor:
    """Each absmax block's scale in float32; a nested absmax dequantized as bitsandbytes does
    (dequantize_blockwise, then + offset), which the kernel matches bit for bit."""
    qs = quant_state
    if not qs.nested:
        return qs.absmax.float()
    import bitsandbytes.functional as bnbf

    return (bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()


def row_absmax(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """The largest magnitude dequantize_nf4 can write in each output row, float32 [rows]: the row's largest
    block scale times the code's largest magnitude (1 for nf4 and fp4). Exact when that code occurs in
    the row, as it does after bnb's quantize_4bit (each block's largest element becomes +-1); never below.
    Needs no dequantized matrix: the block scales alone (block_scales)."""
    qs = quant_state
    rows, cols = qs.shape
    # abs: a nested scale can dequantize below zero (a block far smaller than the mean, whose 8-bit
    # quantization error is larger than itself); its values then carry the flipped sign, and their
    # magnitudes that scale's
    absmax = block_scales(qs)[:cdiv(rows * cols, qs.blocksize)].abs()
    code_max = _code(qs.quant_type, absmax.device).abs().max()
    if cols % qs.blocksize:  # blocks straddle rows: the whole matrix's largest for every row
        return (absmax.max() * code_max).expand(rows).contiguous()
    return absmax.view(rows, cols // qs.blocksize).amax(dim=1) * code_max


def _launch(weight: torch.Tensor, quant_state, out: torch.Tensor, row_scale: torch.Tensor | None,
            elements_per_program: int, num_warps: int):
    """(grid, arguments between the codes and out, (n, n_blocks, n_cols), constexpr keywords) of weight's launch,
    after checking that the kernel handles it; grid None when there is nothing to write."""
    qs = quant_state
    assert qs.quant_type in ("nf4", "fp4"), f"quant_type {qs.quant_type!r}: only bitsandbytes' nf4 and fp4"
    assert qs.blocksize in _BLOCKSIZES, f"blocksize {qs.blocksize}: bitsandbytes uses {_BLOCKSIZES}"
    assert out.dtype in _DTYPES, f"output dtype {out.dtype}: one of {_DTYPES}"
    assert tuple(out.shape) == tuple(qs.shape), (tuple(out.shape), tuple(qs.shape))
    assert out.is_contiguous() and weight.is_contiguous()
    assert weight.device == out.device, (weight.device, out.device)
    assert weight.is_cuda or INTERPRETED, "the Triton kernel needs a GPU (or TRITON_INTERPRET=1 at import)"
    assert elements_per_program & (elements_per_program - 1) == 0, elements_per_program
    packed = weight if weight.dtype == torch.uint8 else weight.view(torch.uint8)  # any quant_storage dtype
    n = out.numel()
    n_blocks = cdiv(n, qs.blocksize)
    assert packed.numel() >= (n + 1) // 2, (packed.numel(), n)
    assert qs.absmax.numel() >= n_blocks, (qs.absmax.numel(), n_blocks)
    if n == 0:
        return None, (), (), {}
    e4m3 = out.dtype == torch.float8_e4m3fn
    assert row_scale is not None or not e4m3, "an e4m3 output needs row_scale (448 / row_absmax)"
    if row_scale is not None:
        # a block straddling two rows (in_features not a multiple of the blocksize) takes its first row's
        # scale: row_absmax then gives every row the same one
        assert row_scale.dtype == torch.float32 and row_scale.is_contiguous(), (row_scale.dtype, row_scale.stride())
        assert row_scale.shape == (qs.shape[0],) and row_scale.device == out.device, (row_scale.shape, qs.shape)
    code = _code(qs.quant_type, out.device)
    if qs.nested:
        s2 = qs.state2
        assert qs.absmax.dtype == torch.uint8, qs.absmax.dtype
        # bnb dequantizes the absmax codes in state2.dtype; float32 is what quantize_4bit stores.
        assert s2.dtype in (None, torch.float32) and s2.absmax.dtype == s2.code.dtype == torch.float32
        offset = qs.offset if torch.is_tensor(qs.offset) else torch.tensor(qs.offset, device=out.device)
        assert offset.dtype == torch.float32 and offset.numel() == 1, (offset.dtype, offset.shape)
        args = (qs.absmax, code, s2.code, s2.absmax, offset)
        blocksize2 = s2.blocksize
    else:
        args = (qs.absmax, code, code, code, code)  # placeholders: NESTED=False never reads the last three
        blocksize2 = 1
    rows = max(1, elements_per_program // qs.blocksize)
    args = (*args, code if row_scale is None else row_scale)  # placeholder: ROW_SCALED=False never reads it
    meta = dict(BLOCKSIZE=qs.blocksize, BLOCKSIZE2=blocksize2, ROWS=rows, NESTED=qs.nested,
                ROW_SCALED=row_scale is not None, BF16_BY_BITS=INTERPRETED and out.dtype == torch.bfloat16,
                E4M3_BY_BITS=INTERPRETED and e4m3, num_warps=num_warps, enable_fp_fusion=False)
    return (cdiv(n_blocks, rows),), args, (n, n_blocks, qs.shape[-1]), meta
