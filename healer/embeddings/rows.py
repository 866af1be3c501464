"""Row math on embedding matrices: which rows were never trained, and the mean of the rest.

Every function walks the matrix in chunks of rows, so a 128,256 x 4,096 bfloat16 embedding
never needs a full float32 copy. A "matrix" is a 2-D torch.Tensor or a `StoredMatrix` (rows
read from a safetensors file on demand); both are sliced by rows.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from healer.errors import CheckpointError
from healer.model_dir import ModelDir, safetensors_header

EPS = 1e-16
# 2**25 elements: 64 MiB of bfloat16 (128 MiB once a chunk is upcast to float32)
CHUNK_ELEMENTS = 1 << 25

# Why a row was judged untrained (the value of each entry untrained_rows returns)
EMBED_ZERO = "embed_zero"  # tied or no lm_head: the input row alone decides
EMBED_AND_HEAD_ZERO = "embed_zero+lm_head_zero"
EMBED_ZERO_HEAD_SHARED = "embed_zero+lm_head_identical"  # Llama 3.1: equal non-zero lm_head rows

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class StoredMatrix:
    """A 2-D tensor inside a safetensors file, read by rows with plain file reads.

    `any_shape=True` accepts any tensor, seen as (first dimension, the rest flattened).

    File reads instead of a memory map keep the pages out of this process's RSS: scanning
    a 1 GB embedding costs one chunk of memory, not a gigabyte of mapped pages.
    """

    def __init__(self, path: Path, name: str, any_shape: bool = False):
        entry = safetensors_header(path).get(name)
        if entry is None:
            raise CheckpointError(f"{path}: no tensor named {name}")
        shape = list(entry["shape"])
        if entry["dtype"] not in SAFETENSORS_DTYPES or (len(shape) != 2 and not any_shape):
            raise CheckpointError(f"{path}: {name} is {entry['dtype']} {shape}, expected a 2-D matrix")
        self.path, self.name = path, name
        self.dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        # any_shape: rows are the first dimension (a 1-D or scalar tensor is one column)
        rows = shape[0] if len(shape) >= 2 else math.prod(shape)
        self.shape = torch.Size((rows, math.prod(shape) // rows if rows else 0))
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        self._data_start = 8 + n + entry["data_offsets"][0]
        self._row_bytes = self.shape[1] * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"StoredMatrix({str(self.path)!r}, {self.name!r}, {tuple(self.shape)}, {self.dtype})"

    def __getitem__(self, rows: slice | torch.Tensor | list[int]) -> torch.Tensor:
        """Rows as a new in-memory tensor: a slice (step 1) or a list/tensor of row indices."""
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.shape[0])
            assert step == 1, "StoredMatrix slices must be contiguous"
            return self._read(start, max(stop - start, 0))
        idx = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        out = torch.empty((len(idx), self.shape[1]), dtype=self.dtype)
        for i, r in enumerate(idx.tolist()):
            out[i] = self._read(r, 1)[0]
        return out

    def _read(self, start: int, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty((count, self.shape[1]), dtype=self.dtype)
        buf = out.view(torch.uint8).numpy().reshape(-1)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + start * self._row_bytes)
            got = f.readinto(buf)
        if got != len(buf):
            raise CheckpointError(f"{self.path}: truncated while reading {self.name}")
        return out

    def chunks(self, step: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows) read into one reused buffer: each chunk is overwritten by the next."""
        buf = torch.empty((min(step, self.shape[0]), self.shape[1]), dtype=self.dtype)
        for start in range(0, self.shape[0], step):
            count = min(step, self.shape[0] - start)
            yield start, self._read(start, count, buf[:count])

    def load(self) -> torch.Tensor:
        """The whole matrix as one writable in-memory tensor."""
        return self[:]


Matrix = torch.Tensor | StoredMatrix


def stored_matrix(ckpt: ModelDir, name: str) -> Matrix:
    """A checkpoint tensor by rows: a StoredMatrix for safetensors, the tensor itself for .bin weights."""
    path = ckpt.weight_map.get(name)
    if path is None:
        raise CheckpointError(f"{ckpt.path}: no tensor named {name}")
    if path.suffix == ".safetensors":
        return StoredMatrix(path, name)
    return ckpt.tensor(name)


