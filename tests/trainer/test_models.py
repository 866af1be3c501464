"""The decoder against transformers' own implementation (and float64 math), family by family."""

from __future__ import annotations

import json
import math

import pytest
import torch
from model_fixtures import VOCAB, hf_checkpoint

from healer.errors import CheckpointError, HealerError
from trainer.models import CausalLM, ModelSpec, RopeSpec, UnsupportedModelError, load_model
from trainer.models.ops import rope_tables
from trainer.options import ModelOptions

SEQ = 24  # longer than the sliding windows below (8), so windowed and full layers differ

LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.2, 1.5, 2.0],
                long_factor=[1.0, 2.0, 4.0, 8.0], partial_rotary_factor=0.5)
PARITY_CASES = {
    "llama": ("llama", {}),
    "llama3_rope_scaling": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=1024))),
    "llama_biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "mistral_sliding_window": ("mistral", dict(sliding_window=8)),
    "mistral_no_window": ("mistral", dict(sliding_window=None)),
    "qwen2": ("qwen2", {}),
    "qwen2_sliding_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", dict(sliding_window=8)),
    "gemma2_tight_softcaps": ("gemma2", dict(sliding_window=8, attn_logit_softcapping=1.0,
                                             final_logit_softcapping=2.0)),
    "phi3": ("phi3", dict(pad_token_id=None)),
    # seq 24 > original 16: the long factors are in use; half of each head is rotated
    "phi3_longrope_partial_window": ("phi3", dict(pad_token_id=None, rope_parameters=LONGROPE,
                                                  original_max_position_embeddings=16, max_position_embeddings=64,
                                                  sliding_window=8)),
    # Current releases' shapes: Llama 3.2 (tied head, llama3 scaling with factor 32), Mistral Small 3
    # (head_dim 128 with hidden 5120 / 32 heads: here 32 != 64 / 4), Phi-4-mini (3/4 of each head rotated,
    # LongRoPE, tied head).
    "llama3_2_tied_rope_scaling": ("llama", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "mistral_small_3_head_dim": ("mistral", dict(head_dim=32, sliding_window=None)),
    "phi4_mini_partial_rotary": ("phi3", dict(pad_token_id=None, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75, short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
        long_factor=[1.0, 2.0, 3.0, 5.0, 8.0, 13.0]), original_max_position_embeddings=16, max_position_embeddings=64)),
    # Qwen3: per-head q/k norm, head_dim 32 (hidden / heads is 16), tied head (FAMILY_CONFIGS)
    "qwen3": ("qwen3", {}),
    "qwen3_untied_sliding_layers": ("qwen3", dict(tie_word_embeddings=False, use_sliding_window=True, sliding_window=8,
                                                  max_window_layers=1)),
    # Gemma 3: six layers, so five slide (RoPE base 10,000) and the sixth is global (base 1,000,000)
    "gemma3_text": ("gemma3_text", dict(num_hidden_layers=6)),
    # the 4B+ configs: linear scaling on the global layers only; layer_types read as given
    "gemma3_text_linear_scaling_layer_types": ("gemma3_text", dict(
        num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_scaling=dict(rope_type="linear", factor=8.0), rope_theta=100000.0, rope_local_base_freq=100.0)),
    "gemma3_text_final_softcap": ("gemma3_text", dict(final_logit_softcapping=2.0, query_pre_attn_scalar=24)),
}


def _inputs(seed: int = 1, batch: int = 2, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a masked prompt
    return ids, labels


@pytest.mark.parametrize("case", PARITY_CASES)
def test_logits_and_loss_equal_transformers(tmp_path, case):
    family, overrides = PARITY_CASES[case]
    hf = hf_checkpoint(tmp_path, family, **overrides)
    ours = load_model(tmp_path, dtype=torch.float32)
    ids, labels = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=labels)
        out = ours(ids, labels=labels)
    assert out.logits.shape == ref.logits.shape
    assert (out.logits - ref.logits).abs().max().item() <= 1e-4
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5
    assert out.loss.dtype == torch.float32


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"])
def test_parameter_names_equal_transformers_state_dict(tmp_path, family):
    hf = hf_checkpoint(tmp_path, family, pad_token_id=None)
    ours = load_model(tmp_path, dtype=torch.float32)
    assert set(ours.state_dict()) == set(hf.state_dict())
    for layer in ours.model.layers:
        for path in ours.spec.linear_names:
            assert type(layer.get_submodule(path)) is torch.nn.Linear


