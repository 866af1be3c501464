"""llama.cpp's k-quants: the block formats (Q2_K ... Q6_K) and the mixes (Q4_K_M, ...) that pick one per tensor.

A k-quant block holds 256 values (a super-block) as small integer codes with per-sub-block
scales (and mins), themselves quantized against one or two f16 super-block scales. The
quantizers follow ggml-quants.c's reference ones (quantize_row_q*_K_ref, which is what
llama-quantize runs without an importance matrix) step for step, vectorized with torch over
every block of a chunk: each sequential search of the C code (the scale candidates of
make_qkx2_quants / make_qx_quants, the coordinate passes of make_q3_quants) becomes a loop
over candidates or positions whose body runs on all blocks at once. Sums run in a different
order than C's, so a block whose two best candidates tie to the last bit may pick the other.

Each quantizer returns the packed blocks and the values they decode to, computed from the
integer codes with the same float32 operations as gguf-py's dequantizers (the format test
compares the two).

`mix_types` is llama-quant.cpp's llama_tensor_get_type for the k-quant mixes (no importance
matrix, no MoE): which type each tensor of a model gets, including its fallbacks for rows
that are not a multiple of 256 long.
"""

from __future__ import annotations

import re

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType
QK_K = 256
# below this a sub-block counts as all zero (ggml-quants.c's GROUP_MAX_EPS)
GROUP_MAX_EPS = 1e-15
# quantize this many values at a time: the scale searches keep ~10 float32 temporaries of a chunk
CHUNK_VALUES = 1 << 22