def row_chunks(matrix: Matrix, chunk_rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows) over the matrix, each chunk about CHUNK_ELEMENTS values.

    A chunk is valid until the next one is yielded: StoredMatrix reads every chunk into one
    reused buffer (fresh 64 MiB allocations cost more in page faults than the reads).
    """
    n, h = matrix.shape
    step = chunk_rows or max(1, CHUNK_ELEMENTS // max(h, 1))
    if isinstance(matrix, StoredMatrix):
        yield from matrix.chunks(step)
        return
    for start in range(0, n, step):
        yield start, matrix[start:start + step]


def row_absmax(matrix: Matrix) -> torch.Tensor:
    """max |x| of every row as float32 (NaN where a row holds a NaN, inf where it holds an inf)."""
    out = torch.empty(matrix.shape[0], dtype=torch.float32)
    for start, chunk in row_chunks(matrix):
        # amax and -amin in the stored dtype: no abs() temporary, and both propagate NaN
        out[start:start + len(chunk)] = torch.maximum(chunk.amax(dim=1), -chunk.amin(dim=1)).float()
    return out


def untrained_rows(embed: Matrix, lm_head: Matrix | None = None, eps: float = EPS,
                   protected_ids: Iterable[int] = (), absmax: torch.Tensor | None = None) -> dict[int, str]:
    """Rows never trained: row -> the rule that caught it (EMBED_ZERO, EMBED_AND_HEAD_ZERO, ...).

    A row is a candidate when max|x| <= eps in the input embedding. Without a separate lm_head
    (tied, or none) that decides. With one, the lm_head row must agree: it is <= eps too, or it
    is one of >= 2 candidate lm_head rows that are identical once rounded to 3 decimals (Llama
    3.1 ships its untrained lm_head rows as one shared non-zero vector). Rows that are small but
    not degenerate (any |x| > eps) and `protected_ids` (bos/eos/pad/unk) are never counted.
    `absmax` reuses a row_absmax(embed) already computed. Only candidate lm_head rows are read.
    """
    if absmax is None:
        absmax = row_absmax(embed)
    assert absmax.shape == (embed.shape[0],), (absmax.shape, embed.shape)
    candidates = torch.nonzero(absmax <= eps).reshape(-1)
    protected = {int(i) for i in protected_ids}
    candidates = torch.tensor([int(r) for r in candidates.tolist() if r not in protected], dtype=torch.int64)
    if lm_head is None or len(candidates) == 0:
        return {int(r): EMBED_ZERO for r in candidates.tolist()}
    assert lm_head.shape[1] == embed.shape[1], (lm_head.shape, embed.shape)
    candidates = candidates[candidates < lm_head.shape[0]]  # a row the head lacks cannot be confirmed
    head = lm_head[candidates].float()
    head_absmax = head.abs().amax(dim=1)
    out: dict[int, str] = {}
    for r, m in zip(candidates.tolist(), head_absmax.tolist(), strict=True):
        if m <= eps:
            out[r] = EMBED_AND_HEAD_ZERO
    finite = torch.isfinite(head).all(dim=1) & (head_absmax > eps)
    if int(finite.sum()) >= 2:
        rounded = head[finite].round(decimals=3)
        _, inverse, counts = torch.unique(rounded, dim=0, return_inverse=True, return_counts=True)
        for r, group in zip(candidates[finite].tolist(), inverse.tolist(), strict=True):
            if counts[group] >= 2:
                out[r] = EMBED_ZERO_HEAD_SHARED
    return dict(sorted(out.items()))


def trained_mean(matrix: Matrix, untrained: Iterable[int]) -> torch.Tensor:
    """Mean of the trained rows as float32: sum(rows, untrained ones zeroed) / (n_rows - n_untrained).

    Each chunk is summed in float32 and chunk sums accumulate in float64: relative error ~1e-7,
    far below bfloat16's 4e-3. Including the untrained rows (the common recipe) biases the
    mean towards them: toward zero, or toward Llama 3.1's shared lm_head vector.
    """
    skip = torch.tensor(sorted({int(r) for r in untrained}), dtype=torch.int64)
    n_rows, hidden = matrix.shape
    n_trained = n_rows - len(skip)
    if n_trained <= 0:
        raise CheckpointError(f"all {n_rows} rows of the matrix are untrained: there is no trained mean to copy")
    assert len(skip) == 0 or (skip[0] >= 0 and skip[-1] < n_rows), "untrained row index out of range"
    total = torch.zeros(hidden, dtype=torch.float64)
    buf: torch.Tensor | None = None
    for start, chunk in row_chunks(matrix):
        # one reused float32 buffer: copy_ into it costs 0.4 CPU s/GB, a fresh .float() 1.5 (page faults)
        if buf is None:
            buf = torch.empty(chunk.shape, dtype=torch.float32)
        rows = buf[:len(chunk)]
        rows.copy_(chunk)
        weights = torch.ones(len(chunk), dtype=torch.float32)
        lo, hi = torch.searchsorted(skip, torch.tensor([start, start + len(chunk)])).tolist()
        weights[skip[lo:hi] - start] = 0
        # a 0/1-weighted matrix-vector product: BLAS sums the rows several times faster than sum(dim=0)
        total += weights @ rows
    return (total / n_trained).to(torch.float32)


def assign_trained_mean(matrix: torch.Tensor, rows: Iterable[int], untrained: Iterable[int]) -> torch.Tensor:
    """Set `rows` of `matrix` (in place) to trained_mean(matrix, untrained), cast to the matrix dtype."""
    idx = torch.tensor(sorted({int(r) for r in rows}), dtype=torch.int64)
    if len(idx):
        matrix[idx] = trained_mean(matrix, untrained).to(matrix.dtype)
    return matrix
