"""Bad input to export: typed errors with one actionable line, and never a partial output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import builders
import pytest
import testdata
from click.testing import CliRunner
from export_helpers import make_adapter

import export
from export.errors import AdapterMismatchError, UnsupportedError
from export.source import Source
from healer.errors import CheckpointError, HealerError, OutputError

VOCAB = 96


def tiny(path: Path, family: str = "llama", **overrides) -> Path:
    builders.save_tiny_model(path, family, VOCAB, **overrides)
    return path


def leftovers(directory: Path, out_name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if out_name in p.name)


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = tiny(root / "base")
    return base, make_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj"])


def test_adapter_of_another_architecture_is_refused(tmp_path, llama_adapter):
    _, adapter = llama_adapter
    other = tiny(tmp_path / "qwen", "qwen2")
    with pytest.raises(AdapterMismatchError) as e:
        export.merge(adapter, tmp_path / "out", base=other)
    assert "LlamaForCausalLM" in one_line(e.value) and "--base" in str(e.value)
    assert leftovers(tmp_path, "out") == []


def test_adapter_of_another_size_is_refused_with_the_shapes(tmp_path, llama_adapter):
    _, adapter = llama_adapter
    wider = tiny(tmp_path / "wide", hidden_size=96, head_dim=24)
    with pytest.raises(AdapterMismatchError) as e:
        export.to_gguf(adapter, tmp_path / "out.gguf", base=wider)
    assert "shape" in one_line(e.value) and "[96, 96]" in str(e.value)
    assert leftovers(tmp_path, "out") == []


def test_adapter_for_modules_the_base_lacks_is_refused(tmp_path, llama_adapter):
    _, adapter = llama_adapter
    shallow = tiny(tmp_path / "shallow", num_hidden_layers=1)
    with pytest.raises(AdapterMismatchError) as e:
        export.merge(adapter, tmp_path / "out", base=shallow)
    assert "layers.1" in one_line(e.value)


def test_missing_recorded_base_asks_for_base_option(tmp_path, llama_adapter):
    _, adapter = llama_adapter
    moved = shutil.copytree(adapter, tmp_path / "adapter")
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(HealerError) as e:
        export.merge(moved, tmp_path / "out")
    assert "--base" in one_line(e.value) and "meta-llama/Llama-3.1-8B" in str(e.value)


def test_dora_adapters_are_refused(tmp_path, llama_adapter):
    base, _ = llama_adapter
    adapter = make_adapter(base, tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    with pytest.raises(UnsupportedError) as e:
        export.merge(adapter, tmp_path / "out")
    assert "DoRA" in one_line(e.value)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    model.save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(UnsupportedError) as e:
        export.to_gguf(tmp_path / "gpt2", tmp_path / "out.gguf")
    assert "'gpt2'" in one_line(e.value) and "qwen2" in str(e.value)
    assert leftovers(tmp_path, "out") == []


def test_unsupported_quant_type_is_refused_before_reading_anything(tmp_path):
    with pytest.raises(UnsupportedError) as e:
        export.to_gguf(tmp_path / "does-not-exist", tmp_path / "out.gguf", "q4_k")
    assert "q8_0" in one_line(e.value)


def test_quantized_base_is_refused(tmp_path):
    base = tiny(tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError) as e:
        export.merge(base, tmp_path / "out")
    assert "16-bit" in one_line(e.value)


def test_existing_output_is_refused_without_force_and_replaced_with_it(tmp_path, llama_adapter):
    _, adapter = llama_adapter
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputError) as e:
        export.merge(adapter, out)
    assert "--force" in one_line(e.value)
    assert (out / "keep.txt").read_text() == "user data"
    export.merge(adapter, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path, "merged") == ["merged"]


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError])
def test_interrupted_merge_leaves_no_partial_output(tmp_path, llama_adapter, monkeypatch, interruption):
    _, adapter = llama_adapter
    calls = []
    real = Source.tensor

    def failing(self, name):
        calls.append(name)
        if len(calls) == 5:
            raise interruption(28, "No space left on device")
        return real(self, name)

    monkeypatch.setattr(Source, "tensor", failing)
    with pytest.raises(KeyboardInterrupt if interruption is KeyboardInterrupt else OutputError) as e:
        export.merge(adapter, tmp_path / "merged")
    if interruption is OSError:
        assert "No space left on device" in one_line(e.value)
    assert len(calls) == 5 and leftovers(tmp_path, "merged") == []


def test_corrupt_base_shard_is_a_checkpoint_error(tmp_path, llama_adapter):
    base, adapter = llama_adapter
    broken = shutil.copytree(base, tmp_path / "broken")
    shard = broken / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        export.to_gguf(adapter, tmp_path / "out.gguf", base=broken)
    assert "truncated" in one_line(e.value)
    assert leftovers(tmp_path, "out") == []


def test_cli_export_writes_gguf_and_reports_bad_input_on_one_line_with_exit_2(tmp_path):
    from cli import trainer

    base = builders.sentencepiece_checkpoint(tmp_path / "base", testdata.sentencepiece_model("llama-spm"))
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    runner = CliRunner()
    ok = runner.invoke(trainer, ["export", str(adapter), "-o", str(tmp_path / "m.gguf"), "--format", "gguf",
                                 "--quant", "q8_0"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "m.gguf").is_file()
    again = runner.invoke(trainer, ["export", str(adapter), "-o", str(tmp_path / "m.gguf"), "--format", "gguf"])
    assert again.exit_code == 2
    assert again.output.strip().count("\n") == 0 and "--force" in again.output
    bad_quant = runner.invoke(trainer, ["export", str(adapter), "-o", str(tmp_path / "x.gguf"), "--format", "gguf",
                                        "--quant", "q3_k"])
    assert bad_quant.exit_code == 2 and "q4_0" in bad_quant.output