def test_phi3_keeps_fused_projections_as_peft_names_them(tmp_path):
    from peft import LoraConfig, get_peft_model

    hf = hf_checkpoint(tmp_path, "phi3", pad_token_id=None)
    ours = load_model(tmp_path, dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=2, target_modules=["qkv_proj", "o_proj", "gate_up_proj",
                                                                     "down_proj"]))
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    ours_targets = {f"model.layers.{i}.{p}" for i in range(ours.spec.num_layers) for p in ours.spec.linear_names}
    assert wrapped == ours_targets


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("gemma2", dict(sliding_window=8)),
                                              ("gemma3_text", dict(num_hidden_layers=6))])
def test_packed_batch_gives_the_per_example_losses_of_examples_run_one_by_one(tmp_path, family, overrides):
    hf = hf_checkpoint(tmp_path, family, **overrides)
    ours = load_model(tmp_path, dtype=torch.float32)
    rows = [[5, 9, 10], [12, 12]]
    g = torch.Generator().manual_seed(3)
    examples = [[torch.randint(0, VOCAB, (n,), generator=g) for n in row] for row in rows]
    ids = torch.stack([torch.cat(row) for row in examples])
    positions = torch.stack([torch.cat([torch.arange(len(e)) for e in row]) for row in examples])
    with torch.no_grad():
        packed = ours(ids, position_ids=positions)
        for r, row in enumerate(examples):
            start = 0
            for example in row:
                end = start + len(example)
                alone = hf(input_ids=example[None], labels=example[None])
                assert (packed.logits[r, start:end] - alone.logits[0]).abs().max().item() <= 1e-4
                labels = torch.full_like(ids, -100)
                labels[r, start:end] = example  # only this example counts
                loss = ours(ids, labels=labels, position_ids=positions).loss
                assert abs(loss.item() - alone.loss.item()) <= 1e-5
                start = end


def test_rope_tables_from_float32_positions_distinguish_8189_to_8191():
    rope = RopeSpec(theta=500000.0, dim=128)
    positions = torch.tensor([[8189, 8190, 8191]])
    cos, sin = rope_tables(positions, rope.inv_freq())
    exponent = torch.arange(0, 128, 2, dtype=torch.float64) / 128
    angles = positions[0, :, None].double() * (1.0 / 500000.0**exponent)
    angles = torch.cat((angles, angles), dim=-1)
    # float32 rounds an angle of at most 8191 rad with relative error 2**-24 twice (the frequency and the
    # product): |error| <= 2 * 8191 * 2**-24 = 9.8e-4; cos/sin are 1-Lipschitz.
    tolerance = 2 * 8191 * 2**-24
    assert (cos[0].double() - angles.cos()).abs().max().item() <= tolerance
    assert (sin[0].double() - angles.sin()).abs().max().item() <= tolerance
    for a, b in [(0, 1), (1, 2), (0, 2)]:
        assert not torch.equal(cos[0, a], cos[0, b]) and not torch.equal(sin[0, a], sin[0, b])
        # the step between neighbouring positions is right too, not just distinct
        step = cos[0, b].double() - cos[0, a].double()
        assert (step - (angles[b].cos() - angles[a].cos())).abs().max().item() <= 2 * tolerance


