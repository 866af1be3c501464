"""The model families the toolkit trains and exports: everything it knows about each, one entry per family.

Plain data, read by the trainer's decoder (trainer/models/spec.py: which switches a config.json turns
on), GGUF export (export/gguf_arch.py: llama.cpp's architecture and converter switches) and the
tokenizer checks (whether sequences start with BOS). Adding a family is one entry here plus its tests.
This module imports nothing of the toolkit, so every stage may read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """What one Hugging Face `model_type` means to the decoder, to llama.cpp and to its tokenizer."""

    model_type: str
    # -- decoder (defaults: Llama) --
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w)
    qk_norm: bool = False  # Qwen3, Gemma 3: an RMSNorm over each head of q and of k, before RoPE
    activation_keys: tuple[str, ...] = ("hidden_act",)  # config keys naming the activation, first set wins
    activation: str = "silu"  # when none of them is set
    gelu_is_tanh: bool = False  # Gemma: its configs say "gelu" but the weights were trained with the tanh form
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden)
    tied_head: bool = False  # tie_word_embeddings when config.json does not say
    qkv_bias: bool | None = None  # None: config's attention_bias
    o_bias: bool | None = None  # None: config's attention_bias
    mlp_bias: bool = False  # whether config's mlp_bias is read (else no MLP biases)
    fused_qkv: bool = False  # Phi-3: one qkv_proj
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj
    query_pre_attn_scalar: float | None = None  # default of that config key; None: scores scale by head_dim**-0.5
    softcaps: tuple[float | None, float | None] | None = None  # (attention, final) defaults; None: never capped
    # Where config.json places sliding windows: "none"; "all" (one window, or null, on every layer);
    # "qwen" (use_sliding_window + max_window_layers); "pattern" (every `window_pattern`-th layer global).
    # layer_types, when present, wins for "qwen" and "pattern".
    sliding: str = "none"
    window_pattern: int = 0  # "pattern": default of config's sliding_window_pattern
    default_window: int | None = None  # sliding_window when config.json has no such key
    rope_theta: float = 10000.0  # RoPE base when config.json does not say (Gemma 3: global layers)
    local_rope_theta: float | None = None  # Gemma 3: sliding layers rotate with their own base (and no scaling)
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and around the MLP too
    # -- GGUF (llama.cpp's convert_hf_to_gguf.py) --
    gguf_arch: str = "LLAMA"  # member name of gguf.MODEL_ARCH
    permute_qk: bool = False  # llama arch rotates adjacent pairs; HF stores two rotary halves per head
    norm_plus_one: bool = False  # llama.cpp's RMSNorm scales by w: the converter stores Gemma's w + 1
    drop_lm_head: bool = False  # the arch always ties output to token_embd; an lm_head tensor is not loaded
    gguf_attn_softcap: bool = False  # the arch reads an attention-score softcap (Gemma 2; not Gemma 3)
    gguf_sliding_window: bool = False  # the arch reads {arch}.attention.sliding_window (0: none)
    gguf_longrope: bool = False  # LongRoPE factors and original context length are exported (Phi-3)
    # layer count at which llama.cpp scales scores by heads/hidden instead of head_dim (the 27B models)
    gguf_hidden_scale_layers: int | None = None
    # -- tokenizer and chat --
    bos: bool = False  # pretraining put BOS first in every sequence: encoding without it shifts every position
    template: str | None = None  # healer.templates registry entry of the instruct models, where one fits all
    stop_tokens: tuple[str, ...] = ()  # tokens that end an assistant turn in the family's instruct models


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", mlp_bias=True, permute_qk=True, bos=True,
           # Llama 2 ends turns with </s>, Llama 3 with <|eot_id|> (<|eom_id|> after a tool call)
           stop_tokens=("</s>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")),
    Family("mistral", qkv_bias=False, o_bias=False, sliding="all", permute_qk=True, bos=True,
           stop_tokens=("</s>",)),
    Family("qwen2", qkv_bias=True, o_bias=False, sliding="qwen", gguf_arch="QWEN2",
           template="qwen2.5", stop_tokens=("<|im_end|>", "<|endoftext|>")),
    Family("qwen3", qk_norm=True, sliding="qwen", gguf_arch="QWEN3",
           template="qwen3", stop_tokens=("<|im_end|>", "<|endoftext|>")),
    Family("gemma", norm_offset=1.0, activation_keys=("hidden_activation", "hidden_act"),
           activation="gelu_pytorch_tanh", gelu_is_tanh=True, embed_scale=True, tied_head=True,
           gguf_arch="GEMMA", norm_plus_one=True, drop_lm_head=True, bos=True, template="gemma",
           stop_tokens=("<end_of_turn>", "<eos>")),
    Family("gemma2", norm_offset=1.0, activation_keys=("hidden_activation", "hidden_act"),
           activation="gelu_pytorch_tanh", embed_scale=True, tied_head=True, query_pre_attn_scalar=256,
           softcaps=(50.0, 30.0), sliding="pattern", window_pattern=2, default_window=4096, sandwich_norms=True,
           gguf_arch="GEMMA2", norm_plus_one=True, drop_lm_head=True, gguf_attn_softcap=True, gguf_sliding_window=True,
           gguf_hidden_scale_layers=46, bos=True, template="gemma", stop_tokens=("<end_of_turn>", "<eos>")),
    Family("gemma3_text", norm_offset=1.0, qk_norm=True, activation_keys=("hidden_activation",),
           activation="gelu_pytorch_tanh", embed_scale=True, tied_head=True, query_pre_attn_scalar=256,
           softcaps=(None, None), sliding="pattern", window_pattern=6, default_window=4096,
           rope_theta=1_000_000.0, local_rope_theta=10_000.0, sandwich_norms=True,
           gguf_arch="GEMMA3", norm_plus_one=True, drop_lm_head=True, gguf_sliding_window=True,
           gguf_hidden_scale_layers=62,
           bos=True, template="gemma-3", stop_tokens=("<end_of_turn>", "<eos>")),
    Family("phi3", qkv_bias=False, o_bias=False, fused_qkv=True, fused_gate_up=True, sliding="all",
           gguf_arch="PHI3", gguf_longrope=True, gguf_sliding_window=True, template="phi-3", stop_tokens=("<|end|>", "<|endoftext|>")),
)}

# Model types we do not train whose tokenizer and chat conventions are those of a family above.
TOKENIZER_ALIASES: dict[str, str] = {
    "mixtral": "mistral",
    "gemma3": "gemma3_text",  # Gemma 3 with its vision tower: the same tokenizer as the text model
}


def get(model_type: str | None) -> Family | None:
    """The family entry for config.json's model_type, or None when the toolkit does not train it."""
    return FAMILIES.get(model_type or "")


def starts_with_bos(model_type: str | None) -> bool:
    """Whether the family's pretraining started every sequence with BOS (unknown model types: no)."""
    family = FAMILIES.get(TOKENIZER_ALIASES.get(model_type or "", model_type or ""))
    return family is not None and family.bos
