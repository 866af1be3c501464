"""The buffers and caches behind the LoRA-fused Functions (trainer.kernels.lora_projection, lora_mlp).

Dense weights. A Function does not save W for its backward: dense_weight dequantizes an NF4 weight (or
casts a 16-bit one) into one workspace per (device, dtype), sized for the largest matrix and shared by
every layer (the layers run one after another on one stream, so a matrix is dead before the next layer
dequantizes into the same memory), and the backward dequantizes it again; the plain bitsandbytes path
allocates and frees a fresh one per call. fp8_weight does the same in e4m3 with per-row scales, which it
computes once per weight (the base is frozen).

Factor casts. Under torch.autocast the float32 LoRA factors are cast to the autocast dtype; inside
cached_factor_casts (trainer.loop.train_step opens it for each optimizer step) once per step instead of
once per use (_cast, _stacked_cast).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from trainer.kernels.fp8 import E4M3
from trainer.kernels.nf4 import NF4_GPU_BLOCKSIZES, block_scales, dequantize_nf4, row_absmax
from trainer.kernels.triton_math import E4M3_MAX, INTERPRETED

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
