"""Resume: a run killed with SIGTERM and resumed equals an uninterrupted run, bit for bit in float32 on CPU;
a kill during a checkpoint write leaves the previous checkpoint whole; bad --resume input is one line, exit 2.
(The 2-rank kill-and-resume and the 2-rank checkpoint resumed by one process are in test_ddp.py.)"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_runs
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import cli
from trainer.distributed import DataParallel
from trainer.lora import LoRASettings
from trainer.resume import (
    CHECKPOINTS,
    STATE_FILE,
    Progress,
    ResumeError,
    check_ranks,
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
STEPS = 24


CHAT_ROWS = 24  # chat_data (conftest.py)


def run_args(model: Path, data: Path, out: Path) -> list[str]:
    # dropout > 0: the resumed run must also restore the random state to draw the same masks
    return ["run", "--model", str(model), "--data", str(data), "--out", str(out), "--template", "llama-2",
            "--max-steps", str(STEPS), "--batch-size", "2", "--grad-accum", "2", "--warmup-steps", "3",
            "--lr", "0.01", "--lora-r", "4", "--lora-dropout", "0.1", "--load-in-16bit", "--device", "cpu",
            "--dtype", "float32", "--save-steps", "4", "--seed", "5"]


@pytest.mark.slow
def test_run_killed_with_sigterm_and_resumed_equals_an_uninterrupted_run(llama2, chat_data, tmp_path):
    whole = tmp_path / "whole"
    done = CliRunner().invoke(cli.trainer, run_args(llama2, chat_data, whole))
    assert done.exit_code == 0, done.output
    assert [s for s, _ in tiny_runs.losses(whole)] == list(range(1, STEPS + 1))

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *run_args(llama2, chat_data, cut)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while latest_checkpoint(cut) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, err.decode()[-2000:]
    stopped_at = len(tiny_runs.losses(cut))
    assert stopped_at < STEPS and not (cut / "adapter").exists()

    resumed = CliRunner().invoke(cli.trainer, ["run", "--resume", str(cut)])
    assert resumed.exit_code == 0, resumed.output
    assert tiny_runs.losses(cut) == tiny_runs.losses(whole)
    a = load_file(cut / "adapter" / "adapter_model.safetensors")
    b = load_file(whole / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # only the last two checkpoints stay
    assert [p.name for p in checkpoint_dirs(cut)] == [f"step-{STEPS - 4:06d}", f"step-{STEPS:06d}"]


KILL_MID_WRITE = r"""
import sys, time
from pathlib import Path
import torch
from trainer.lora import LoRASettings
from trainer.resume import Progress, save_checkpoint

class SlowToPickle:
    def __reduce__(self):
        print("writing", flush=True)
        time.sleep(600)
        return (float, (0.0,))

model = torch.nn.Sequential(torch.nn.Linear(4, 4))
opt = torch.optim.AdamW(model.parameters())
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
run = Path(sys.argv[1])
save_checkpoint(run, model, opt, sched, Progress(step=2, history=[(1.0, False)] * 2), settings=LoRASettings(),
                base_model="m")
