"""bench/train.py on a CPU: the Unsloth variant's bad input, its kernel check, its wheels, the new shapes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# bench/ only while importing: its kernels.py would stand in for the `kernels` package transformers imports
_path = sys.path[:]
sys.path.insert(0, str(REPO / "bench"))
try:
    import train
    import train_variants
    import unsloth_wheels
finally:
    sys.path[:] = _path


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is not None, reason="unsloth is installed here")
@pytest.mark.parametrize("only", ["unsloth", "Unsloth,HF"])
def test_only_unsloth_without_unsloth_says_what_to_carry_in_one_line_and_exits_2(only, tmp_path):
    proc = subprocess.run([sys.executable, "bench/train.py", "--only", only, "--cache", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "unsloth==2026.10.9 and unsloth_zoo==2026.10.9" in lines[0]
    assert "No module named 'unsloth'" in lines[0]
    assert "python bench/unsloth_wheels.py" in lines[0] and "carry .whl" in lines[0]
    assert "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site" in lines[0]
    assert list(tmp_path.iterdir()) == []  # refused before writing the random model


def test_unsloth_report_finds_no_unsloth_code_in_a_plain_peft_model():
    from builders import tiny_model
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", 64, hidden_size=32, intermediate_size=64)  # 2 layers, 4 heads, 2 KV heads
    model = get_peft_model(base, LoraConfig(r=4, target_modules=train_variants.LORA_TARGETS))
    report = train_variants.unsloth_report(model)
    assert report["layers"] == 2 and report["fast_path"] is False
    assert report["fused_lora"] == {"qkv": 0, "o": 0, "mlp": 0}
    assert set(report["class_forwards"]) == {"LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "Linear",
                                             "LlamaForCausalLM"}
    assert not any(m.startswith("unsloth") for m in report["class_forwards"].values())

    ids = torch.randint(0, 64, (1, 8))
    functions = train_variants.autograd_functions(model(input_ids=ids, labels=ids).loss)
    assert functions["AccumulateGrad"] == 2 * 2 * 7  # A and B of seven projections in two layers


def test_strip_folder_drops_the_files_and_their_record_lines(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    record = "pkg/__init__.py,sha256=x,1\nstudio/app.js,sha256=y,2\npkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/__init__.py", "x = 1\n")
        z.writestr("studio/app.js", "y")
        z.writestr("studio/backend/main.py", "z")
        z.writestr("pkg-1.0.dist-info/RECORD", record)
    assert unsloth_wheels.strip_folder(wheel, "studio") == 2
    with zipfile.ZipFile(wheel) as z:
        assert z.namelist() == ["pkg/__init__.py", "pkg-1.0.dist-info/RECORD"]
        assert z.read("pkg-1.0.dist-info/RECORD").decode() == (
            "pkg/__init__.py,sha256=x,1\npkg-1.0.dist-info/RECORD,,\n")
    assert unsloth_wheels.strip_folder(wheel, "studio") == 0


@pytest.mark.parametrize("shape", ["tiny-qwen3", "tiny-gemma3"])
def test_random_checkpoints_of_the_new_families_hold_every_tensor_transformers_and_ours_expect(shape, tmp_path):
    from transformers import AutoModelForCausalLM

    from trainer.models import load_model

    model_dir = train.generate(shape, tmp_path / shape)
    _, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = load_model(model_dir, dtype=torch.bfloat16)
    norms = {n: p for n, p in ours.named_parameters() if "norm" in n}
    assert any("q_norm" in n for n in norms)
    offset = shape == "tiny-gemma3"  # Gemma's norms scale by (1 + w): a neutral weight is 0
    assert all(torch.all(p == (0.0 if offset else 1.0)) for p in norms.values())


def test_graph_variants_under_several_gpus_are_reported_not_run_instead_of_run_eagerly(tmp_path):
    proc = subprocess.run([sys.executable, "bench/train.py", "--shape", "tiny", "--gpus", "2", "--only", "CUDA graphs",
                           "--cache", str(tmp_path), "--json", str(tmp_path / "out.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    assert set(results) == {"ours, Triton kernels + CUDA graphs", "ours, Triton + CUDA graphs + FP8"}
    assert all(r["error"].startswith("not run: CUDA graphs are off under data parallelism") for r in results.values())
