"""What is on the GPU at a training step's memory peak (GPU): our trainer at bench/train.py's setting.

Same model, LoRA and batches as bench/train.py's "ours, Triton kernels" variant (random-weight
checkpoint of --shape, QLoRA r=32 on all linear layers, 2 x 2048 tokens, grad-accum 4, paged 8-bit
AdamW, --gc checkpointing). The CUDA caching allocator records every allocation and free with its
Python stack from before the model loads; after --steps optimizer steps the trace is replayed to find
the moment the allocated bytes peaked, and the blocks live then are grouped by the innermost frame in
our own code (trainer/, bench/) that asked for them. The report names the allocation that set the peak
(its stack says where in the step it happened) and sums the live blocks per call site.

    python bench/memory_peak.py [--shape llama3-8b] [--gc on|offload|off] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train  # noqa: E402
import train_variants  # noqa: E402

from trainer.loop import collector_frozen  # noqa: E402

OURS = ("/trainer/", "/bench/")


def site(frames: list[dict], size: int) -> str:
    """The innermost frame of our code that led to an allocation, or the library frame that made it;
    by size when the allocator recorded no stacks (--stacks none)."""
    if not frames:
        return f"(no stack) {size / 2**20:.2f} MiB blocks"
    ours = next((f for f in frames if any(p in f["filename"] for p in OURS)), None)
    if ours is None:
        lib = frames[0] if frames else {"filename": "?", "line": 0, "name": "?"}
        return f"(library) {Path(lib['filename']).name}:{lib['line']} {lib['name']}"
    rel = ours["filename"].split(str(ROOT) + "/")[-1]
    return f"{rel}:{ours['line']} {ours['name']}"


def stack(frames: list[dict], depth: int = 12) -> list[str]:
    return [f"{f['filename'].split(str(ROOT) + '/')[-1]}:{f['line']} {f['name']}"
            for f in frames if f["filename"].endswith(".py")][:depth]


def peak_breakdown(snapshot: dict, device: int = 0) -> dict:
    """Replay the allocator trace: the live blocks at the first moment the allocated total was largest."""
    live: dict[int, dict] = {}
    total = best = 0
    best_live: dict[int, dict] = {}
    best_event = None
    for i, ev in enumerate(snapshot["device_traces"][device]):
        action = ev["action"]
        if action == "alloc":
            live[ev["addr"]] = ev
            total += ev["size"]
            if total > best:
                best, best_event = total, (i, ev)
                best_live = dict(live)
        elif action == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])["size"]
    by_site: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for ev in best_live.values():
        by_site[site(ev.get("frames", []), ev["size"])][ev["size"]] += 1
    rows = sorted(((s, sum(k * n for k, n in sizes.items()), sizes) for s, sizes in by_site.items()),
                  key=lambda r: -r[1])
    i, ev = best_event
    return {
        "peak_allocated_gib": best / 2**30,
        "trace_events": len(snapshot["device_traces"][device]),
        "peak_event_index": i,
        "peak_allocation": {"size_mib": ev["size"] / 2**20, "stack": stack(ev.get("frames", []))},
        "live_at_peak": [{"site": s, "mib": b / 2**20, "blocks": sum(sizes.values()),
                          "sizes_mib": {f"{k / 2**20:.2f}": n for k, n in sorted(sizes.items(), reverse=True)[:4]}}
                         for s, b, sizes in rows],
    }


def reserved_by_pool(snapshot: dict) -> dict[str, float]:
    """Reserved GiB per memory pool at the end: (0, 0) is the default pool, others CUDA graph pools."""
    pools: dict[str, float] = defaultdict(float)
    for seg in snapshot["segments"]:
        pools[str(tuple(seg.get("segment_pool_id", (0, 0))))] += seg["total_size"] / 2**30
    return dict(pools)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    train.add_setting_arguments(ap)
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps recorded (the peak is over all)")
    ap.add_argument("--json", help="write the breakdown here")
    ap.add_argument("--top", type=int, default=25, help="call sites to print")
    ap.add_argument("--stacks", default="python", choices=["python", "all", "none"],
                    help="stacks the allocator records (all: also C++ frames, slower; none: sizes only, for "
                         "torch 2.11, where recording stacks breaks checkpoint's recompute: pytorch#179536)")
    ap.add_argument("--cuda-graphs", action="store_true", help="micro-batches by CUDA graph replay (trainer.graphs)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU: this reads the CUDA caching allocator's trace")
    model_dir = train.generate(args.shape, Path(args.cache) / f"train-{args.shape}")
    s = train_variants.Settings(args.steps, args.batch, args.seq, args.accum, args.gc)
    if args.stacks == "none":
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, context=None)
    else:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks=args.stacks)
    v = train_variants.Ours(model_dir, s, graphs=args.cuda_graphs)
    gen = torch.Generator().manual_seed(1)
    with collector_frozen():
        for _ in range(args.steps):
            v.step(train_variants.micro_batches(gen, v.vocab, s.batch, s.seq, s.accum))
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    r = {"shape": args.shape, "gc": args.gc, "cuda_graphs": args.cuda_graphs, "device": torch.cuda.get_device_name(),
         "setting": f"{s.batch} x {s.seq} x accum {s.accum}, {args.steps} steps",
         "torch_peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
         "torch_peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
         "reserved_by_pool_gib": reserved_by_pool(snapshot),
         **peak_breakdown(snapshot)}
    print(f"{r['shape']} gc {r['gc']}, {r['setting']}: peak allocated {r['peak_allocated_gib']:.3f} GiB "
          f"(torch's counter {r['torch_peak_allocated_gib']:.3f}, reserved {r['torch_peak_reserved_gib']:.3f})")
    print("reserved by pool at the end (GiB):", {k: round(x, 3) for k, x in r["reserved_by_pool_gib"].items()})
    print(f"set by a {r['peak_allocation']['size_mib']:.1f} MiB allocation at:")
    for f in r["peak_allocation"]["stack"]:
        print(f"    {f}")
    print(f"{'MiB':>9} {'blocks':>6}  live at the peak, by call site")
    for row in r["live_at_peak"][:args.top]:
        print(f"{row['mib']:9.1f} {row['blocks']:6d}  {row['site']}  sizes {row['sizes_mib']}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
