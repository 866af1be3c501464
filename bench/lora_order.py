"""Where the LoRA term joins a projection: after the base matmul (re-reading its output) or before it.

    after   y = x W^T;  y += s (x A^T) B^T            the add is a memory-bound pass over all of y
    before  y = s (x A^T) B^T;  y += x W^T            the big matmul reads y in its epilogue (beta = 1)

and the same two orders for the input gradient, dX = dY W + s (dY B) A. x A^T and dY B are computed
once outside the timed calls (both orders need them). Llama-3-8B projection sizes, 2 x 2048 tokens,
bf16, r = 32 (trainer/kernels/lora_fused.py uses `before` since this was measured).

Columns: GPU time per call (calls queued behind a sleep kernel, bench/queued_timing.py), the
difference, and the bytes of y (or dX) that the `after` order moves again (read + write).

    python bench/lora_order.py [--tokens 4096] [--rank 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from queued_timing import queued_call_ms  # noqa: E402

SHAPES = {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 14336), "down": (14336, 4096)}


def measure(name: str, k: int, m: int, n: int, r: int, iters: int) -> list[dict]:
    """Both orders, forward and input gradient, for one [m x k] projection of n tokens."""
    dev, dt, s = torch.device("cuda"), torch.bfloat16, 2.0
    x, w = torch.randn(n, k, device=dev, dtype=dt), torch.randn(m, k, device=dev, dtype=dt) / k**0.5
    A, B = torch.randn(r, k, device=dev, dtype=dt) / k**0.5, torch.randn(m, r, device=dev, dtype=dt) / r**0.5
    xa, dy = x @ A.t(), torch.randn(n, m, device=dev, dtype=dt)
    dyb = dy @ B
    y, dx = torch.empty(n, m, device=dev, dtype=dt), torch.empty(n, k, device=dev, dtype=dt)

    def fwd_after():
        torch.mm(x, w.t(), out=y)
        y.addmm_(xa, B.t(), alpha=s)

    def fwd_before():
        y.addmm_(xa, B.t(), beta=0, alpha=s)
        y.addmm_(x, w.t())

    def bwd_after():
        torch.mm(dy, w, out=dx)
        dx.addmm_(dyb, A, alpha=s)

    def bwd_before():
        dx.addmm_(dyb, A, beta=0, alpha=s)
        dx.addmm_(dy, w)

    fwd_after()
    ref = y.float().clone()
    fwd_before()
    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    rows = []
    for pass_, after, before, out in [("forward", fwd_after, fwd_before, y), ("dX", bwd_after, bwd_before, dx)]:
        t_after, _ = queued_call_ms(after, dev, iters)
        t_before, _ = queued_call_ms(before, dev, iters)
        rows.append({"projection": name, "pass": pass_, "after_us": t_after * 1e3, "before_us": t_before * 1e3,
                     "moved_again_mb": 2 * out.numel() * out.element_size() / 1e6, "max_rel_diff_forward": err})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--json")
    args = ap.parse_args()
    n, r = args.tokens, args.rank
    rows = []
    print(f"{torch.cuda.get_device_name()}, {n} tokens, r={r}, bf16; GPU us per call")
    print(f"{'projection':<11}{'pass':<9}{'after':>9}{'before':>9}{'saved':>8}{'y MB moved again':>18}")
    for name, (k, m) in SHAPES.items():
        for row in measure(name, k, m, n, r, args.iters):
            rows.append(row)
            print(f"{name:<11}{row['pass']:<9}{row['after_us']:>9.1f}{row['before_us']:>9.1f}"
                  f"{row['after_us'] - row['before_us']:>8.1f}{row['moved_again_mb']:>18.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "tokens": n, "rank": r,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
