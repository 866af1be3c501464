"""Tiny checkpoints and synthetic chat data for the trainer's tests (a helper module, not a test file)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import builders
import testdata

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


def llama2_checkpoint(out: Path, **config_overrides) -> Path:
    """A tiny Llama (hidden 64, 2 layers) with the real Llama-2 sentencepiece tokenizer plus tokenizer.json."""
    return builders.sentencepiece_checkpoint(out, testdata.sentencepiece_model("llama-spm"),
                                             tokenizer_json=testdata.fast_tokenizer_json("llama-spm"),
                                             **config_overrides)


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Questions with one learnable answer pattern: 'What colour is item k?' -> 'Item k is <colour>.'"""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randrange(40)
        colour = COLOURS[k % len(COLOURS)]
        rows.append({"messages": [{"role": "user", "content": f"What colour is item {k}?"},
                                  {"role": "assistant", "content": f"Item {k} is {colour}."}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def copy_checkpoint(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def metrics(run_dir: Path) -> list[dict]:
    """The per-step records a run wrote to metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every logged step."""
    return [(r["step"], r["loss"]) for r in metrics(run_dir)]