MIXES = {
    "q2_k": (Q.Q2_K, gguf.LlamaFileType.MOSTLY_Q2_K),
    "q3_k_m": (Q.Q3_K, gguf.LlamaFileType.MOSTLY_Q3_K_M),
    "q4_k_s": (Q.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_S),
    "q4_k_m": (Q.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_s": (Q.Q5_K, gguf.LlamaFileType.MOSTLY_Q5_K_S),
    "q5_k_m": (Q.Q5_K, gguf.LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": (Q.Q6_K, gguf.LlamaFileType.MOSTLY_Q6_K),
}


# ---------------------------------------------------------------- scale searches


def _f32(v: float) -> float:
    """A constant as C computes it in float arithmetic (the candidate scales are float32 sums)."""
    return float(np.float32(v))


def _rdiv(num: float, t: torch.Tensor) -> torch.Tensor:
    """num / t as C divides. torch computes `python number / tensor` as number * (1 / t), one ulp off
    for about a quarter of inputs, and that ulp moves the codes landing on .5 (every sub-block's
    maximum on Q5_K's and Q2_K's first grid, nmax - 0.5): blocks identical to llama.cpp's on the
    same f16 values went from 84.3% to 99.4% (Q5_K) and 94.2% to 100% (Q2_K) with true division."""
    return torch.tensor(num, dtype=t.dtype, device=t.device) / t


def _scale_min_search(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants over the last axis: (scale, min, codes) with x ~ scale * code - min, codes in [0, nmax].

    Tries nstep + 1 stretched grids from the range; for each, the weighted least-squares scale and
    min of those codes; keeps the one with the lowest weighted error (squared, or absolute if use_mad).
    """
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True)
    flat = hi == lo
    one = torch.ones_like(hi)
    sum_w = w.sum(-1, keepdim=True)
    sum_x = (w * x).sum(-1, keepdim=True)

    def error(scale, codes, mn):
        diff = scale * codes + mn - x
        return (w * (diff.abs() if use_mad else diff * diff)).sum(-1, keepdim=True)

    iscale = _rdiv(nmax, torch.where(flat, one, hi - lo))
    scale = _rdiv(1, iscale)
    codes = torch.round(iscale * (x - lo)).clamp(0, nmax)
    best = error(scale, codes, lo)
    mn = lo
    for step in range(nstep + 1):
        # the C loop moves `min` to each better candidate's, so later grids start from it
        grid = _rdiv(_f32(_f32(rmin + _f32(_f32(rdelta) * step)) + nmax), torch.where(flat, one, hi - mn))
        cand = torch.round(grid * (x - mn)).clamp(0, nmax)
        wl = w * cand
        sum_l = wl.sum(-1, keepdim=True)
        sum_l2 = (wl * cand).sum(-1, keepdim=True)
        sum_xl = (wl * x).sum(-1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        err = error(this_scale, cand, this_min)
        better = (det > 0) & (err < best)
        codes = torch.where(better, cand, codes)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -mn, codes


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last axis (the first such, as C's strict > keeps)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))


def _symmetric_search(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants with rmse_type 1 (weights x**2): (scale, codes + nmax), x ~ scale * code, code in [-nmax, nmax).

    Tries the grid set by the largest magnitude and 18 stretched ones, keeps the best weighted fit.
    """
    mx = _signed_max(x)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x

    def fit(iscale):
        codes = torch.round(iscale * x).clamp(-nmax, nmax - 1)
        return codes, (w * x * codes).sum(-1, keepdim=True), (w * codes * codes).sum(-1, keepdim=True)

    codes, sumlx, suml2 = fit(_rdiv(-nmax, mx))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        cand, slx, sl2 = fit(_rdiv(-_f32(nmax + _f32(_f32(0.1) * step)), mx))
        better = (sl2 > 0) & (slx * slx > best * sl2)
        codes = torch.where(better, cand, codes)
        scale = torch.where(better, slx / sl2, scale)
        best = torch.where(better, scale * slx, best)
    codes = torch.where(zero, torch.full_like(codes, -nmax), codes)
    return torch.where(zero, torch.zeros_like(scale), scale), codes + nmax


def _q3_search(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants with do_rmse: (scale, codes + nmax), x ~ scale * code, code in [-nmax, nmax).

    Starts from the grid of the largest magnitude, then moves one code at a time to its best value
    for the others' fit (weights x**2) while that improves the fit, up to 5 passes. A row whose
    pass changed nothing stops in C; running its later passes here changes nothing either.
    """
    mx = _signed_max(x)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x
    codes = torch.round(_rdiv(-nmax, mx) * x).clamp(-nmax, nmax - 1)
    sumlx = (w * x * codes).sum(-1, keepdim=True)
    suml2 = (w * codes * codes).sum(-1, keepdim=True)
    for _ in range(5):
        for i in range(x.shape[-1]):
            xi, wi, li = x[..., i:i + 1], w[..., i:i + 1], codes[..., i:i + 1]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = torch.round(xi * sl2 / slx).clamp(-nmax, nmax - 1)
            slx = slx + wi * xi * new
            sl2 = sl2 + wi * new * new
            ok = ((sumlx - wi * xi * li) > 0) & (new != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            codes[..., i:i + 1] = torch.where(ok, new, li)
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    codes = torch.where(zero, torch.full_like(codes, -nmax), codes)
    return torch.where(zero, torch.zeros_like(scale), scale), codes + nmax


# ---------------------------------------------------------------- packing helpers


def _u8(t: torch.Tensor) -> torch.Tensor:
    """Integer-valued floats to bytes, wrapping as C's stores into uint8_t do."""
    return torch.remainder(t.to(torch.int32), 256).to(torch.uint8)


def _f16_bytes(t: torch.Tensor) -> torch.Tensor:
    """[n, 1] float16 -> its 2 little-endian bytes per row."""
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], 2)


def _bits(codes: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """Pack `groups` slices along axis 1 of [n, groups, m] into one byte each, `width` bits apart."""
    shifts = torch.arange(groups, device=codes.device, dtype=torch.uint8).mul_(width).view(1, groups, 1)
    return (codes.to(torch.uint8) << shifts).sum(1, dtype=torch.uint8)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K's 12 bytes holding 8 six-bit scales and 8 six-bit mins (get_scale_min_k4's layout)."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    return torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                      (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], dim=1)


# ---------------------------------------------------------------- block quantizers: x [n, 256] float32


def _q4_q5_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """quantize_row_q4_K_ref / q5_K_ref: 8 sub-blocks of 32, x ~ d*sc*q - dmin*m with 6-bit sc, m."""
    n = x.shape[0]
    sub = x.view(n, 8, 32)
    rms = ((sub * sub).sum(-1, keepdim=True) / 32).sqrt()
    scales, mins, search_codes = _scale_min_search(sub, rms + sub.abs(), nmax, rmin, 0.1, nstep, False)
    max_scale = scales.amax(1).clamp(min=0)
    max_min = mins.amax(1).clamp(min=0)
    inv_scale = torch.where(max_scale > 0, _rdiv(63, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _rdiv(63, max_min), torch.zeros_like(max_min))
    ls = _u8(torch.round(inv_scale[:, :, None] * scales)).clamp(max=63)
    lm = _u8(torch.round(inv_min[:, :, None] * mins)).clamp(max=63)
    d = (max_scale / 63).half()
    dmin = (max_min / 63).half()
    dl = d.float()[:, :, None] * ls.float()
    ml = dmin.float()[:, :, None] * lm.float()
    codes = torch.round((sub + ml) / dl).clamp(0, nmax)
    codes = torch.where(dl == 0, search_codes, codes).to(torch.uint8)
    values = (dl * codes.float() - ml).view(n, QK_K)
    head = [_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k4(ls.view(n, 8), lm.view(n, 8))]
    low = (codes & 0xF).view(n, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    if nmax == 15:
        return torch.cat([*head, qs], dim=1), values
    qh = _bits((codes >> 4).view(n, 8, 32), 8, 1)
    return torch.cat([*head, qh, qs], dim=1), values


def _q4_k(x):
    return _q4_q5_k(x, 15, -1.0, 20)


def _q5_k(x):
    return _q4_q5_k(x, 31, -0.5, 15)


def _q6_k(x: torch.Tensor):
    """quantize_row_q6_K_ref: 16 sub-blocks of 16, x ~ d*sc*(q - 32) with int8 sc."""
    n = x.shape[0]
    sub = x.view(n, 16, 16)
    scales, search_codes = _symmetric_search(sub, 32)
    max_scale = _signed_max(scales.view(n, 16))
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = _rdiv(-128, torch.where(zero, torch.ones_like(max_scale), max_scale))
    d = torch.where(zero, torch.zeros_like(iscale), _rdiv(1, iscale)).half()
    sc = torch.round(iscale[:, :, None] * scales).clamp(max=127)
    sc = torch.where(zero[:, :, None], torch.zeros_like(sc), sc)
    dl = d.float()[:, :, None] * sc
    codes = torch.round(sub / dl).clamp(-32, 31) + 32
    codes = torch.where(dl == 0, search_codes, codes)
    codes = torch.where(zero[:, :, None], torch.zeros_like(codes), codes).to(torch.uint8)
    values = (dl * (codes.float() - 32)).view(n, QK_K)
    c = codes.view(n, 2, 4, 32)
    ql = torch.cat([(c[:, :, 0] & 0xF) | ((c[:, :, 2] & 0xF) << 4),
                    (c[:, :, 1] & 0xF) | ((c[:, :, 3] & 0xF) << 4)], dim=2).reshape(n, 128)
    qh = _bits((c >> 4).reshape(n * 2, 4, 32), 4, 2).reshape(n, 64)
    sc_bytes = sc.reshape(n, 16).to(torch.int8).view(torch.uint8)
    return torch.cat([ql, qh, sc_bytes, _f16_bytes(d)], dim=1), values


def _q3_k(x: torch.Tensor):
    """quantize_row_q3_K_ref: 16 sub-blocks of 16, x ~ d*(sc - 32)*(q - 4) with 6-bit sc."""
    n = x.shape[0]
    sub = x.view(n, 16, 16)
    scales, search_codes = _q3_search(sub, 4)
    max_scale = _signed_max(scales.view(n, 16))
    nonzero = max_scale != 0
    iscale = _rdiv(-32, torch.where(nonzero, max_scale, torch.ones_like(max_scale)))
    ls = torch.round(iscale[:, :, None] * scales).clamp(-32, 31) + 32
    ls = torch.where(nonzero[:, :, None], ls, torch.zeros_like(ls)).view(n, 16).to(torch.uint8)
    d = torch.where(nonzero, _rdiv(1, iscale), torch.zeros_like(iscale)).half()
    dl = d.float()[:, :, None] * (ls.float() - 32).view(n, 16, 1)
    codes = torch.round(sub / dl).clamp(-4, 3) + 4
    codes = torch.where(dl == 0, search_codes, codes).to(torch.uint8)
    values = (dl * (codes.float() - 4)).view(n, QK_K)
    flat = codes.view(n, QK_K)
    hmask = _bits((flat >> 2).view(n, 8, 32), 8, 1)
    qs = _bits((flat & 3).view(n * 2, 4, 32), 4, 2).reshape(n, 64)
    sc_bytes = torch.cat([(ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4), _bits((ls >> 4).view(n, 4, 4), 4, 2)], dim=1)
    return torch.cat([hmask, qs, sc_bytes, _f16_bytes(d)], dim=1), values


def _q2_k(x: torch.Tensor):
    """quantize_row_q2_K_ref: 16 sub-blocks of 16, x ~ d*sc*q - dmin*m with 4-bit sc, m and q in 0..3."""
    n = x.shape[0]
    sub = x.view(n, 16, 16)
    scales, mins, search_codes = _scale_min_search(sub, sub.abs(), 3, -0.5, 0.1, 15, True)
    max_scale = scales.amax(1).clamp(min=0)
    max_min = mins.amax(1).clamp(min=0)
    has_scale, has_min = max_scale > 0, max_min > 0
    one = torch.ones_like(max_scale)
    ls = torch.round(_rdiv(15, torch.where(has_scale, max_scale, one))[:, :, None] * scales)
    lm = torch.round(_rdiv(15, torch.where(has_min, max_min, one))[:, :, None] * mins)
    ls = torch.where(has_scale[:, :, None], ls, torch.zeros_like(ls))
    lm = torch.where(has_min[:, :, None], lm, torch.zeros_like(lm))
    sc_bytes = _u8(ls) | (_u8(lm) << 4)
    d = torch.where(has_scale, max_scale / 15, torch.zeros_like(max_scale)).half()
    dmin = torch.where(has_min, max_min / 15, torch.zeros_like(max_min)).half()
    dl = d.float()[:, :, None] * (sc_bytes & 0xF).float()
    ml = dmin.float()[:, :, None] * (sc_bytes >> 4).float()
    codes = torch.round((sub + ml) / dl).clamp(0, 3)
    codes = torch.where(dl == 0, search_codes, codes).to(torch.uint8)
    values = (dl * codes.float() - ml).view(n, QK_K)
    qs = _bits(codes.view(n * 2, 4, 32), 4, 2).reshape(n, 64)
    return torch.cat([sc_bytes.view(n, 16), qs, _f16_bytes(d), _f16_bytes(dmin)], dim=1), values


QUANTIZERS = {Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}


def quantize_blocks(x: torch.Tensor, qtype: Q) -> tuple[torch.Tensor, torch.Tensor]:
    """Super-blocks x [n, 256] (float32) -> (packed blocks [n, bytes] uint8, the values they decode to [n, 256])."""
    assert x.dim() == 2 and x.shape[1] == QK_K, x.shape
    packed, values = QUANTIZERS[qtype](x.float().contiguous())
    assert packed.shape[1] == gguf.GGML_QUANT_SIZES[qtype][1]
    return packed, values


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantize(arr: np.ndarray, qtype: Q, device: torch.device | None = None,
             chunk_values: int = CHUNK_VALUES) -> np.ndarray:
    """float32 array [..., n] (n a multiple of 256) -> the bytes GGUF stores, [..., n // 256 * block bytes]."""
    device = device or default_device()
    blocks = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    step = max(1, chunk_values // QK_K)
    for i in range(0, blocks.shape[0], step):
        packed, _ = quantize_blocks(blocks[i:i + step].to(device), qtype)
        out[i:i + step] = packed.cpu().numpy()
    return out.reshape(gguf.quants.quant_shape_to_byte_shape(arr.shape, qtype))


# ---------------------------------------------------------------- mixes: llama_tensor_get_type


def _tensor_suffix(t: gguf.MODEL_TENSOR) -> str:
    return gguf.TENSOR_NAMES[t].removeprefix("blk.{bid}.")


OUTPUT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
TOKEN_EMBD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
# llama.cpp's tensor categories match name fragments, in this order (tensor_get_category)
_CATEGORIES = [(_tensor_suffix(t) + suffix, t) for t, suffix in [
    (gguf.MODEL_TENSOR.ATTN_QKV, ".weight"), (gguf.MODEL_TENSOR.ATTN_V, ".weight"),
    (gguf.MODEL_TENSOR.ATTN_K, ".weight"), (gguf.MODEL_TENSOR.ATTN_Q, ".weight"),
    (gguf.MODEL_TENSOR.ATTN_OUT, ".weight"), (gguf.MODEL_TENSOR.FFN_UP, ""),
    (gguf.MODEL_TENSOR.FFN_GATE, ""), (gguf.MODEL_TENSOR.FFN_DOWN, "")]]
_ATTN_V_LIKE = (gguf.MODEL_TENSOR.ATTN_QKV, gguf.MODEL_TENSOR.ATTN_V)
# what llama-quantize stores instead when a row is not a multiple of the type's block (tensor_type_fallback)
FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


def _category(name: str) -> gguf.MODEL_TENSOR | None:
    if name == OUTPUT:
        return gguf.MODEL_TENSOR.OUTPUT
    if name == TOKEN_EMBD:
        return gguf.MODEL_TENSOR.TOKEN_EMBD
    return next((t for fragment, t in _CATEGORIES if fragment in name), None)


def _use_more_bits(i: int, n: int) -> bool:
    """The layers Q4_K_M / Q5_K_M give Q6_K: the first and last eighth, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _block(qtype: Q) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def fallback(qtype: Q, n_cols: int) -> Q:
    """The type llama.cpp stores when rows of n_cols do not fit `qtype`'s blocks (F16 if none fits)."""
    if n_cols % _block(qtype) == 0:
        return qtype
    qtype = FALLBACK.get(qtype, qtype)
    return qtype if n_cols % _block(qtype) == 0 else Q.F16


def _mix_choice(mix: str, category, base: Q, n_cols: int, i: int, n: int, n_gqa: int, tied: bool,
                is_70b: bool) -> Q:
    cat = gguf.MODEL_TENSOR
    if category == cat.OUTPUT or (tied and category == cat.TOKEN_EMBD):
        return Q.Q8_0 if n_cols % _block(base) else Q.Q6_K
    if category in _ATTN_V_LIKE:
        new = base
        if mix == "q2_k":
            new = Q.Q4_K if n_gqa >= 4 else Q.Q3_K
        elif mix == "q3_k_m":
            new = Q.Q5_K if i < 2 else Q.Q4_K
        elif mix in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
            new = Q.Q6_K
        elif mix == "q4_k_s" and i < 4:
            new = Q.Q5_K
        # 70B's attn_v is 8x smaller than attn_q (8 heads share it): more bits for almost no size
        return Q.Q5_K if is_70b and new in (Q.Q3_K, Q.Q4_K) else new
    if category == cat.FFN_DOWN:
        if mix == "q2_k":
            return Q.Q3_K
        if mix == "q3_k_m":
            return Q.Q5_K if i < n // 16 else Q.Q4_K
        if mix in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
            return Q.Q6_K
        if mix == "q4_k_s" and i < n // 8:
            return Q.Q5_K
        return base
    if category == cat.ATTN_OUT:
        return {"q2_k": Q.Q3_K, "q3_k_m": Q.Q4_K}.get(mix, base)
    return base


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def mix_types(mix: str, tensors: list[tuple[str, int]], *, n_layer: int, n_head: int, n_head_kv: int,
              arch: gguf.MODEL_ARCH) -> dict[str, Q]:
    """llama.cpp's type for each quantizable tensor (GGUF name, row length) under `mix` (a key of MIXES).

    Walks the tensors in llama.cpp's order (by layer, then name), counting attn_v-like and
    ffn_down tensors as it does, since "which layer" in its rules is that count.
    """
    base = MIXES[mix][0]
    tied = not any(name == OUTPUT for name, _ in tensors)
    is_70b = n_layer == 80 and ((arch == gguf.MODEL_ARCH.LLAMA and n_head != n_head_kv)
                                or arch == gguf.MODEL_ARCH.QWEN2)
    n_attn_v = sum(_category(name) in _ATTN_V_LIKE for name, _ in tensors)
    i_attn_v = i_ffn_down = 0
    types = {}
    for name, n_cols in sorted(tensors, key=lambda t: (_layer(t[0]), t[0])):
        category = _category(name)
        if category in _ATTN_V_LIKE:
            i, n = i_attn_v, n_attn_v
            i_attn_v += 1
        elif category == gguf.MODEL_TENSOR.FFN_DOWN:
            i, n = i_ffn_down, n_layer
            i_ffn_down += 1
        else:
            i, n = 0, n_layer
        choice = _mix_choice(mix, category, base, n_cols, i, n, n_head // n_head_kv, tied, is_70b)
        types[name] = fallback(choice, n_cols)
    return types
