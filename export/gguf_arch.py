"""Per-family GGUF facts: architecture hyperparameters, tensor names and layouts.

Mirrors llama.cpp's convert_hf_to_gguf.py (conversion/llama.py, qwen.py, gemma.py, phi.py);
tensor names come from gguf's own HF-name map (gguf.get_tensor_name_map), keys from the
GGUFWriter's add_* methods, so no key string is spelled here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch

from export.errors import UnsupportedError


@dataclass(frozen=True)
class Family:
    """How one HF model family maps onto a llama.cpp architecture."""

    arch: gguf.MODEL_ARCH
    # HF stores q/k rows as two rotary halves per head; llama.cpp's llama arch rotates adjacent pairs
    permute_qk: bool = False
    # Gemma's RMSNorm scales by (1 + w), llama.cpp's by w: the converter stores w + 1
    norm_plus_one: bool = False
    # Gemma always ties the output to token_embd; llama.cpp has no output tensor for it
    drop_lm_head: bool = False


FAMILIES = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2),
    "gemma": Family(gguf.MODEL_ARCH.GEMMA, norm_plus_one=True, drop_lm_head=True),
    "gemma2": Family(gguf.MODEL_ARCH.GEMMA2, norm_plus_one=True, drop_lm_head=True),
    "phi3": Family(gguf.MODEL_ARCH.PHI3),
}
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


def family_of(config: dict[str, Any]) -> Family:
    """The Family for config.json's model_type, or an UnsupportedError naming the supported ones."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedError(f"GGUF export does not support architecture {model_type!r} "
                               f"(supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """Rope settings from either transformers 5 (rope_parameters) or older (rope_theta + rope_scaling) configs."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params = dict(params.get("full_attention", params))
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return params


def _head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope_dims(config: dict[str, Any], params: dict[str, Any]) -> int:
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    return int(factor * _head_dim(config))


def write_hparams(w: gguf.GGUFWriter, config: dict[str, Any], family: Family) -> None:
    """Architecture metadata ({arch}.context_length, ...) as llama.cpp's converter writes it."""
    model_type = config["model_type"]
    n_head = config["num_attention_heads"]
    w.add_vocab_size(config["vocab_size"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_key_length(_head_dim(config))
    w.add_value_length(_head_dim(config))
    params = rope_parameters(config)
    w.add_rope_freq_base(params["rope_theta"])
    w.add_rope_dimension_count(_rope_dims(config, params))
    rope_type = params.get("rope_type") or "default"
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(params["factor"])
    elif rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(params["factor"])
        w.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
    elif rope_type in ("longrope", "su"):
        if model_type != "phi3":
            raise UnsupportedError(f"rope type {rope_type!r} is only exported for phi3")
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        w.add_rope_scaling_attn_factors(_longrope_attn_factor(config, params))
    elif rope_type == "llama3":
        pass  # carried by the rope_freqs tensor (extra_tensors)
    elif rope_type != "default":
        raise UnsupportedError(f"rope type {rope_type!r} has no GGUF export here")
    if model_type == "phi3":
        orig = params.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        w.add_rope_scaling_orig_ctx_len(orig or config["max_position_embeddings"])
        # 0 tells llama.cpp "no sliding window" (how Phi-4 is told apart from Phi-3)
        w.add_sliding_window(config.get("sliding_window") or 0)
    if model_type == "gemma2":
        _check_gemma2_attention_scale(config)
        w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
        w.add_sliding_window(config["sliding_window"])


def _check_gemma2_attention_scale(config: dict[str, Any]) -> None:
    # llama.cpp does not read query_pre_attn_scalar: it uses head_dim, or hidden/heads for the
    # 46-layer 27B model; any other value would silently change every attention score
    scalar = config.get("query_pre_attn_scalar", _head_dim(config))
    used = (config["hidden_size"] // config["num_attention_heads"] if config["num_hidden_layers"] == 46
            else _head_dim(config))
    if scalar != used:
        raise UnsupportedError(f"gemma2 query_pre_attn_scalar={scalar} but llama.cpp scales attention by "
                               f"1/sqrt({used}) for this shape; the GGUF would compute different outputs")


def _longrope_attn_factor(config: dict[str, Any], params: dict[str, Any]) -> float:
    orig = params.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    scale = config["max_position_embeddings"] / orig
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0


def tensor_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    """llama.cpp's name of an HF tensor, or an UnsupportedError."""
    new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise UnsupportedError(f"no llama.cpp tensor for {hf_name}; this checkpoint has layers GGUF export "
                               "does not know")
    return new


def extra_tensors(config: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """Tensors llama.cpp needs that HF computes on the fly: llama3 rope_freqs, phi3 long/short factors."""
    params = rope_parameters(config)
    rope_type = params.get("rope_type")
    names = gguf.TENSOR_NAMES
    if rope_type == "llama3":
        base, dim = params["rope_theta"], _head_dim(config)
        freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factor = params.get("factor", 8.0)
        low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
        old_ctx = params.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        factors = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                factors.append(1.0)
            elif wavelen > low_wavelen:
                factors.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        return [(names[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", np.array(factors, dtype=np.float32))]
    if rope_type in ("longrope", "su"):
        return [(names[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.array(params["long_factor"], np.float32)),
                (names[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.array(params["short_factor"], np.float32))]
    return []


def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's rows from HF's [first half | second half] to llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_llama_cpp_layout(hf_name: str, w: torch.Tensor, config: dict[str, Any], family: Family) -> torch.Tensor:
    """The float32 tensor as llama.cpp's converter would store it (q/k permutation, Gemma's norm + 1)."""
    if family.permute_qk:
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            w = permute_rope_rows(w, config["num_attention_heads"])
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            w = permute_rope_rows(w, config.get("num_key_value_heads") or config["num_attention_heads"])
    if family.norm_plus_one and hf_name.endswith("norm.weight"):
        w = w + 1
    return w
