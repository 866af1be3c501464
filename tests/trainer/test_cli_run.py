"""`trainer run` end to end: a real subprocess run whose loss falls, the run dir it writes, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_runs
import torch
from click.testing import CliRunner

import cli

REPO = Path(__file__).resolve().parents[2]


CHAT_ROWS = 64  # chat_data (conftest.py)


@pytest.mark.slow
def test_trainer_run_subprocess_loss_falls_and_writes_a_complete_run_dir(llama2, chat_data, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "train.yaml").write_text("template: llama-2\nlr: 0.01\nmax_steps: 1000\nlora_r: 16\n")
    cmd = [sys.executable, "-m", "trainer", "run", "--config", str(tmp_path / "train.yaml"), "--model", str(llama2),
           "--data", str(chat_data), "--out", str(out), "--max-steps", "25", "--batch-size", "4", "--grad-accum", "1",
           "--warmup-steps", "2", "--lora-alpha", "16", "--seed", "3"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 26))
    assert all(set(r) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem"} for r in records)
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    # measured: about 11.5 -> 4 (roughly a third) in 25 steps of 4 chats; require under 60%
    assert last < 0.6 * first, (first, last)
    assert records[0]["lr"] == 0.0 and records[1]["lr"] == pytest.approx(0.005) and records[2]["lr"] == pytest.approx(0.01)

    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(llama2.resolve())
    assert adapter["r"] == 16 and adapter["peft_type"] == "LORA"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    resolved = (out / "config.yaml").read_text()
    assert "max_steps: 25" in resolved and "template: llama-2" in resolved and "load_in_4bit: true" in resolved
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss" in (out / "summary.txt").read_text() and "run dir" in proc.stdout
    # the code paths, as the run resolved them (on this CPU: the plain paths, no recompute)
    assert "code paths: ModelOptions(kernels='auto', flex_attention=True, fp8=False, recompute='off')" in proc.stderr
    assert "kernels: auto" in resolved and "flex_attention: true" in resolved
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "config.yaml", "loss.png", "metrics.jsonl",
                                                     "run.json", "summary.txt"]


def test_peft_loads_the_runs_adapter_with_our_logits(llama2, chat_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.config import resolve_config
    from trainer.loop import train
    from trainer.lora import apply_lora, load_adapter_weights, read_adapter_config
    from trainer.models import load_model

    cfg = resolve_config(model=str(llama2), data=str(chat_data), out=str(tmp_path / "run"), template="llama-2",
                         max_steps=3, batch_size=1, grad_accum=1, lr=0.01, warmup_steps=0, load_in_4bit=False,
                         packing=True, max_seq_len=256)
    result = train(cfg)
    assert result.sequences < result.examples  # packed
    ours = load_model(llama2, dtype=torch.float32, device="cpu", load_in_4bit=False)
    apply_lora(ours, read_adapter_config(result.adapter_dir))
    load_adapter_weights(ours, result.adapter_dir)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama2), result.adapter_dir).eval()
    x = torch.randint(0, 32000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, reference(x).logits, rtol=1e-4, atol=1e-4)


def invoke(*args: str):
    return CliRunner().invoke(cli.trainer, ["run", *args])


def one_line_error(result) -> str:
    """The error line, which must be stderr's only 'error:' line and its last (progress lines may precede it)."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], result.stderr
    return errors[0]


def test_out_dir_that_is_not_a_run_dir_is_refused(llama2, chat_data, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    r = invoke("--model", str(llama2), "--data", str(chat_data), "--out", str(tmp_path / "mine"))
    assert r.exit_code == 2
    assert "not a trainer run dir" in one_line_error(r)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]


def test_malformed_data_line_is_named_and_nothing_is_written(llama2, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(tiny_runs.chat_rows(1)[0]) + "\n{broken\n")
    r = invoke("--model", str(llama2), "--data", str(data), "--out", str(tmp_path / "run"), "--template", "llama-2")
    assert r.exit_code == 2
    assert "d.jsonl line 2" in one_line_error(r)
    assert not (tmp_path / "run").exists()


def test_unknown_config_key_is_a_usage_error(tmp_path):
    (tmp_path / "t.yaml").write_text("model: m\nlearning_rate: 1\n")
    r = invoke("--config", str(tmp_path / "t.yaml"))
    assert r.exit_code == 2 and "unknown setting(s): learning_rate" in one_line_error(r)


def test_unsupported_architecture_names_the_supported_ones(llama2, chat_data, tmp_path):
    model = tiny_runs.copy_checkpoint(llama2, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (model / "config.json").write_text(json.dumps(config))
    r = invoke("--model", str(model), "--data", str(chat_data), "--out", str(tmp_path / "run"))
    assert r.exit_code == 2
    line = one_line_error(r)
    assert "gpt2" in line and "llama" in line and "phi3" in line
    assert not (tmp_path / "run").exists()


def test_non_finite_weights_trip_the_nan_guard_with_exit_1(llama2, chat_data, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_runs.copy_checkpoint(llama2, tmp_path / "model")
    weights = load_file(str(model / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    r = invoke("--model", str(model), "--data", str(chat_data), "--out", str(tmp_path / "run"), "--template",
               "llama-2", "--max-steps", "5", "--max-bad-steps", "2", "--batch-size", "2", "--grad-accum", "1",
               "--load-in-16bit")
    assert r.exit_code == 1
    line = one_line_error(r)
    assert "2 consecutive steps (1-2)" in line and "rows involved" in line
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped"] for x in records] == [True, True] and all(len(x["rows"]) == 2 for x in records)
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without an FP8 GPU")
def test_trainer_run_fp8_without_an_fp8_gpu_is_a_one_line_error(llama2, chat_data, tmp_path):
    r = invoke("--model", str(llama2), "--data", str(chat_data), "--out", str(tmp_path / "run"), "--fp8",
               "--template", "llama-2")
    assert r.exit_code == 2
    assert "--fp8 needs a CUDA GPU with FP8 matmuls" in one_line_error(r)
    assert not (tmp_path / "run").exists()
