"""Write a checkpoint's weight files with some tensors replaced, touching only their shards.

Shards that hold a replaced tensor are rewritten by streaming: the unchanged tensors' bytes
are copied from the source file in blocks (never parsed or held in memory), the replaced
tensors are written from memory, header order, dtypes and `__metadata__` are kept. Every
other shard is hard-linked (copied where the filesystem refuses links), and
model.safetensors.index.json is rewritten with the new total_size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from healer.embeddings.rows import SAFETENSORS_DTYPES
from healer.errors import CheckpointError, OutputError
from healer.model_dir import ModelDir, read_json, safetensors_header
from healer.outputs import atomic_file, write_atomic

INDEX = "model.safetensors.index.json"
_COPY_BLOCK = 64 << 20
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _copy_range(src, dst, offset: int, length: int) -> None:
    src.seek(offset)
    while length > 0:
        block = src.read(min(_COPY_BLOCK, length))
        if not block:
            raise CheckpointError(f"{src.name}: truncated while copying tensor data")
        dst.write(block)
        length -= len(block)


def _rewrite_shard(src_path: Path, dst_path: Path, updates: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Write src_path to dst_path with `updates` replacing tensors; returns the new header."""
    header = safetensors_header(src_path)
    with open(src_path, "rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    new_header: dict[str, Any] = {}
    if "__metadata__" in header:
        new_header["__metadata__"] = header["__metadata__"]
    offset = 0
    for name in names:
        entry = dict(header[name])
        if name in updates:
            t = updates[name]
            assert _DTYPE_NAMES.get(t.dtype) == entry["dtype"], f"{name}: {t.dtype} would change {entry['dtype']}"
            entry["shape"] = list(t.shape)
            size = t.numel() * t.element_size()
        else:
            size = entry["data_offsets"][1] - entry["data_offsets"][0]
        entry["data_offsets"] = [offset, offset + size]
        new_header[name] = entry
        offset += size
    raw = json.dumps(new_header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    with atomic_file(dst_path) as tmp, open(src_path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(len(raw).to_bytes(8, "little"))
        dst.write(raw)
        for name in names:
            if name in updates:
                dst.write(_tensor_bytes(updates[name]))
            else:
                start, end = header[name]["data_offsets"]
                _copy_range(src, dst, data_start + start, end - start)
    return new_header


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link src to dst, or copy it (atomically) where the filesystem cannot link; says which."""
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        with atomic_file(dst) as tmp:
            shutil.copyfile(src, tmp)
        return "copied"


def _sizes(header: Mapping[str, Any]) -> tuple[int, int]:
    """(data bytes, parameters) of a safetensors header."""
    entries = [v for k, v in header.items() if k != "__metadata__"]
    return (sum(v["data_offsets"][1] - v["data_offsets"][0] for v in entries),
            sum(math.prod(v["shape"]) for v in entries))


def write_weights(ckpt: ModelDir, updates: Mapping[str, torch.Tensor], out_dir: str | Path) -> dict[str, str]:
    """Write the checkpoint's safetensors weights into out_dir with `updates` replacing tensors.

    Returns file name -> `rewritten`, `linked` or `copied` for every file written (shards and
    the index). A replaced tensor keeps its dtype and may change shape. out_dir must exist and
    must not already hold these files.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise OutputError(f"{out}: output directory does not exist")
    shards = sorted(set(ckpt.weight_map.values()))
    if any(p.suffix != ".safetensors" for p in shards):
        raise CheckpointError(f"{ckpt.path}: weights are PyTorch .bin files; only safetensors shards can be "
                              "rewritten (convert the checkpoint with save_pretrained(safe_serialization=True))")
    unknown = sorted(set(updates) - set(ckpt.weight_map))
    assert not unknown, f"updates for tensors the checkpoint does not have: {unknown}"
    by_shard: dict[Path, dict[str, torch.Tensor]] = {}
    for name, t in updates.items():
        by_shard.setdefault(ckpt.weight_map[name], {})[name] = t
    written: dict[str, str] = {}
    total_bytes = total_params = 0
    for shard in shards:
        dst = out / shard.name
        if dst.exists():
            raise OutputError(f"{dst}: already exists")
        if shard in by_shard:
            header = _rewrite_shard(shard, dst, by_shard[shard])
            written[shard.name] = "rewritten"
        else:
            header = safetensors_header(shard)
            written[shard.name] = link_or_copy(shard, dst)
        n_bytes, n_params = _sizes(header)
        total_bytes += n_bytes
        total_params += n_params
    index_path = ckpt.file(INDEX)
    if index_path is not None:
        index = read_json(index_path)
        metadata = index.setdefault("metadata", {})
        metadata["total_size"] = total_bytes
        if "total_parameters" in metadata:
            metadata["total_parameters"] = total_params
        write_atomic(out / INDEX, json.dumps(index, indent=2) + "\n")
        written[INDEX] = "rewritten"
    return written
