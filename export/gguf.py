"""GGUF export for llama.cpp, straight from the merged tensors (no 16-bit checkpoint on disk).

Every tensor's name, shape and type is declared first (gguf.GGUFWriter.add_tensor_info), then
the header, metadata and tensor infos are written and each tensor is merged, converted,
quantized and written in turn, so memory holds one tensor at a time.

Types follow llama.cpp's converter: 1-D tensors (norms, biases) stay F32; 2-D weights take
the requested type. f16 is numpy's float16 cast; bf16, q8_0 and q4_0 use gguf's numpy
quantizers (gguf.quants.quantize). Rows whose length is not a multiple of the 32-wide
quant block fall back to F16 as in the converter. For q4_0 the output projection (or
token_embd where it doubles as the output) is stored as Q8_0: llama-quantize uses Q6_K
there, and 4-bit output layers cost much more quality.

The k-quant mixes (q4_k_m, q6_k, ...) give each 2-D weight the type llama-quantize would
(export.kquants.mix_types) and quantize K-types with our torch port of llama.cpp's quantizers
(export.kquants.quantize); their 32-wide fallbacks (Q4_0, Q5_0, Q5_1, Q8_0) use gguf's.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from export import kquants
from export.errors import UnsupportedError
from export.gguf_arch import (
    SKIPPED_SUFFIXES,
    arch_of,
    extra_tensors,
    family_of,
    tensor_name,
    to_llama_cpp_layout,
    write_hparams,
)
from export.gguf_vocab import build_vocab
from export.output import atomic_output
from export.source import Source, open_source

Q = gguf.GGMLQuantizationType
QUANTS = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    **kquants.MIXES,
}
# quantize this many values at a time: gguf's quantizers make several float32 temporaries
CHUNK_VALUES = 1 << 24


def _tensor_type(gguf_name: str, shape: tuple[int, ...], qtype: Q, tied_output: bool) -> Q:
    if len(shape) <= 1 or not gguf_name.endswith(".weight"):
        return Q.F32
    if qtype in (Q.F32, Q.F16, Q.BF16):
        return qtype
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
        return Q.F16
    output = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    if qtype == Q.Q4_0 and (gguf_name == output or (tied_output and gguf_name == embd)):
        return Q.Q8_0
    return qtype


def _convert(arr: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 array -> the bytes (or float array) GGUF stores for `qtype`, chunked over rows."""
    if qtype == Q.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == Q.F16:
        return arr.astype(np.float16)
    if qtype in kquants.QUANTIZERS:
        return kquants.quantize(arr, qtype)
    rows = arr.reshape(-1, arr.shape[-1])
    out = np.empty(gguf.quants.quant_shape_to_byte_shape(rows.shape, qtype), dtype=np.uint8)
    step = max(1, CHUNK_VALUES // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        out[i:i + step] = gguf.quants.quantize(rows[i:i + step], qtype)
    return out.reshape(gguf.quants.quant_shape_to_byte_shape(arr.shape, qtype))


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


def _plan(src: Source, name_map: gguf.TensorNameMap, quant: str, family) -> list[tuple[str, str, tuple, Q]]:
    """(hf name, gguf name, numpy shape, type) for every tensor of the model, in file order."""
    names = [n for n in src.tensor_names() if not n.endswith(SKIPPED_SUFFIXES)
             and not (family.drop_lm_head and n == "lm_head.weight")]
    output = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    mapped = [(n, tensor_name(name_map, n), tuple(src.shape(n))) for n in names]
    qtype = QUANTS[quant][0]
    if quant in kquants.MIXES:
        config = src.config
        weights = [(g, s[-1]) for _, g, s in mapped if _tensor_type(g, s, Q.F16, False) != Q.F32]
        types = kquants.mix_types(quant, weights, n_layer=config["num_hidden_layers"],
                                  n_head=config["num_attention_heads"],
                                  n_head_kv=config.get("num_key_value_heads") or config["num_attention_heads"],
                                  arch=arch_of(family))
        return [(n, g, s, types.get(g, Q.F32)) for n, g, s in mapped]
    tied_output = not any(g == output for _, g, _ in mapped)
    return [(n, g, s, _tensor_type(g, s, qtype, tied_output)) for n, g, s in mapped]


def fallback_notes(plan: list[tuple[str, str, tuple, Q]], quant: str) -> list[str]:
    """One line per type a k-quant mix had to store instead of a K-type (rows not a multiple of 256)."""
    if quant not in kquants.MIXES:
        return []
    by_type: dict[Q, list[tuple[str, int]]] = {}
    for _, gname, shape, t in plan:
        if t != Q.F32 and t not in kquants.QUANTIZERS:
            by_type.setdefault(t, []).append((re.sub(r"^blk\.\d+\.", "blk.N.", gname), shape[-1]))
    notes = []
    for t, tensors in by_type.items():
        names = ", ".join(f"{name} x{n}" if n > 1 else name for name, n in Counter(g for g, _ in tensors).items())
        widths = ", ".join(str(n) for n in sorted({n for _, n in tensors}))
        notes.append(f"{len(tensors)} tensor(s) stored as {t.name}, as llama-quantize does for rows of {widths} "
                     f"values (not a multiple of {kquants.QK_K}): {names}")
    return notes


def to_gguf(source: str | Path, out: str | Path, quant: str = "f16", *, base: str | Path | None = None,
            force: bool = False, notes: list[str] | None = None) -> Path:
    """Write `source` (run dir, adapter dir or model dir) with its adapter merged as one GGUF file at `out`.

    `notes`, if given, receives a line for each fallback type a k-quant mix used.
    """
    if quant not in QUANTS:
        raise UnsupportedError(f"quant type {quant!r}: choose one of {', '.join(QUANTS)}")
    qtype, ftype = QUANTS[quant]
    src = open_source(source, base)
    config = src.config
    family = family_of(config)
    src.require("num_hidden_layers", "num_attention_heads")
    name_map = gguf.get_tensor_name_map(arch_of(family), config["num_hidden_layers"])
    plan = _plan(src, name_map, quant, family)
    if notes is not None:
        notes.extend(fallback_notes(plan, quant))
    vocab = build_vocab(src.tokenizer_dir, config)
    extras = extra_tensors(config, family)
    out = Path(out)
    with atomic_output(out, force, [Path(source), *src.inputs]) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch_of(family)])
        w.add_name(src.base.path.name)
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(w, config, family)
        vocab.write(w)
        for name, arr in extras:
            w.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
        for _, gname, shape, t in plan:
            if t in (Q.F32, Q.F16):
                dtype = np.dtype(np.float32 if t == Q.F32 else np.float16)
                w.add_tensor_info(gname, shape, dtype, _nbytes(shape, t))
            else:
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, t)
                w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), _nbytes(shape, t), raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, arr in extras:
            w.write_tensor_data(arr)
        for hf_name, _, _, t in plan:
            merged = to_llama_cpp_layout(hf_name, src.tensor(hf_name).float(), config, family)
            w.write_tensor_data(_convert(merged.numpy(), t))
            del merged
        w.close()
    return out
