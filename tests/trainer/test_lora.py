"""LoRA: PEFT's initialization, PEFT-format adapters that peft.PeftModel loads with equal logits, NF4 bases."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from builders import tiny_model
from torch import nn

from trainer.config import ConfigError
from trainer.lora import (
    LoRALinear,
    LoRASettings,
    apply_lora,
    load_adapter_weights,
    lora_modules,
    save_adapter,
    trainable_parameters,
)

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]


def hf_model(family: str, seed: int = 0):
    return tiny_model(family, 96, seed=seed, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.2)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)


def tokens(n: int = 2, t: int = 11, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(5))


def test_fresh_adapter_leaves_the_base_model_unchanged():
    base = hf_model("llama")
    ours = copy.deepcopy(base)
    apply_lora(ours, LoRASettings(r=4, alpha=8))
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, base(x).logits, rtol=0, atol=0)


def test_init_is_kaiming_uniform_a_sqrt5_for_A_and_zero_for_B():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 64), r=32, alpha=16)
    a = layer.lora_A.weight
    bound = 1 / math.sqrt(256)  # kaiming_uniform with a=sqrt(5): gain sqrt(1/3) * sqrt(3 / fan_in)
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.95 * bound
    # a uniform(-b, b) sample has variance b^2 / 3
    assert abs(a.var().item() - bound**2 / 3) < 0.1 * bound**2 / 3
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_only_lora_weights_are_trainable_and_receive_gradients():
    model = hf_model("llama")
    settings = apply_lora(model, LoRASettings(r=4, alpha=8))
    randomize_lora(model)
    model(tokens(), labels=tokens()).loss.backward()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 7 * 2  # A and B for seven linears in two layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable_parameters(model))
    assert all(p.grad is None for n, p in model.named_parameters() if n not in names)
    assert settings.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_our_adapter_with_equal_logits(family, tmp_path):
    from peft import PeftModel

    ours = hf_model(family)
    settings = apply_lora(ours, LoRASettings(r=4, alpha=8))
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter", settings, base_model="/abs/base")
    reference = PeftModel.from_pretrained(hf_model(family), tmp_path / "adapter").eval()
    x = tokens()
    with torch.no_grad():
        expected = reference(x).logits
        got = ours(x).logits
        plain = hf_model(family)(x).logits
    assert (expected - plain).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "/abs/base"
    if family == "phi3":
        assert sorted(cfg["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def test_rslora_and_modules_to_save_load_in_peft_with_equal_logits(tmp_path):
    from peft import PeftModel

    ours = hf_model("llama")
    settings = apply_lora(ours, LoRASettings(r=4, alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"],
                                             modules_to_save=["embed_tokens", "lm_head"]))
    randomize_lora(ours)
    with torch.no_grad():
        ours.model.embed_tokens.weight.add_(torch.randn_like(ours.model.embed_tokens.weight))
        ours.lm_head.weight.mul_(1.5)
    assert ours.model.embed_tokens.weight.requires_grad and ours.lm_head.weight.requires_grad
    save_adapter(ours, tmp_path / "adapter", settings)
    reference = PeftModel.from_pretrained(hf_model("llama"), tmp_path / "adapter").eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)
    assert reference.peft_config["default"].use_rslora


def test_saved_keys_carry_no_adapter_name(tmp_path):
    from safetensors import safe_open

    model = hf_model("qwen2")
    settings = apply_lora(model, LoRASettings(r=2, alpha=2, target_modules=["v_proj"]))
    save_adapter(model, tmp_path / "a", settings)
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert keys == [f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_{ab}.weight"
                    for i in range(2) for ab in "AB"]


def test_load_adapter_weights_restores_a_saved_adapter(tmp_path):
    from peft import PeftModel

    model = hf_model("gemma")
    settings = apply_lora(model, LoRASettings(r=4, alpha=4))
    randomize_lora(model, seed=3)
    save_adapter(model, tmp_path / "a", settings)
    fresh = hf_model("gemma")
    apply_lora(fresh, settings)
    load_adapter_weights(fresh, tmp_path / "a")
    reference = PeftModel.from_pretrained(hf_model("gemma"), tmp_path / "a").eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)


def test_saving_over_an_existing_adapter_replaces_it_whole(tmp_path):
    model = hf_model("llama")
    settings = apply_lora(model, LoRASettings(r=2, alpha=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a", settings)
    (tmp_path / "a" / "stale.txt").write_text("x")
    save_adapter(model, tmp_path / "a", settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_phi3_fused_projection_needs_all_of_its_parts():
    with pytest.raises(ConfigError, match="fuses q_proj, k_proj, v_proj into qkv_proj"):
        apply_lora(hf_model("phi3"), LoRASettings(target_modules=["q_proj", "o_proj"]))


def test_unknown_target_module_names_the_linear_layers():
    with pytest.raises(ConfigError, match="'qkv' is not a linear layer.*q_proj"):
        apply_lora(hf_model("llama"), LoRASettings(target_modules=["qkv"]))


def nf4_linear(linear: nn.Linear):
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def test_lora_over_nf4_base_matches_peft_lora_over_the_same_nf4_base():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 48))
    quantized = nn.Sequential(nf4_linear(net[0]), nn.GELU(), nf4_linear(net[2]))
    assert quantized[0].weight.dtype == torch.uint8
    ours = copy.deepcopy(quantized)
    settings = apply_lora(ours, LoRASettings(r=8, alpha=16, target_modules=["0", "2"]))
    randomize_lora(ours)
    reference = get_peft_model(copy.deepcopy(quantized), LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            ref = reference.base_model.model.get_submodule(name)
            ref.lora_A["default"].weight.copy_(m.lora_A.weight)
            ref.lora_B["default"].weight.copy_(m.lora_B.weight)
    x = torch.randn(5, 64)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
    ours(x).square().sum().backward()
    assert settings.target_modules == ["0", "2"]
    assert all(p.grad is not None for p in trainable_parameters(ours))
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        f"{i}.lora_{ab}.weight" for i in (0, 2) for ab in "AB"}


@pytest.mark.parametrize("family", FAMILIES)
def test_our_decoder_with_our_lora_matches_transformers_with_peft(family, tmp_path):
    """The same adapter on the same base: our decoder + LoRALinear vs transformers + peft.PeftModel."""
    import builders
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.models import load_model

    base = tmp_path / "base"
    builders.save_tiny_model(base, family, 96, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    ours = load_model(base, dtype=torch.float32, device="cpu", load_in_4bit=False).eval()
    settings = apply_lora(ours, LoRASettings(r=4, alpha=8, use_rslora=family == "gemma2"))
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter", settings, base_model=str(base))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                          tmp_path / "adapter").eval()
    x = tokens()
    with torch.no_grad():
        expected = reference(x).logits
        got = ours(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
