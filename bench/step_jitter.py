"""Benchmark (GPU): where our step-to-step time variation comes from; Python's garbage collector or not.

bench/train.py's step times for our trainer spread from 1.60 to 2.11 s (Llama-3-8B shape, H100) where
the Hugging Face stack's stay within 1%. Our step is partly host-bound, so a pause on the host shows
up in the step time. This runs our variant (bench/train_variants.Ours: same model, data and settings as
bench/train.py) in one process, in alternating blocks of steps under each collector mode, and records
per step the wall time and the time spent inside the cyclic garbage collector (gc.callbacks), by
generation:

    default   Python's automatic collection, as bench/train.py and `trainer run` had it
    frozen    inside trainer.loop.collector_frozen (what `trainer run` and bench/train.py now do):
              gc.collect() then gc.freeze(), so full collections no longer walk what setup left alive

Run it with nvidia-smi logging clocks and clocks_event_reasons beside it to see the GPU's own share
(bench/KERNEL_NOTES.md: the H100 capped its power and lowered its clocks in the same run).

    python bench/step_jitter.py [--shape llama3-8b] [--blocks 2] [--steps-per-block 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402
import train_variants  # noqa: E402


class GCClock:
    """Seconds spent in the collector since the last take(), by generation, and collection counts."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.counts = [0, 0, 0]
        self._t0 = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            g = info["generation"]
            self.seconds[g] += time.perf_counter() - self._t0
            self.counts[g] += 1

    def take(self) -> dict:
        out = {"gc_ms": [round(s * 1e3, 2) for s in self.seconds], "gc_counts": list(self.counts)}
        self.seconds, self.counts = [0.0, 0.0, 0.0], [0, 0, 0]
        return out


def mode_context(mode: str):
    from trainer.loop import collector_frozen

    return collector_frozen() if mode == "frozen" else contextlib.nullcontext()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    train.add_setting_arguments(ap, gc=False)
    ap.add_argument("--blocks", type=int, default=2, help="blocks per mode, alternating")
    ap.add_argument("--steps-per-block", type=int, default=6)
    ap.add_argument("--modes", default="default,frozen")
    ap.add_argument("--json")
    args = ap.parse_args()
    modes = args.modes.split(",")
    model_dir = Path(args.cache) / f"train-{args.shape}"
    train.generate(args.shape, model_dir)
    s = train_variants.Settings(0, args.batch, args.seq, args.accum)
    v = train_variants.Ours(model_dir, s)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # warm-up: kernels compiled, allocator settled
        v.step(train_variants.micro_batches(gen, v.vocab, s.batch, s.seq, s.accum))
    clock = GCClock()
    rows = []
    for block in range(args.blocks):
        for mode in modes:
            with mode_context(mode):
                clock.take()
                for _ in range(args.steps_per_block):
                    micro = train_variants.micro_batches(gen, v.vocab, s.batch, s.seq, s.accum)
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    v.step(micro)
                    torch.cuda.synchronize()
                    rows.append({"block": block, "mode": mode, "end_unix": round(time.time(), 3),
                                 "step_s": round(time.perf_counter() - t, 4), **clock.take()})
    tokens = args.batch * args.seq * args.accum
    print(f"{args.shape}, {torch.cuda.get_device_name()}, {args.batch} x {args.seq} x accum {args.accum}; "
          f"objects tracked after setup: {len(gc.get_objects())}")
    print(f"{'mode':<10}{'steps':>6}{'median s':>10}{'max s':>8}{'tokens/s':>10}{'gc ms/step':>12}"
          f"{'gen2 runs':>10}")
    summary = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        times = [r["step_s"] for r in mine]
        gc_ms = sum(sum(r["gc_ms"]) for r in mine) / len(mine)
        gen2 = sum(r["gc_counts"][2] for r in mine)
        summary[mode] = {"median_s": statistics.median(times), "max_s": max(times),
                         "tokens_per_s": tokens * len(times) / sum(times), "gc_ms_per_step": gc_ms,
                         "gen2_collections": gen2}
        print(f"{mode:<10}{len(times):>6}{statistics.median(times):>10.3f}{max(times):>8.3f}"
              f"{summary[mode]['tokens_per_s']:>10.0f}{gc_ms:>12.1f}{gen2:>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "device": torch.cuda.get_device_name(),
                                               "summary": summary, "steps": rows}, indent=1))


if __name__ == "__main__":
    main()
