"""Data parallelism: `torchrun --nproc-per-node 2 -m trainer run` on CPU (gloo) trains the same steps as one
process with the same global batch: equal per-step losses and final adapter, and only rank 0 writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import cli
from trainer.distributed import shard_step

REPO = Path(__file__).resolve().parents[2]


# chat_data (conftest.py): 25 rows, 6 per step: the last step holds one sequence, so the second rank has
# nothing to learn from
CHAT_ROWS = 25


def run_args(model: Path, data: Path, out: Path, mode: str) -> list[str]:
    return ["run", "--model", str(model), "--data", str(data), "--out", str(out), "--template", "llama-2",
            "--epochs", "1", "--batch-size", "2", "--grad-accum", "3", "--warmup-steps", "1", "--lr", "0.01",
            "--lora-r", "4", "--load-in-16bit", "--device", "cpu", "--dtype", "float32", "--seed", "7",
            "--gradient-checkpointing", mode]


@pytest.fixture(scope="module")
def single(llama2, chat_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    done = CliRunner().invoke(cli.trainer, run_args(llama2, chat_data, out, "off"))
    assert done.exit_code == 0, done.output
    return out


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_shards_of_a_step_cover_its_sequences_once_in_micro_batches_of_batch_size():
    step = [[5, 1], [7, 2], [9]]
    shards = [shard_step(step, r, 2, 2) for r in range(2)]
    assert shards == [[[5, 7], [9]], [[1, 2]]]
    assert shard_step([[4]], 1, 2, 2) == []


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["off", "offload"])
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(llama2, chat_data, single, tmp_path, mode):
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "trainer",
           *run_args(llama2, chat_data, ddp, mode)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = records(single), records(ddp)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)
        assert b["lr"] == a["lr"]
    x = load_file(single / "adapter" / "adapter_model.safetensors")
    y = load_file(ddp / "adapter" / "adapter_model.safetensors")
    assert x.keys() == y.keys() and x
    for name in x:
        torch.testing.assert_close(y[name], x[name], rtol=1e-4, atol=1e-6, msg=name)
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
