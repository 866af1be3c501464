"""`trainer export --verify`: the written GGUF run in llama.cpp on the run's own data, against PEFT in transformers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from export_helpers import (  # noqa: F401 (llama_cpp_required: fixture)
    chatml_llama,
    healed_chatml_llama,
    llama_cpp_required,
    make_adapter,
    run_dir_with_adapter_subdir,
)

from cli import trainer

INIT = {"initializer_range": 0.2}
CHATS = [[{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine, thanks. And you?"}],
         [{"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "Red, green, blue."}]]


def chatml_run(root: Path, base: Path) -> Path:
    """A trainer-style run dir over `base`: adapter, config.yaml naming the model and a ChatML dataset."""
    adapter = make_adapter(base, root / "adapter")
    run = run_dir_with_adapter_subdir(adapter, root / "run")
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS), encoding="utf-8")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(base), "data": str(data), "out": str(run),
                                                     "template": "chatml"}), encoding="utf-8")
    return run


def cli_export(run: Path, out: Path, *extra: str):
    return CliRunner().invoke(trainer, ["export", str(run), "-o", str(out), "--format", "gguf", *extra])


@pytest.mark.slow
@pytest.mark.usefixtures("llama_cpp_required")
def test_verify_reports_equal_ids_and_close_logits_for_a_healed_chatml_model(tmp_path):
    run = chatml_run(tmp_path, healed_chatml_llama(tmp_path / "base", **INIT))
    result = cli_export(run, tmp_path / "m.gguf", "--quant", "f16", "--verify")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.gguf.verify.json").read_text())
    assert report["ids_equal"] and len(report["examples"]) == len(CHATS)
    # f16 weights, f16 activations in llama.cpp: same argmax nearly everywhere, KL ~ 1e-5
    assert report["top1"] >= 0.9 and report["kl"] < 1e-3
    assert "all" in result.output and "m.gguf.verify.json" in result.output


@pytest.mark.slow
@pytest.mark.usefixtures("llama_cpp_required")
def test_verify_exits_1_when_llama_cpp_tokenizes_the_training_text_differently(tmp_path):
    """transformers' Llama 2 tokenizer gives [<|im_start|>, "user"], llama.cpp [<|im_start|>, "▁user"]."""
    run = chatml_run(tmp_path, chatml_llama(tmp_path / "base", **INIT))
    result = cli_export(run, tmp_path / "m.gguf", "--quant", "q8_0", "--verify")
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "m.gguf.verify.json").read_text())
    assert not report["ids_equal"] and report["examples"][0]["first_difference"] == 2
    assert "error: llama.cpp tokenizes the run's data differently" in result.output


def test_verify_needs_gguf_output_and_llama_cpp_with_one_line_and_exit_2(tmp_path, monkeypatch):
    run = chatml_run(tmp_path, healed_chatml_llama(tmp_path / "base"))
    hf = CliRunner().invoke(trainer, ["export", str(run), "-o", str(tmp_path / "merged"), "--verify"])
    assert hf.exit_code == 2 and hf.output.strip().count("\n") == 0 and "--format gguf" in hf.output
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    missing = cli_export(run, tmp_path / "m.gguf", "--verify")
    assert missing.exit_code == 2 and missing.output.strip().count("\n") == 0
    assert "pip install llama-cpp-python==0.3.36" in missing.output
    assert not (tmp_path / "m.gguf").exists()
