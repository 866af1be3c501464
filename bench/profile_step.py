"""Where a training step's GPU time goes (GPU): our trainer at bench/train.py's setting, under torch.profiler.

Same model, LoRA and batches as bench/train.py's "ours, Triton kernels" variant (random-weight
checkpoint of --shape, QLoRA r=32 on all linear layers, 2 x 2048 tokens, grad-accum 4, paged 8-bit
AdamW, --gc checkpointing). After --warmup optimizer steps, --steps more run under the profiler and
every GPU kernel is put in one category by its name:

  matmul (cuBLAS)     split further by the calling aten op's shapes: each frozen projection, LoRA's
                      thin r=32 products, lm_head; achieved TFLOP/s from 2*M*N*K of those shapes
  NF4 dequantize      bitsandbytes' or our dequantization into the bf16 workspace
  attention           SDPA's flash kernels, FlexAttention
  cross-entropy       the fused linear cross-entropy's own Triton kernels (its matmuls are above)
  norms, RoPE, activation, other Triton; elementwise/copies (PyTorch); optimizer; host<->device copies

GPU busy time is the union of all kernel intervals (the offload copies run on a side stream and
overlap compute); idle = wall - busy is time the GPU waited on the CPU or a synchronization.
MFU's FLOPs (bench/train.py's formula) over the matmul time alone says how far the matmuls
themselves are from the ceiling; over the wall time it is the MFU bench/train.py reports.

    python bench/profile_step.py [--shape llama3-8b] [--gc on|offload|off] [--cuda-graphs]
                                 [--json out.json] [--trace trace.json]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train  # noqa: E402
import train_variants  # noqa: E402

from trainer.loop import collector_frozen  # noqa: E402

# first match wins; names as CUDA/Triton report them
KERNEL_CATEGORIES = [
    ("NF4 dequantize", r"dequant|kDequantize"),
    ("FP8 casts (Triton)", r"quantize_rows"),
    ("attention", r"flash|fmha|flex|attention|sdpa"),
    ("cross-entropy (Triton)", r"cross_entropy|_ce_|lse|logsumexp"),
    ("norms (Triton)", r"rms_norm|rmsnorm"),
    ("RoPE (Triton)", r"rope"),
    ("activation (Triton)", r"gated|silu|gelu|swiglu|geglu"),
    ("optimizer", r"optimizer|adam|Optimizer"),
    ("matmul (cuBLAS)", r"gemm|nvjet|cutlass|xmma|sm90_|sm80_|cublas|Kernel2|splitKreduce"),
    ("host<->device copies", r"^Memcpy (HtoD|DtoH)|Memcpy PtoP"),
    ("other Triton", r"^triton_|_kernel$"),
    ("elementwise / copies (PyTorch)", r"elementwise|vectorized|reduce|Memcpy|Memset|copy|fill|cat|index|"
                                       r"scatter|gather|embedding|at::native|void at::"),
]


def categorize(name: str) -> str:
    for category, pattern in KERNEL_CATEGORIES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return category
    return "uncategorized"


def matmul_role(dims: tuple[int, int, int], cfg: dict, rank: int) -> str:
    """What a product (M, K, N) is: LoRA's when the rank is one of its sizes, else by its K and N (the
    weight's two sizes, in the forward and the input-gradient product alike)."""
    if rank in dims:
        return f"LoRA (r={rank} products)"
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = hd * cfg["num_attention_heads"], hd * cfg["num_key_value_heads"]
    roles = {frozenset((h, q)): "q/o projections", frozenset((h, kv)): "k/v projections",
             frozenset((h, i)): "gate/up/down projections", frozenset((h, v)): "lm_head (fused cross-entropy)"}
    return roles.get(frozenset(dims[1:]), "other matmuls")


# where the two matrices sit among an op's recorded input shapes (addmm/baddbmm: after the addend)
_MATRIX_ARGS = {"aten::_scaled_mm": (0, 1), "aten::mm": (0, 1), "aten::bmm": (0, 1), "aten::addmm": (1, 2), "aten::addmm_": (1, 2),
                "aten::baddbmm": (1, 2)}


