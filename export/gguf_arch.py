"""GGUF architecture hyperparameters, tensor names and layouts, driven by the family table.

Which llama.cpp architecture a family maps to, and which of the converter's switches it needs, is
its entry in healer/families.py. Mirrors llama.cpp's convert_hf_to_gguf.py (conversion/llama.py,
qwen.py, gemma.py, phi.py);
tensor names come from gguf's own HF-name map (gguf.get_tensor_name_map), keys from the
GGUFWriter's add_* methods, so no key string is spelled here.
"""

from __future__ import annotations

import math
from typing import Any

import gguf
import numpy as np
import torch

from export.errors import UnsupportedError
from healer import families
from healer.families import Family

SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


def family_of(config: dict[str, Any]) -> Family:
    """The family entry for config.json's model_type, or an UnsupportedError naming the supported ones."""
    model_type = config.get("model_type")
    family = families.get(model_type)
    if family is None:
        raise UnsupportedError(f"GGUF export does not support architecture {model_type!r} "
                               f"(supported: {', '.join(families.FAMILIES)})")
    return family


def arch_of(family: Family) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture for the family (its entry names a gguf.MODEL_ARCH member)."""
    return gguf.MODEL_ARCH[family.gguf_arch]


def rope_parameters(config: dict[str, Any], family: Family) -> dict[str, Any]:
    """Rope settings (of the global layers) from transformers 5 (rope_parameters) or older (rope_theta +
    rope_scaling) configs."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params = dict(params.get("full_attention", params))
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_theta", config.get("rope_theta", family.rope_theta))
    return params


def _head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope_dims(config: dict[str, Any], params: dict[str, Any]) -> int:
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    return int(factor * _head_dim(config))


def write_hparams(w: gguf.GGUFWriter, config: dict[str, Any], family: Family) -> None:
    """Architecture metadata ({arch}.context_length, ...) as llama.cpp's converter writes it."""
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
    params = rope_parameters(config, family)
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
        if not family.gguf_longrope:
            raise UnsupportedError(f"rope type {rope_type!r} is not exported for {family.model_type}")
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        w.add_rope_scaling_attn_factors(_longrope_attn_factor(config, params))
    elif rope_type == "llama3":
        pass  # carried by the rope_freqs tensor (extra_tensors)
    elif rope_type != "default":
        raise UnsupportedError(f"rope type {rope_type!r} has no GGUF export here")
    if family.gguf_longrope:
        orig = params.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        w.add_rope_scaling_orig_ctx_len(orig or config["max_position_embeddings"])
    _write_sliding_windows(w, config, family)
    if family.query_pre_attn_scalar is not None:
        _check_attention_scale(config, family)
    if family.softcaps is not None:
        _write_softcaps(w, config, family)


def _write_sliding_windows(w: gguf.GGUFWriter, config: dict[str, Any], family: Family) -> None:
    if not family.gguf_sliding_window:
        return
    window = config.get("sliding_window", family.default_window)
    # 0 tells llama.cpp "no sliding window" (how Phi-4 is told apart from Phi-3)
    w.add_sliding_window(window or 0)
    if family.local_rope_theta is not None:
        # Gemma 3: which layers slide, per layer (llama.cpp reads the array before its default
        # pattern of 6), and the base of their RoPE
        pattern = config.get("sliding_window_pattern") or family.window_pattern
        types = config.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(config["num_hidden_layers"])]
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        w.add_rope_freq_base_swa(_local_rope_theta(config, family))


def _local_rope_theta(config: dict[str, Any], family: Family) -> float:
    nested = (config.get("rope_parameters") or {}).get("sliding_attention") or {}
    if nested.get("rope_type", "default") != "default":
        raise UnsupportedError("llama.cpp does not scale the RoPE of sliding-window layers; "
                               f"rope type {nested['rope_type']!r} there has no GGUF export")
    return nested.get("rope_theta", config.get("rope_local_base_freq", family.local_rope_theta))


def _write_softcaps(w: gguf.GGUFWriter, config: dict[str, Any], family: Family) -> None:
    attn = config.get("attn_logit_softcapping", family.softcaps[0])
    final = config.get("final_logit_softcapping", family.softcaps[1])
    if attn is not None:
        if not family.gguf_attn_softcap:
            raise UnsupportedError(f"llama.cpp's {family.gguf_arch.lower()} has no attention softcap; "
                                   f"attn_logit_softcapping={attn} has no GGUF export")
        w.add_attn_logit_softcapping(attn)
    if final is not None:
        w.add_final_logit_softcapping(final)


def _check_attention_scale(config: dict[str, Any], family: Family) -> None:
    # llama.cpp does not read query_pre_attn_scalar: it uses head_dim, or hidden/heads for the
    # 27B models (told apart by layer count); any other value would silently change every attention score
    scalar = config.get("query_pre_attn_scalar", family.query_pre_attn_scalar)
    used = (config["hidden_size"] // config["num_attention_heads"]
            if config["num_hidden_layers"] == family.gguf_hidden_scale_layers else _head_dim(config))
    if scalar != used:
        raise UnsupportedError(f"{family.model_type} query_pre_attn_scalar={scalar} but llama.cpp scales attention "
                               f"by 1/sqrt({used}) for this shape; the GGUF would compute different outputs")


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


def extra_tensors(config: dict[str, Any], family: Family) -> list[tuple[str, np.ndarray]]:
    """Tensors llama.cpp needs that HF computes on the fly: llama3 rope_freqs, phi3 long/short factors."""
    params = rope_parameters(config, family)
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
