"""`trainer run` with and without --cuda-graphs on chat data of many lengths (GPU).

The demo's repaired checkpoint (healer.example, Llama architecture) at --hidden / --layers, and its
generated chats (short rows of varying length): the setting where the eager step is most host-bound
and where padding decides whether graphs can be replayed at all (trainer.graphs.padded_length). Each
run is a real `trainer run` subprocess; the table reads their summary.txt and metrics.jsonl.

    python bench/graphs_cli.py [--hidden 1024] [--layers 8] [--steps 60] [--max-seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from healer.example import build_example, write_chat_dataset
    from healer.fix import repair

    work = Path(tempfile.mkdtemp(prefix="graphs-cli-"))
    build_example(work / "flawed", hidden_size=args.hidden, num_layers=args.layers)
    repair(work / "flawed", work / "fixed", chatml=True)
    write_chat_dataset(work / "chats.jsonl", args.steps * args.batch_size * args.grad_accum, 0)
    results = {}
    for flag in ("--no-cuda-graphs", "--cuda-graphs"):
        out = work / flag.strip("-")
        cmd = [sys.executable, "-m", "trainer", "run", "--model", str(work / "fixed"), "--data",
               str(work / "chats.jsonl"), "--out", str(out), "--device", "cuda", "--max-steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum), "--lr", "2e-3",
               "--max-seq-len", str(args.max_seq_len), "--gradient-checkpointing", "on", flag]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            sys.exit(f"{flag}: trainer run failed:\n{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        late = records[len(records) // 4:]  # past the captures and warm-up
        results[flag] = {
            "tokens_per_s_late_steps": sum(r["tokens_per_s"] for r in late) / len(late),
            "final_loss": records[-1]["loss"], "first_loss": records[0]["loss"],
            "peak_mem_gib": records[-1]["peak_mem"] / 2**30, "process_wall_s": wall,
            "summary": (out / "summary.txt").read_text(),
        }
    print(f"\ntrainer run, demo Llama hidden {args.hidden} x {args.layers} layers, batch {args.batch_size} x accum "
          f"{args.grad_accum}, max-seq-len {args.max_seq_len}, {args.steps} steps")
    print("| run | tokens/s (last 3/4 of steps) | loss first -> last | peak memory | process wall |")
    print("|---|---:|---:|---:|---:|")
    for flag, r in results.items():
        print(f"| {flag} | {r['tokens_per_s_late_steps']:,.0f} | {r['first_loss']:.3f} -> {r['final_loss']:.3f} | "
              f"{r['peak_mem_gib']:.2f} GiB | {r['process_wall_s']:.0f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