def _dims(op: str, shapes: list) -> tuple[int, int, int] | None:
    """(M, K, N) of a product from the recorded input shapes (the batch of bmm folded into M)."""
    i, j = _MATRIX_ARGS[op]
    if len(shapes) <= j:
        return None
    a, b = shapes[i], shapes[j]
    if not (isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and len(a) in (2, 3)):
        return None
    batch = a[0] if len(a) == 3 else 1
    a, b = a[-2:], b[-2:]
    if a[1] != b[0]:
        return None
    return batch * a[0], a[1], b[1]


def breakdown(prof: profile, cfg: dict, rank: int, steps: int) -> dict:
    """Per-step GPU milliseconds by category, matmuls by role, busy time, top kernels."""
    events = prof.events()
    # GPU-side user annotations (e.g. "Optimizer.step#...") are spans, not kernels
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
               and "#" not in e.name]
    by_category: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    intervals = []
    for k in kernels:
        us = k.time_range.elapsed_us()
        by_category[categorize(k.name)] += us
        by_name[k.name] += us
        intervals.append((k.time_range.start, k.time_range.end))
    busy, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        busy += b - max(a, end)
        end = b
    by_role: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # us, flops
    for e in events:
        if e.device_type != DeviceType.CPU or e.name not in _MATRIX_ARGS:
            continue
        us = sum(k.duration for k in e.kernels)
        dims = _dims(e.name, e.input_shapes or [])
        role = "unparsed shapes" if dims is None else matmul_role(dims, cfg, rank)
        role += " (e4m3)" if e.name == "aten::_scaled_mm" else ""
        by_role[role][0] += us
        by_role[role][1] += 2.0 * math.prod(dims) if dims else 0.0
    return {
        "categories_ms": {c: us / 1e3 / steps for c, us in sorted(by_category.items(), key=lambda x: -x[1])},
        "matmul_roles": {r: {"ms": us / 1e3 / steps, "tflops": flops / us / 1e6 if us else 0.0}
                         for r, (us, flops) in sorted(by_role.items(), key=lambda x: -x[1][0])},
        "busy_ms": busy / 1e3 / steps,
        "kernel_ms": sum(by_category.values()) / 1e3 / steps,
        "top_kernels_ms": {n: us / 1e3 / steps
                           for n, us in sorted(by_name.items(), key=lambda x: -x[1])[:20]},
        # the host side, inflated by the profiler itself but ranked honestly: where the CPU spends a step
        "top_cpu_ops": [{"op": a.key, "calls": a.count // steps, "self_cpu_ms": a.self_cpu_time_total / 1e3 / steps}
                        for a in sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:25]],
    }


def print_report(r: dict) -> None:
    wall, peak = r["wall_ms"], r["peak_tflops"]
    print(f"\n{r['title']}")
    print(f"without the profiler: {wall:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}%; "
          f"under it {r['profiled_wall_ms']:.1f} ms/step")
    print(f"GPU busy (union of kernels) {r['busy_ms']:.1f} ms/step = {100 * r['busy_ms'] / wall:.1f}% of the "
          f"unprofiled step; kernel time summed {r['kernel_ms']:.1f} ms")
    print("\n| category | ms / step | share of wall |\n|---|---:|---:|")
    for c, ms in r["categories_ms"].items():
        print(f"| {c} | {ms:.1f} | {100 * ms / wall:.1f}% |")
    print(f"| GPU idle (wall - busy) | {wall - r['busy_ms']:.1f} | {100 * (wall - r['busy_ms']) / wall:.1f}% |")
    print("\n| matmul role | ms / step | TFLOP/s | of the ceiling |\n|---|---:|---:|---:|")
    for role, x in r["matmul_roles"].items():
        print(f"| {role} | {x['ms']:.1f} | {x['tflops']:.0f} | {100 * x['tflops'] / peak:.0f}% |")
    mm = r["categories_ms"].get("matmul (cuBLAS)", 0.0)
    if mm:
        print(f"\nmodel FLOPs / matmul time alone: {r['model_tflop_per_step'] / mm * 1e3:.0f} TFLOP/s "
              f"({100 * r['model_tflop_per_step'] / mm * 1e3 / peak:.0f}% of {peak:.0f})")
    print("\n| top kernels | ms / step |\n|---|---:|")
    for n, ms in r["top_kernels_ms"].items():
        print(f"| {n[:110]} | {ms:.2f} |")
    print("\n| top host ops (self CPU, under the profiler) | calls / step | ms / step |\n|---|---:|---:|")
    for x in r["top_cpu_ops"]:
        print(f"| {x['op'][:90]} | {x['calls']} | {x['self_cpu_ms']:.1f} |")
    print("\n| synchronizing calls in one step (torch.cuda sync debug mode) | count |\n|---|---:|")
    for where, n in r["syncs"].items():
        print(f"| {where} | {n} |")


