"""Data parallelism: `torchrun --nproc-per-node 2 -m trainer run` on CPU (gloo) trains the same steps as one
process with the same global batch: equal per-step losses and final adapter, and only rank 0 writes. A 2-rank
run with LoRA dropout killed with SIGTERM and resumed equals an uninterrupted 2-rank run, bit for bit."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_runs
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import cli
from trainer.distributed import shard_step
from trainer.resume import STATE_FILE, checkpoint_dirs, latest_checkpoint

REPO = Path(__file__).resolve().parents[2]


# chat_data (conftest.py): 25 rows, 6 per step: the last step holds one sequence, so the second rank has
# nothing to learn from
CHAT_ROWS = 25


def run_args(model: Path, data: Path, out: Path, mode: str) -> list[str]:
    return ["run", "--model", str(model), "--data", str(data), "--out", str(out), "--template", "llama-2",
            "--epochs", "1", "--batch-size", "2", "--grad-accum", "3", "--warmup-steps", "1", "--lr", "0.01",
            "--lora-r", "4", "--load-in-16bit", "--device", "cpu", "--dtype", "float32", "--seed", "7",
            "--gradient-checkpointing", mode]


def torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "trainer",
            *args]


@pytest.fixture(scope="module")
def single(llama2, chat_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    done = CliRunner().invoke(cli.trainer, run_args(llama2, chat_data, out, "off"))
    assert done.exit_code == 0, done.output
    return out


def test_shards_of_a_step_cover_its_sequences_once_in_micro_batches_of_batch_size():
    step = [[5, 1], [7, 2], [9]]
    shards = [shard_step(step, r, 2, 2) for r in range(2)]
    assert shards == [[[5, 7], [9]], [[1, 2]]]
    assert shard_step([[4]], 1, 2, 2) == []


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["off", "offload"])
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(llama2, chat_data, single, tmp_path, mode):
    ddp = tmp_path / "ddp"
    proc = subprocess.run(torchrun(run_args(llama2, chat_data, ddp, mode)), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = tiny_runs.metrics(single), tiny_runs.metrics(ddp)
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


RESUME_STEPS = 16


@pytest.fixture(scope="module")
def varied_chat(tmp_path_factory) -> Path:
    """16 chats whose answers say it once, twice or three times: sequences of clearly different lengths."""
    rows = tiny_runs.chat_rows(16)
    for i, row in enumerate(rows):
        answer = row["messages"][1]
        answer["content"] = " ".join([answer["content"]] * (1 + i % 3))
    return tiny_runs.write_jsonl(tmp_path_factory.mktemp("varied") / "chat.jsonl", rows)


def dropout_args(model: Path, data: Path, out: Path) -> list[str]:
    # dropout > 0 and one sequence per rank per step, of different lengths: the ranks draw masks of different
    # sizes, so their random states part and a resumed rank needs its own
    return ["run", "--model", str(model), "--data", str(data), "--out", str(out), "--template", "llama-2",
            "--max-steps", str(RESUME_STEPS), "--batch-size", "1", "--grad-accum", "2", "--warmup-steps", "2",
            "--lr", "0.01", "--lora-r", "4", "--lora-dropout", "0.1", "--load-in-16bit", "--device", "cpu",
            "--dtype", "float32", "--save-steps", "4", "--seed", "5"]


@pytest.fixture(scope="module")
def cut(llama2, varied_chat, tmp_path_factory) -> Path:
    """A 2-rank run with LoRA dropout, its torchrun killed with SIGTERM once the first checkpoint is written."""
    out = tmp_path_factory.mktemp("cut") / "run"
    proc = subprocess.Popen(torchrun(dropout_args(llama2, varied_chat, out)), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while latest_checkpoint(out) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err.decode()[-3000:]
    assert len(tiny_runs.losses(out)) < RESUME_STEPS and not (out / "adapter").exists()
    return out


@pytest.mark.slow
def test_two_rank_run_with_dropout_killed_and_resumed_equals_an_uninterrupted_two_rank_run(llama2, varied_chat, cut,
                                                                                             tmp_path):
    whole = tmp_path / "whole"
    proc = subprocess.run(torchrun(dropout_args(llama2, varied_chat, whole)), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s for s, _ in tiny_runs.losses(whole)] == list(range(1, RESUME_STEPS + 1))
    # the checkpoint resumed from holds two different random states, else this test could not tell them apart
    rng = torch.load(latest_checkpoint(cut) / STATE_FILE, weights_only=True)["rng_by_rank"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])

    proc = subprocess.run(torchrun(["run", "--resume", str(cut)]), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tiny_runs.losses(cut) == tiny_runs.losses(whole)
    a = load_file(cut / "adapter" / "adapter_model.safetensors")
    b = load_file(whole / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [p.name for p in checkpoint_dirs(cut)] == [f"step-{RESUME_STEPS - 4:06d}", f"step-{RESUME_STEPS:06d}"]


@pytest.mark.slow
def test_resume_of_a_two_rank_checkpoint_by_one_process_is_one_line_and_exit_2(cut, tmp_path):
    run = shutil.copytree(cut, tmp_path / "run")
    result = CliRunner().invoke(cli.trainer, ["run", "--resume", str(run)])
    assert result.exit_code == 2, result.output
    assert "random states of 2 process(es) but this run has 1" in result.output
    assert "torchrun --nproc-per-node 2" in result.output and len(result.output.strip().splitlines()) == 1
