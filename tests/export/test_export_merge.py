"""export.merge: merged checkpoints reproduce PEFT's base+adapter outputs and load in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import builders
import pytest
import testdata
import torch
from export_helpers import (
    hf_model,
    logits,
    make_adapter,
    peft_merged_state,
    peft_model,
    run_dir_with_adapter_subdir,
)
from safetensors import safe_open

import export

VOCAB = 96
IDS = torch.tensor([[1, 5, 17, 42, 3, 88, 60, 9, 31, 2]])
FAMILY_OVERRIDES = {"phi3": {"pad_token_id": 0}, "gemma2": {"query_pre_attn_scalar": 16}}


def tiny_base(path: Path, family: str, **overrides) -> Path:
    builders.save_tiny_model(path, family, VOCAB, seed=0, **{**FAMILY_OVERRIDES.get(family, {}), **overrides})
    return path


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"])
def test_merged_model_logits_equal_peft_base_plus_adapter(tmp_path, family):
    base = tiny_base(tmp_path / "base", family)
    adapter = make_adapter(base, tmp_path / "adapter")
    out = export.merge(adapter, tmp_path / "merged", dtype="float32")
    want = logits(peft_model(base, adapter), IDS)
    got = logits(hf_model(out), IDS)
    assert (want - logits(hf_model(base), IDS)).abs().max() > 1e-2  # the adapter really changes the outputs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rslora_and_alpha_rank_patterns_scale_like_peft(tmp_path):
    base = tiny_base(tmp_path / "base", "llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, alpha=8, use_rslora=True,
                           rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.o_proj": 32})
    out = export.merge(adapter, tmp_path / "merged", dtype="float32")
    torch.testing.assert_close(logits(hf_model(out), IDS), logits(peft_model(base, adapter), IDS),
                               rtol=1e-5, atol=1e-5)


def test_embedding_lora_and_modules_to_save_are_merged(tmp_path):
    base = tiny_base(tmp_path / "base", "llama")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "embed_tokens"],
                           modules_to_save=["lm_head"])
    with torch.no_grad():  # a trained lm_head differs from the base: make the saved copy differ too
        model = peft_model(base, adapter)
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(-1.5)
        model.save_pretrained(str(tmp_path / "adapter2"))
    out = export.merge(tmp_path / "adapter2", tmp_path / "merged", dtype="float32")
    torch.testing.assert_close(logits(hf_model(out), IDS), logits(peft_model(base, tmp_path / "adapter2"), IDS),
                               rtol=1e-5, atol=1e-5)


def test_bf16_output_is_the_float32_merge_rounded_once(tmp_path):
    base = tiny_base(tmp_path / "base", "llama", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter")
    out = export.merge(adapter, tmp_path / "merged")  # auto: the base's bfloat16
    want = peft_merged_state(base, adapter)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(want)
        for name in f.keys():
            got = f.get_tensor(name)
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want[name].to(torch.bfloat16).float(), rtol=2**-8, atol=0)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_output_has_index_within_the_limit_and_loads(tmp_path):
    base = tiny_base(tmp_path / "base", "llama")
    adapter = make_adapter(base, tmp_path / "adapter")
    limit = 60_000
    out = export.merge(adapter, tmp_path / "merged", dtype="float32", max_shard_size=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
        assert sum(sizes) <= limit or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    torch.testing.assert_close(logits(hf_model(out), IDS), logits(peft_model(base, adapter), IDS),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["run_dir/adapter", "run_dir"])
def test_run_dir_with_adapter_in_subdir_or_top_level_merges(tmp_path, layout):
    base = tiny_base(tmp_path / "base", "qwen2")
    adapter = make_adapter(base, tmp_path / "adapter")
    source = run_dir_with_adapter_subdir(adapter, tmp_path / "run") if layout == "run_dir/adapter" else adapter
    out = export.merge(source, tmp_path / "merged", dtype="float32")
    torch.testing.assert_close(logits(hf_model(out), IDS), logits(peft_model(base, adapter), IDS),
                               rtol=1e-5, atol=1e-5)


def test_base_override_replaces_the_recorded_base_path(tmp_path):
    base = tiny_base(tmp_path / "base", "llama")
    adapter = make_adapter(base, tmp_path / "adapter")
    moved = base.rename(tmp_path / "moved-base")
    out = export.merge(adapter, tmp_path / "merged", base=moved, dtype="float32")
    torch.testing.assert_close(logits(hf_model(out), IDS), logits(peft_model(moved, adapter), IDS),
                               rtol=1e-5, atol=1e-5)


def test_config_generation_config_and_tokenizer_files_travel_with_the_merge(tmp_path):
    sp = testdata.sentencepiece_model("llama-spm")
    base = builders.sentencepiece_checkpoint(tmp_path / "base", sp, chat_template="{{ messages[0]['content'] }}")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    out = export.merge(adapter, tmp_path / "merged")
    for name in ("generation_config.json", "tokenizer.model", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    config, base_config = (json.loads((d / "config.json").read_text()) for d in (out, base))
    assert {k: v for k, v in config.items() if k != "dtype"} == {k: v for k, v in base_config.items() if k != "dtype"}
    from transformers import AutoTokenizer

    text = "Hello world, merged."
    assert (AutoTokenizer.from_pretrained(str(out))(text).input_ids
            == AutoTokenizer.from_pretrained(str(base))(text).input_ids)


def test_plain_model_dir_round_trips_unchanged(tmp_path):
    base = tiny_base(tmp_path / "base", "gemma")
    out = export.merge(base, tmp_path / "copy", dtype="float32")
    with safe_open(str(base / "model.safetensors"), framework="pt") as a, \
            safe_open(str(out / "model.safetensors"), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
