"""LoRA merge into the base weights, streamed tensor by tensor into 16-bit safetensors shards.

W' = W + scale * B @ A in float32 (scale = alpha/r, or alpha/sqrt(r) for rsLoRA), then cast.
Shard headers are planned from the base shapes before any data is read, so each tensor is
computed, written and dropped: peak memory is about one (float32) tensor, not one shard.
Bases are 16-bit (or float32) HF dirs; a 4-bit (NF4) base would be dequantized first, which
export does not do yet (open_source refuses quantized bases with a clear error).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from export.errors import UnsupportedError
from export.output import atomic_output
from export.source import Source, open_source, tokenizer_files

DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "f16": torch.float16, "fp16": torch.float16,
    "float32": torch.float32, "f32": torch.float32, "fp32": torch.float32,
}
ST_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}
TORCH_NAME = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
DEFAULT_MAX_SHARD = 5 * 10**9


def output_dtype(src: Source, dtype: str | torch.dtype) -> torch.dtype:
    """Resolve 'auto' (the base's 16-bit storage dtype, else bfloat16) and dtype names."""
    if isinstance(dtype, torch.dtype):
        if dtype not in TORCH_NAME:
            raise UnsupportedError(f"output dtype {dtype}: choose bfloat16, float16 or float32")
        return dtype
    if dtype == "auto":
        stored = next((d for d in map(src.stored_dtype, src.tensor_names()) if d.is_floating_point), torch.bfloat16)
        return stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16
    if dtype not in DTYPES:
        raise UnsupportedError(f"output dtype {dtype!r}: choose one of auto, bfloat16, float16, float32")
    return DTYPES[dtype]


def _plan_shards(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int):
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for e in entries:
        nbytes = _nbytes(e[1], e[2])
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    return shards


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _write_safetensors(path: Path, entries, produce) -> None:
    """Write a safetensors file whose tensors come from `produce(name)`, one at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        end = offset + _nbytes(shape, dtype)
        header[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format wants the data to start 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, dtype in entries:
            t = produce(name).to(dtype).contiguous()
            assert tuple(t.shape) == tuple(shape), (name, t.shape, shape)
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t


def merge(source: str | Path, out: str | Path, *, base: str | Path | None = None,
          dtype: str | torch.dtype = "auto", force: bool = False,
          max_shard_size: int = DEFAULT_MAX_SHARD) -> Path:
    """Merge the LoRA adapter of `source` into its base and write a normal HF checkpoint dir at `out`."""
    src = open_source(source, base)
    out = Path(out)
    target = output_dtype(src, dtype)

    def cast_dtype(name: str) -> torch.dtype:
        stored = src.stored_dtype(name)
        return target if stored.is_floating_point else stored

    entries = [(n, tuple(src.shape(n)), cast_dtype(n)) for n in src.tensor_names()]
    shards = _plan_shards(entries, max_shard_size)
    with atomic_output(out, force, [Path(source), *src.inputs]) as tmp:
        tmp.mkdir()
        if len(shards) == 1:
            files = ["model.safetensors"]
        else:
            files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for fname, shard in zip(files, shards):
            _write_safetensors(tmp / fname, shard, src.tensor)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(_nbytes(s, d) for _, s, d in entries)},
                     "weight_map": {n: f for f, shard in zip(files, shards) for n, _, _ in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = dict(src.config)
        config["dtype"] = TORCH_NAME[target]
        if "torch_dtype" in config:
            config["torch_dtype"] = TORCH_NAME[target]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        generation = src.base.file("generation_config.json")
        if generation is not None:
            shutil.copyfile(generation, tmp / "generation_config.json")
        for f in tokenizer_files(src.tokenizer_dir):
            shutil.copyfile(f, tmp / f.name)
        extra_templates = src.tokenizer_dir / "additional_chat_templates"
        if extra_templates.is_dir():
            shutil.copytree(extra_templates, tmp / extra_templates.name)
    return out