def test_rope_tables_refuse_floating_point_positions():
    with pytest.raises(AssertionError):
        rope_tables(torch.tensor([[8189.0]], dtype=torch.bfloat16), RopeSpec(theta=10000.0, dim=8).inv_freq())


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1 and Llama 3.2
def test_llama3_rope_scaling_inv_freq_equals_transformers(factor):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # The shape of Meta's config.json (pre-transformers-5 layout: rope_theta + rope_scaling).
    config = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  max_position_embeddings=131072, rope_theta=500000.0,
                  rope_scaling=dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192))
    spec = ModelSpec.from_config(config)
    ref, scaling = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**config), "cpu")
    assert spec.rope.kind == "llama3" and spec.rope.attention_factor == scaling
    torch.testing.assert_close(spec.rope.inv_freq(), ref, rtol=1e-6, atol=0)


def test_longrope_inv_freq_and_attention_factor_equal_transformers():
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    short = [1.0 + i / 100 for i in range(48)]
    long = [1.0 + i for i in range(48)]
    config = dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                  num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=131072,
                  original_max_position_embeddings=4096, rope_theta=10000.0,
                  rope_scaling=dict(type="longrope", short_factor=short, long_factor=long))
    spec = ModelSpec.from_config(config)
    hf_config = Phi3Config(**config)
    for long_, seq_len in [(False, None), (True, 4097)]:
        ref, scaling = ROPE_INIT_FUNCTIONS["longrope"](hf_config, "cpu", seq_len=seq_len)
        torch.testing.assert_close(spec.rope.inv_freq(long=long_), ref, rtol=1e-6, atol=0)
        assert math.isclose(spec.rope.attention_factor, scaling, rel_tol=1e-12)


def test_gemma_scales_embeddings_by_sqrt_hidden_rounded_to_bfloat16(tmp_path):
    # hidden 48: sqrt(48) = 6.928 becomes 6.9375 in bfloat16; Gemma's weights expect the rounded value
    hf = hf_checkpoint(tmp_path, "gemma", hidden_size=48).to(torch.bfloat16)
    ours = load_model(tmp_path, dtype=torch.bfloat16)
    ids, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(ours.model.embed(ids), hf.model.embed_tokens(ids))


def test_4bit_load_quantizes_every_targetable_linear_to_nf4_with_double_quantization(tmp_path):
    import bitsandbytes as bnb

    hf_checkpoint(tmp_path, "qwen2")
    model = load_model(tmp_path, dtype=torch.float32, load_in_4bit=True)
    for layer in model.model.layers:
        for path in model.spec.linear_names:
            linear = layer.get_submodule(path)
            assert isinstance(linear, bnb.nn.Linear4bit)
            state = linear.weight.quant_state
            assert state.quant_type == "nf4" and state.nested  # nested = double-quantized absmax
            assert linear.weight.dtype == torch.uint8 and not linear.weight.requires_grad
        assert layer.self_attn.q_proj.bias.dtype == torch.float32  # qwen2's biases stay 16/32-bit
    assert type(model.lm_head) is torch.nn.Linear and model.model.embed_tokens.weight.dtype == torch.float32


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_4bit_logits_equal_transformers_qlora_model_and_stay_near_16bit(tmp_path, family):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    hf_checkpoint(tmp_path, family)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    hf4 = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu",
                                               dtype=torch.float32)
    # Training mode (no dropout in this config): in eval mode on a CPU with AVX512-BF16, bitsandbytes
    # repacks each Linear4bit weight for its own CPU kernel, which multiplies in bfloat16 whatever the
    # compute dtype (logits 2.6e-2 off); in training mode it dequantizes and multiplies in float32.
    hf4.train()
    ours4 = load_model(tmp_path, dtype=torch.float32, load_in_4bit=True)
    ours16 = load_model(tmp_path, dtype=torch.float32)
    ids, labels = _inputs()
    with torch.no_grad():
        ref = hf4(input_ids=ids, labels=labels)
        out4, out16 = ours4(ids, labels=labels), ours16(ids, labels=labels)
    # Same NF4 codes and scales as transformers' own QLoRA loading: equal up to float32 rounding.
    assert (out4.logits - ref.logits).abs().max().item() <= 1e-4
    # Against 16-bit: NF4 has 16 levels per 64-weight block, a relative RMS error of about 10% per
    # matrix; through 2 layers the logits move by a similar fraction of their spread, well under 50%.
    rel = (out4.logits - out16.logits).norm() / out16.logits.norm()
    assert 0 < rel.item() < 0.5
    assert abs(out4.loss.item() - out16.loss.item()) < 0.5 * out16.loss.item()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_bfloat16_load_is_as_close_to_float32_as_transformers_own_bfloat16(tmp_path, family):
    hf = hf_checkpoint(tmp_path, family)
    ids, _ = _inputs()
    with torch.no_grad():
        exact = hf(input_ids=ids).logits
        theirs = hf.to(torch.bfloat16)(input_ids=ids).logits.float()
        ours = load_model(tmp_path, dtype=torch.bfloat16)(ids).logits.float()
    assert load_model(tmp_path, dtype=torch.bfloat16).model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    # Both round every matmul and norm to bfloat16 (8 bits of mantissa); ours keeps the norms' weight
    # multiply in float32, so it may be a little closer, never much further.
    their_error = (theirs - exact).abs().max().item()
    assert 0 < (ours - exact).abs().max().item() <= 2 * their_error


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(UnsupportedModelError) as e:
        load_model(tmp_path)
    assert isinstance(e.value, HealerError)
    message = str(e.value)
    assert "gpt2" in message and str(tmp_path) in message
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"):
        assert family in message


