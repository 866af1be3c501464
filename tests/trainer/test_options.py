"""The switches that pick a code path are one visible object (trainer.options.ModelOptions): built from the
run's config, given to every module at construction, shown by print(model); no environment variable decides."""

from __future__ import annotations

import re
from pathlib import Path

import builders
import pytest
import torch

from trainer.config import ConfigError, model_options, resolve_config
from trainer.lora import LoRASettings, apply_lora, lora_modules
from trainer.models import load_model
from trainer.options import ModelOptions

ROOT = Path(__file__).resolve().parents[2]


def test_the_run_config_becomes_the_model_options():
    cfg = resolve_config(None, model="m", data="d", out="o", kernels="off", flex_attention=False,
                         gradient_checkpointing="offload")
    assert model_options(cfg) == ModelOptions(kernels="off", flex_attention=False, fp8=False, recompute="offload")
    assert model_options(resolve_config(None, model="m", data="d", out="o")) == ModelOptions()


def test_an_unknown_kernels_mode_is_a_config_error_naming_the_modes():
    with pytest.raises(ConfigError, match="auto, off, interpret"):
        resolve_config(None, model="m", data="d", out="o", kernels="fast")
    with pytest.raises(ValueError, match="recompute must be one of off, on, offload"):
        ModelOptions(recompute="sometimes")


def test_every_module_of_a_model_holds_the_options_it_was_built_with(tmp_path):
    builders.save_tiny_model(tmp_path, "qwen3", 128)
    options = ModelOptions(kernels="off", flex_attention=False, recompute="on")
    model = load_model(tmp_path, dtype=torch.float32, options=options)
    apply_lora(model, LoRASettings(r=4, alpha=8))
    holders = [m for m in model.modules() if hasattr(m, "options")]
    # the model, its decoder, per layer: attention, MLP, 4 norms (2 of them Qwen3's q/k norms); the final norm;
    # 7 LoRA layers per layer
    assert len(holders) == 2 + 2 * (2 + 4 + 7) + 1
    assert all(m.options is options for m in holders)
    assert repr(model).splitlines()[:2] == ["CausalLM(", f"  options={options!r}"]
    assert all(repr(options) in m.extra_repr() for m in lora_modules(model).values())
    assert "kernels='off', flex_attention=False, fp8=False, recompute='on'" in repr(model)


def test_kernels_off_runs_the_plain_paths_and_interpret_the_kernels_on_the_cpu(tmp_path):
    builders.save_tiny_model(tmp_path, "llama", 128)
    ids = torch.randint(3, 128, (1, 9))
    fused_loss = {}
    for kernels in ("off", "interpret", "auto"):
        model = load_model(tmp_path, dtype=torch.float32, options=ModelOptions(kernels=kernels))
        fused_loss[kernels] = model(ids, labels=ids).logits is None  # the fused loss kernel returns no logits
    assert fused_loss == {"off": False, "interpret": True, "auto": False}  # auto: the kernels on CUDA only


def test_no_environment_variable_is_read_outside_launch_and_cli_setup():
    """Only torchrun's launch contract (RANK, WORLD_SIZE: trainer.distributed) and the CLI's offline default
    read the environment; every other switch is an option."""
    readers = set()
    for package in ("healer", "trainer", "export"):
        for path in (ROOT / package).rglob("*.py"):
            if re.search(r"os\.environ|os\.getenv", path.read_text(encoding="utf-8")):
                readers.add(path.relative_to(ROOT).as_posix())
    assert readers == {"trainer/distributed.py"}


def test_kernels_interpret_without_tritons_interpreter_is_a_one_line_error_before_any_loading(tmp_path):
    """The CLI in a fresh process without TRITON_INTERPRET: exit 2 and one line, before the model is read."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "trainer", "run", "--model", str(tmp_path / "no-model"), "--data",
                           str(tmp_path / "no-data.jsonl"), "--out", str(tmp_path / "run"), "--kernels", "interpret"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: setting kernels=\"interpret\" needs TRITON_INTERPRET=1 set "
                                                "before triton is imported"], proc.stderr