print("saved", flush=True)
save_checkpoint(run, model, opt, sched, Progress(step=4, history=[(SlowToPickle(), False)]),
                settings=LoRASettings(), base_model="m")
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_whole(tmp_path):
    script = tmp_path / "kill_mid_write.py"
    script.write_text(KILL_MID_WRITE)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    root = tmp_path / "run" / CHECKPOINTS
    assert any(p.name.startswith(".step-000004.tmp") for p in root.iterdir())  # the write was under way
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-000002"]
    state = torch.load(root / "step-000002" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and len(state["history"]) == 2
    assert (root / "step-000002" / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_of_a_dir_that_is_not_a_run_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = CliRunner().invoke(cli.trainer, ["run", "--resume", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a trainer run dir" in result.output and len(result.output.strip().splitlines()) == 1


def test_resume_with_a_shape_changing_setting_or_model_is_one_line_and_exit_2(llama2, chat_data, tmp_path):
    run = tmp_path / "run"
    args = run_args(llama2, chat_data, run)
    args[args.index("--max-steps") + 1] = "4"
    assert CliRunner().invoke(cli.trainer, args).exit_code == 0
    result = CliRunner().invoke(cli.trainer, ["run", "--resume", str(run), "--lora-r", "8"])
    assert result.exit_code == 2 and "lora_r" in result.output
    assert len(result.output.strip().splitlines()) == 1

    other = tiny_runs.llama2_checkpoint(tmp_path / "wider", hidden_size=96, intermediate_size=128)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(f"model: {llama2.resolve()}", f"model: {other.resolve()}"))
    assert f"model: {other.resolve()}" in (run / "config.yaml").read_text()
    result = CliRunner().invoke(cli.trainer, ["run", "--resume", str(run)])
    assert result.exit_code == 2 and "shape" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert os.path.isdir(latest_checkpoint(run))


def _tiny_training_state():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("layout", ["per-rank", "single state of earlier versions"])
def test_a_checkpoint_restores_the_python_numpy_and_torch_random_states_it_saved(tmp_path, layout):
    model, opt, sched = _tiny_training_state()
    _seed_all(3)
    path = save_checkpoint(tmp_path, model, opt, sched, Progress(step=1, history=[(1.0, False)]),
                           settings=LoRASettings(), base_model="m")
    expected = _draws()
    if layout != "per-rank":
        # what a checkpoint written before per-rank states holds: one process's states under "rng"
        state = torch.load(path / STATE_FILE, weights_only=True)
        state["rng"] = state.pop("rng_by_rank")[0]
        torch.save(state, path / STATE_FILE)
    _seed_all(4)
    assert _draws() != expected
    progress = load_checkpoint(path, model, opt, sched)
    assert progress.step == 1 and _draws() == expected


def test_a_one_process_checkpoint_resumed_by_two_ranks_is_a_resume_error_before_any_state_changes(tmp_path):
    model, opt, sched = _tiny_training_state()
    path = save_checkpoint(tmp_path, model, opt, sched, Progress(step=1, history=[(1.0, False)]),
                           settings=LoRASettings(), base_model="m")
    weight = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    two_ranks = DataParallel(rank=1, world_size=2, device=torch.device("cpu"))
    for attempt in (lambda: check_ranks(path, two_ranks), lambda: load_checkpoint(path, model, opt, sched, two_ranks)):
        with pytest.raises(ResumeError) as e:
            attempt()
        message = str(e.value)
        assert "random states of 1 process(es) but this run has 2" in message and "no torchrun" in message
        assert "\n" not in message
    assert torch.equal(model[0].weight, weight + 1.0)
    check_ranks(path, None)


class RunsOutOfMemory(torch.nn.Module):
    """The model, raising the CUDA allocator's error from the third forward on (as a long batch would)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls >= 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(*args, **kwargs)


def test_out_of_memory_names_the_batch_and_the_flags_and_keeps_the_last_checkpoint(tmp_path):
    import builders

    from trainer.config import TrainConfig
    from trainer.data import IGNORE_INDEX, Example, as_sequences
    from trainer.loop import OutOfMemory, run_steps
    from trainer.lora import apply_lora, trainable_parameters
    from trainer.models import load_model

    builders.save_tiny_model(tmp_path / "m", "llama", 128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = load_model(tmp_path / "m", dtype=torch.float32, device="cpu", load_in_4bit=False)
    settings = apply_lora(model, LoRASettings(r=4, alpha=8))
    seqs = as_sequences([Example(list(range(3, 3 + n)), [IGNORE_INDEX] + list(range(4, 3 + n)), i)
                         for i, n in enumerate((9, 13, 11))])
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    out = tmp_path / "run"
    out.mkdir()
    cfg = TrainConfig(model="m", data="d", out=str(out), batch_size=2, grad_accum=1, save_steps=2, max_seq_len=64)
    progress = Progress()
    plan = [[[0, 1]], [[2]], [[1, 2]], [[0]]]
    with pytest.raises(OutOfMemory) as e:
        run_steps(RunsOutOfMemory(model), seqs, plan, opt, sched, cfg, out=out, pad_id=0,
                  device=torch.device("cpu"), dtype=torch.float32, console=_quiet_console(), progress=progress,
                  save=lambda: save_checkpoint(out, model, opt, sched, progress, settings=settings, base_model="m"))
    message = str(e.value)
    assert "step 3" in message and "2 x 13 tokens" in message and "max_seq_len 64" in message
    assert "--gradient-checkpointing offload" in message and "--batch-size 1 --grad-accum 2" in message
    assert "step-000002" in message and f"--resume {out}" in message
    assert [p.name for p in checkpoint_dirs(out)] == ["step-000002"]
    assert torch.load(out / CHECKPOINTS / "step-000002" / "trainer_state.pt", weights_only=True)["step"] == 2


def _quiet_console():
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=False)
