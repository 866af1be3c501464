"""FlexAttention over many distinct sequence lengths (GPU): does a new length recompile, and does memory stay flat?

Training batches are padded to their longest row, so every batch can have a new length. A compiled
flex_attention that recompiled per length would hit Dynamo's recompile limit after a few and then run
eagerly, materializing the [T x T] scores. This runs ops.layer_masks + ops.attention forward and
backward (Llama-like 32/8 heads of 128, bf16, two packed documents per row, the decoder's own trial
via `check`) at --count lengths and prints each one's time and peak memory above the inputs.

    python bench/flex_lengths.py [--start 3000] [--count 12] [--step 37]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.models import ops  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--start", type=int, default=3000)
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--step", type=int, default=37)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    heads, kv, hd = 32, 8, 128
    shape = ops.AttentionShape(heads, kv, hd, torch.bfloat16, hd ** -0.5)
    print("| length | first call ms (incl. any compile) | second call ms | peak MiB above inputs | mask |")
    print("|---:|---:|---:|---:|---|")
    for n in range(args.start, args.start + args.count * args.step, args.step):
        q = torch.randn(1, heads, n, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, kv, n, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, kv, n, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        documents = (torch.arange(n, device="cuda") >= n // 3).long()[None]
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            mask = ops.layer_masks(documents, n, [None], q.device, flex=True, check=shape)[None]
            out = ops.attention(q, k, v, mask, scale=shape.scale)
            out.sum().backward()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            q.grad = k.grad = v.grad = None
        kind = "BlockMask" if isinstance(mask, ops.BlockMask) else "dense"
        print(f"| {n} | {times[0]:.0f} | {times[1]:.1f} | {peak:.0f} | {kind} |", flush=True)


if __name__ == "__main__":
    main()