def test_unsupported_rope_type_is_a_typed_error():
    config = dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                  num_attention_heads=1, rope_scaling=dict(type="dynamic", factor=2.0))
    with pytest.raises(UnsupportedModelError, match="'dynamic'.*llama3"):
        ModelSpec.from_config(config)


def test_tensor_shape_disagreeing_with_config_is_a_checkpoint_error(tmp_path):
    hf_checkpoint(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mlp.gate_proj.weight"):
        load_model(tmp_path, dtype=torch.float32)


@pytest.mark.parametrize("family,overrides", [("mistral", dict(sliding_window=8)),
                                              ("gemma3_text", dict(num_hidden_layers=3, layer_types=[
                                                  "sliding_attention", "full_attention", "sliding_attention"]))])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, family, overrides):
    hf_checkpoint(tmp_path, family, **overrides)
    ids, labels = _inputs()
    results = []
    for recompute in ("off", "on"):
        model: CausalLM = load_model(tmp_path, dtype=torch.float32, options=ModelOptions(recompute=recompute))
        model.model.embed_tokens.weight.requires_grad_(True)
        loss = model(ids, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), model.model.embed_tokens.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scaling", [None, {"factor": 8.0, "rope_type": "linear"}])  # Gemma 3 1B; 4B and up
def test_gemma3_hub_config_rope_and_windows_equal_transformers(scaling):
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    # The shape of google/gemma-3-*-it's config.json (pre-transformers-5 layout: rope_theta, rope_scaling,
    # rope_local_base_freq, sliding_window_pattern instead of rope_parameters and layer_types).
    config = dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                  num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                  max_position_embeddings=32768, query_pre_attn_scalar=256, rope_theta=1000000.0,
                  rope_local_base_freq=10000.0, rope_scaling=scaling, sliding_window=512, sliding_window_pattern=6,
                  final_logit_softcapping=None, attn_logit_softcapping=None, rms_norm_eps=1e-6)
    spec = ModelSpec.from_config(config)
    hf_config = Gemma3TextConfig(**config)
    ref = Gemma3RotaryEmbedding(hf_config)
    torch.testing.assert_close(spec.rope.inv_freq(), ref.full_attention_inv_freq, rtol=1e-6, atol=0)
    torch.testing.assert_close(spec.local_rope.inv_freq(), ref.sliding_attention_inv_freq, rtol=1e-6, atol=0)
    assert spec.sliding_windows == tuple(512 if t == "sliding_attention" else None for t in hf_config.layer_types)
    assert spec.sliding_windows.count(None) == 4  # layers 5, 11, 17, 23 are global
    assert spec.attn_scale == 256**-0.5 and spec.attn_softcap is None and spec.final_softcap is None
    assert spec.tie_word_embeddings and spec.embed_scale == 1152**0.5 and spec.activation == "gelu_tanh"