def find_syncs(step) -> dict[str, int]:
    """Run `step` in torch.cuda's sync debug mode: {"file:line" of each synchronizing call: count}."""
    counts: dict[str, int] = defaultdict(int)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            counts[f"{Path(w.filename).relative_to(ROOT) if w.filename.startswith(str(ROOT)) else w.filename}"
                   f":{w.lineno}"] += 1
    return dict(sorted(counts.items(), key=lambda x: -x[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    train.add_setting_arguments(ap)
    ap.add_argument("--warmup", type=int, default=3, help="optimizer steps before profiling")
    ap.add_argument("--steps", type=int, default=2, help="profiled optimizer steps")
    ap.add_argument("--peak-tflops", type=float, default=785.0)
    ap.add_argument("--json", help="write the breakdown here")
    ap.add_argument("--trace", help="also write a Chrome trace (large)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="micro-batches by CUDA graph replay (trainer.graphs); matmul roles then go unnamed, "
                         "since no aten op runs on the host during a replay")
    ap.add_argument("--fp8", action="store_true", help="FP8 forward products, as trainer run --fp8")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU: the breakdown is of GPU kernel time")
    model_dir = train.generate(args.shape, Path(args.cache) / f"train-{args.shape}")
    cfg = train.model_config(args.shape)
    s = train_variants.Settings(args.warmup + args.steps, args.batch, args.seq, args.accum, args.gc)
    v = train_variants.Ours(model_dir, s, graphs=args.cuda_graphs, fp8=args.fp8)
    gen = torch.Generator().manual_seed(1)
    batches = [train_variants.micro_batches(gen, v.vocab, s.batch, s.seq, s.accum)
               for _ in range(args.warmup + args.steps)]
    # as bench/train.py and trainer.loop.train run ours: setup's objects frozen for the garbage collector
    with collector_frozen():
        for micro in batches[:args.warmup]:
            v.step(micro)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for micro in batches[args.warmup:]:
            v.step(micro)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / args.steps
        syncs = find_syncs(lambda: v.step(batches[-1]))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            t = time.perf_counter()
            for micro in batches[args.warmup:]:
                v.step(micro)
            torch.cuda.synchronize()
            profiled_wall = (time.perf_counter() - t) / args.steps
    if args.trace:
        prof.export_chrome_trace(args.trace)
    tokens = s.batch * s.seq * s.accum
    flops = train.flops_per_token(cfg, s.seq) * tokens
    r = {"shape": args.shape, "gc": args.gc, "device": torch.cuda.get_device_name(),
         "title": f"{args.shape}, {torch.cuda.get_device_name()}, ours with kernels{', FP8' if args.fp8 else ''}, gc {args.gc}, "
                  f"{s.batch} x {s.seq} x accum {s.accum}, {args.steps} profiled steps after {args.warmup}",
         "wall_ms": wall * 1e3, "profiled_wall_ms": profiled_wall * 1e3, "syncs": syncs, "tokens_per_s": tokens / wall, "peak_tflops": args.peak_tflops,
         "model_tflop_per_step": flops / 1e12, "mfu": flops / wall / (args.peak_tflops * 1e12),
         **breakdown(prof, cfg, train_variants.LORA_RANK, args.steps)}
    print_report(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
