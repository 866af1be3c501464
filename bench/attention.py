"""Attention with masks and softcap: the plain paths (dense boolean mask SDPA, eager float32 softcap
scores) against FlexAttention (compiled, with a BlockMask built once per forward), forward+backward.

    python bench/attention.py [--lengths 4096,8192,16384] [--budget-s 210]

Needs a CUDA GPU. Two shapes, batch 1, bf16: Gemma-2-9B-like attention (16 heads, 8 kv heads, head_dim
256, softcap 50, sliding window 4096, one document) and Llama-like packed documents (32 heads, 8 kv heads,
head_dim 128, 8 documents of random lengths, no softcap). Per row: the mask build time (once per forward,
shared by the layers of one window), the median fwd+bwd time of one layer's attention (CUDA events), the
peak memory above the inputs, and flex's largest difference from the plain path (output and dq, bf16)
where both ran. Rows that run out of memory print OOM; rows past the time budget print 'skipped'.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.models import ops  # noqa: E402

SHAPES = {
    "gemma2-9b": dict(heads=16, kv=8, head_dim=256, softcap=50.0, window=4096, documents=1),
    "llama-packed": dict(heads=32, kv=8, head_dim=128, softcap=None, window=None, documents=8),
}
DTYPE = torch.bfloat16


def _documents(seq_len: int, count: int, gen: torch.Generator) -> torch.Tensor | None:
    if count == 1:
        return None
    cuts = torch.randperm(seq_len - 1, generator=gen)[: count - 1].sort().values + 1
    starts = torch.zeros(seq_len, dtype=torch.int64)
    starts[cuts] = 1
    return starts.cumsum(0)[None].cuda()


def _cuda_ms(fn: Callable[[], object], iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def bench_row(shape: dict, seq_len: int, flex: bool, iters: int) -> dict:
    """One (shape, length, path) row; raises torch.cuda.OutOfMemoryError when it does not fit."""
    gen = torch.Generator().manual_seed(seq_len)
    q = torch.randn(1, shape["heads"], seq_len, shape["head_dim"], generator=gen).to("cuda", DTYPE)
    k = torch.randn(1, shape["kv"], seq_len, shape["head_dim"], generator=gen).to("cuda", DTYPE)
    v = torch.randn(1, shape["kv"], seq_len, shape["head_dim"], generator=gen).to("cuda", DTYPE)
    grad = torch.randn(1, shape["heads"], seq_len, shape["head_dim"], generator=gen).to("cuda", DTYPE)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    documents = _documents(seq_len, shape["documents"], gen)
    window, softcap = shape["window"], shape["softcap"]

    def build() -> ops.LayerMask:
        return ops.layer_masks(documents, seq_len, [window], q.device, flex=flex,
                               softcap=softcap)[window]

    build()  # compiles create_block_mask's mask_mod once
    mask_ms = statistics.median(_cuda_ms(build, iters))
    mask = build()
    scale = shape["head_dim"] ** -0.5

    def fwd_bwd() -> torch.Tensor:
        q.grad = k.grad = v.grad = None
        out = ops.attention(q, k, v, mask, scale=scale, softcap=softcap)
        out.backward(grad)
        return out

    out = fwd_bwd()  # compiles flex_attention for this length
    out, dq = out.detach().float().cpu(), q.grad.float().cpu()
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()  # inputs, output gradient and mask
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = statistics.median(_cuda_ms(fwd_bwd, iters))
    return dict(mask_ms=mask_ms, ms=ms, peak_gib=peak_gib, out=out, dq=dq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=210.0, help="skip the rows left after this long")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "bench/attention.py needs a CUDA GPU"
    torch._dynamo.config.cache_size_limit = 64  # one compiled flex_attention per (shape, length)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    header = (f"{'shape':13s} {'T':>6s} {'path':5s} {'mask ms':>8s} {'fwd+bwd ms':>11s} {'peak GiB':>9s} "
              f"{'max|d out|':>11s} {'max|d dq|':>10s}")
    print(header)
    print("-" * len(header))
    started = time.monotonic()
    for name, shape in SHAPES.items():
        for seq_len in (int(n) for n in args.lengths.split(",")):
            results = {}
            for flex in (False, True):
                path = "flex" if flex else "plain"
                prefix = f"{name:13s} {seq_len:6d} {path:5s}"
                if time.monotonic() - started > args.budget_s:
                    print(f"{prefix} skipped (time budget)", flush=True)
                    continue
                try:
                    r = bench_row(shape, seq_len, flex, args.iters)
                except torch.cuda.OutOfMemoryError:
                    print(f"{prefix} {'OOM':>8s}", flush=True)
                    continue
                except Exception as e:  # a compile failure on one shape should not hide the other rows
                    first_line = (str(e).splitlines() or [""])[0][:80]
                    print(f"{prefix} error {type(e).__name__}: {first_line}", flush=True)
                    continue
                finally:
                    torch.cuda.empty_cache()
                results[flex] = r
                diff = ""
                if flex and False in results:
                    plain = results[False]
                    diff = (f"{(r['out'] - plain['out']).abs().max().item():11.2e} "
                            f"{(r['dq'] - plain['dq']).abs().max().item():10.2e}")
                print(f"{prefix} {r['mask_ms']:8.2f} {r['ms']:11.2f} {r['peak_gib']:9.2f} {diff}", flush=True)
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
