"""ModelSpec: the handful of switches that separate the decoder families, read from config.json.

Which switches a family turns on is its entry in healer/families.py; this module reads config.json
through that entry, and the decoder reads only the spec. Both config.json layouts
are read: transformers 5 (`rope_parameters`) and older files (`rope_theta` + `rope_scaling`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from healer import families
from healer.errors import CheckpointError

SUPPORTED_FAMILIES = tuple(families.FAMILIES)
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu": "gelu"}


class UnsupportedModelError(CheckpointError):
    """config.json describes an architecture (or RoPE variant) the trainer's decoder does not implement."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters; `inv_freq` turns them into per-pair frequencies."""

    theta: float
    dim: int  # rotated dims per head: head_dim * partial_rotary_factor (Phi-4-mini rotates 3/4)
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float = 1.0  # multiplies cos and sin (LongRoPE's magnitude correction)

    def inv_freq(self, long: bool = False) -> torch.Tensor:
        """Inverse frequencies [dim/2] in float32, computed in float64 on CPU (init time only)."""
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float64, device="cpu") / self.dim
        base = self.theta ** exponent
        if self.kind == "longrope":
            assert self.short_factor is not None and self.long_factor is not None
            ext = torch.tensor(self.long_factor if long else self.short_factor, dtype=torch.float64, device="cpu")
            return (1.0 / (ext * base)).float()
        inv = 1.0 / base
        if self.kind == "linear":
            inv = inv / self.factor
        elif self.kind == "llama3":
            inv = _llama3_scaled(inv, self.factor, self.low_freq_factor, self.high_freq_factor,
                                 self.original_max_position_embeddings)
        return inv.float()


def _llama3_scaled(inv: torch.Tensor, factor: float, low: float, high: float, old_len: int) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old_len / low, old_len / high
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


@dataclass(frozen=True)
class ModelSpec:
    """Sizes and family switches of one decoder; `from_config` reads them from config.json."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeSpec
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k before RoPE
    activation: str = "silu"  # silu | gelu_tanh | gelu
    embed_scale: float | None = None  # Gemma multiplies embeddings by sqrt(hidden), rounded to the model dtype
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    fused_qkv: bool = False  # Phi-3: one qkv_proj
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj
    attn_scale: float | None = None  # None: head_dim**-0.5; Gemma 2: query_pre_attn_scalar**-0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_windows: tuple[int | None, ...] = ()  # per layer, None = full causal; () = None everywhere
    local_rope: RopeSpec | None = None  # Gemma 3: RoPE of the sliding-window layers; None: `rope` everywhere
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and around the MLP too
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.attn_scale is None:
            object.__setattr__(self, "attn_scale", self.head_dim**-0.5)
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        assert len(self.sliding_windows) == self.num_layers, "one sliding window entry per layer"
        assert self.num_heads % self.num_kv_heads == 0, "query heads must be a multiple of kv heads"

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Paths, relative to a decoder layer, of the linears LoRA may target (and 4-bit quantizes)."""
        attn = ("qkv_proj",) if self.fused_qkv else ("q_proj", "k_proj", "v_proj")
        mlp = ("gate_up_proj",) if self.fused_gate_up else ("gate_proj", "up_proj")
        return (*(f"self_attn.{n}" for n in (*attn, "o_proj")), *(f"mlp.{n}" for n in (*mlp, "down_proj")))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelSpec:
        """Read a config.json dict; raises UnsupportedModelError for other architectures or RoPE types."""
        model_type = config.get("model_type")
        family = families.get(model_type)
        if config.get("vision_config") is not None:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is a multimodal checkpoint (it has a vision tower); only text models "
                f"are supported (supported: {', '.join(SUPPORTED_FAMILIES)})")
        if family is None:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported by the trainer (supported: {', '.join(SUPPORTED_FAMILIES)})")
        if config.get("use_bidirectional_attention"):
            raise UnsupportedModelError("use_bidirectional_attention (an embedding model) is not supported: "
                                        "the trainer trains causal language models")
        hidden, heads = _need(config, "hidden_size"), _need(config, "num_attention_heads")
        layers = _need(config, "num_hidden_layers")
        head_dim = config.get("head_dim") or hidden // heads
        kv_heads = config.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise CheckpointError(f"config.json: {heads} attention heads are not a multiple of {kv_heads} kv heads")
        attention_bias = bool(config.get("attention_bias", False))
        pad = config.get("pad_token_id")
        vocab = _need(config, "vocab_size")
        scalar = config.get("query_pre_attn_scalar", family.query_pre_attn_scalar)
        attn_softcap = final_softcap = None
        if family.softcaps is not None:  # Gemma 2 caps by default; Gemma 3 only where config.json says
            attn_softcap = config.get("attn_logit_softcapping", family.softcaps[0])
            final_softcap = config.get("final_logit_softcapping", family.softcaps[1])
        windows = _sliding_windows(config, family, layers)
        return cls(
            family=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_need(config, "intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope=_rope(config, head_dim, family),
            max_position_embeddings=config.get("max_position_embeddings") or 0,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            norm_offset=family.norm_offset,
            qk_norm=family.qk_norm,
            activation=_activation(config, family),
            embed_scale=hidden**0.5 if family.embed_scale else None,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", family.tied_head)),
            qkv_bias=attention_bias if family.qkv_bias is None else family.qkv_bias,
            o_bias=attention_bias if family.o_bias is None else family.o_bias,
            mlp_bias=family.mlp_bias and bool(config.get("mlp_bias", False)),
            fused_qkv=family.fused_qkv,
            fused_gate_up=family.fused_gate_up,
            attn_scale=scalar**-0.5 if family.query_pre_attn_scalar is not None else None,
            attn_softcap=attn_softcap,
            final_softcap=final_softcap,
            sliding_windows=windows,
            local_rope=(_rope(config, head_dim, family, local=True)
                        if family.local_rope_theta is not None and any(w is not None for w in windows) else None),
            sandwich_norms=family.sandwich_norms,
            pad_token_id=pad if isinstance(pad, int) and 0 <= pad < vocab else None,
        )


def _need(config: dict[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise CheckpointError(f"config.json has no {key!r}")
    return config[key]


def _activation(config: dict[str, Any], family: families.Family) -> str:
    name = next((config[k] for k in family.activation_keys if config.get(k)), family.activation)
    if family.gelu_is_tanh and name == "gelu":  # as transformers maps Gemma's "gelu"
        name = "gelu_pytorch_tanh"
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def _sliding_windows(config: dict[str, Any], family: families.Family, layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window", family.default_window)
    if family.sliding == "all":  # one window (or none: Mistral v0.2+ sets null) on every layer
        return (window,) * layers
    if family.sliding == "qwen":
        window = window if config.get("use_sliding_window") else None
        first = config.get("max_window_layers", layers)
        types = config.get("layer_types") or [
            "sliding_attention" if window is not None and i >= first else "full_attention" for i in range(layers)]
    elif family.sliding == "pattern":  # every pattern-th layer (1-based) is global, as transformers places them
        pattern = config.get("sliding_window_pattern") or family.window_pattern
        types = config.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    else:
        assert family.sliding == "none", family.sliding
        return (None,) * layers
    if len(types) != layers:
        raise CheckpointError(f"config.json: layer_types lists {len(types)} layers, num_hidden_layers is {layers}")
    return tuple(window if t == "sliding_attention" else None for t in types)


def _rope(config: dict[str, Any], head_dim: int, family: families.Family, local: bool = False) -> RopeSpec:
    """The RoPE of the global layers, or with `local` of the sliding-window layers (Gemma 3's own base)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = config.get("rope_theta", family.rope_theta)
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5: one dict per layer type
        params = dict(params.get("sliding_attention" if local else "full_attention") or {})
    elif local:  # older files: rope_scaling is the global layers'; local ones rotate unscaled at their own base
        params = {}
    if local:
        theta = config.get("rope_local_base_freq", family.local_rope_theta)
    kind = params.get("rope_type", params.get("type", "default"))
    kind = {"su": "longrope"}.get(kind, kind)  # Phi-3's first releases called LongRoPE "su"
    if kind not in ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    theta = params.get("rope_theta", theta)
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    max_pos = config.get("max_position_embeddings") or 0
    # As in transformers: a top-level original_max_position_embeddings (Phi-3) wins over the rope dict's.
    original = config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos
    rope = RopeSpec(theta=float(theta), dim=int(head_dim * partial), kind=kind, original_max_position_embeddings=original)
    if kind == "linear":
        return replace(rope, factor=float(_need_rope(params, "factor", kind)))
    if kind == "llama3":
        return replace(rope, factor=float(_need_rope(params, "factor", kind)),
                       low_freq_factor=float(_need_rope(params, "low_freq_factor", kind)),
                       high_freq_factor=float(_need_rope(params, "high_freq_factor", kind)))
    if kind == "longrope":
        short, long = _need_rope(params, "short_factor", kind), _need_rope(params, "long_factor", kind)
        if len(short) != rope.dim // 2 or len(long) != rope.dim // 2:
            raise CheckpointError(f"config.json: longrope factors need {rope.dim // 2} values each")
        factor = params.get("factor") or (max_pos / original if original else 1.0)
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return replace(rope, factor=float(factor), short_factor=tuple(map(float, short)),
                       long_factor=tuple(map(float, long)), attention_factor=float(attention))
    return rope


def _need_rope(params: dict[str, Any], key: str, kind: str) -> Any:
    if params.get(key) is None:
        raise CheckpointError(f"config.json: rope scaling of type {kind!r} needs {key!r}")
    return params[key]
