"""Build tiny but real Hugging Face checkpoints around real tokenizers, for tests.

The weights come from transformers' own model classes (`save_pretrained`), so the files are
exactly what a user's checkpoint looks like; only the sizes are tiny (hidden 64, 2 layers).
tiny_model is the one place tests build such a model; save_tiny_model writes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"]),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"]),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    "gemma": dict(model_type="gemma", architectures=["GemmaForCausalLM"], head_dim=16),
    "gemma2": dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], head_dim=16),
    "phi3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"]),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=32, tie_word_embeddings=True),
    "gemma3_text": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=16,
                        sliding_window=8, query_pre_attn_scalar=16),
}

# The families of the official repos whose tokenizer files tests/testdata.real_tokenizer fetches, and
# the embedding rows their configs declare: Qwen3 pads its 151,669 tokens to 151,936 rows, Gemma 3
# (4B and up, whose tokenizer this is: it names <image_soft_token> = 262144) has 262,208.
REAL_TOKENIZER_MODELS: dict[str, tuple[str, int]] = {
    "llama2": ("llama", 32000),
    "llama3": ("llama", 128256),
    "llama3_1": ("llama", 128256),
    "gemma3": ("gemma3_text", 262208),
    "qwen3": ("qwen3", 151936),
}


def tiny_config(family: str, vocab_size: int, **overrides: Any):
    """A transformers config object of `family` with tiny sizes."""
    from transformers import AutoConfig

    base = dict(FAMILY_CONFIGS[family])
    model_type = base.pop("model_type")
    base.pop("architectures")
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    kwargs.update(base)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(family: str, vocab_size: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               spread: bool = False, **config_overrides: Any):
    """A random tiny `family` transformers model (eval mode), initialized by transformers after
    torch.manual_seed(seed); spread=True then redraws its weights with spread_weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size, **config_overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if spread:
        spread_weights(model, norm_offset=family.startswith("gemma"))
    return model


def spread_weights(model: torch.nn.Module, *, norm_offset: bool) -> None:
    """Redraw `model`'s weights (a transformers model's, or our decoder's: the same names) wide enough that
    every family switch shows, in its parameter order from torch's global generator.

    transformers initializes linears with std 0.02, which makes attention nearly uniform and leaves
    sliding windows, softcaps and norm offsets almost invisible in the logits; a parity test on such
    weights could pass with a switch missing. Here norms get 1 +- 30% (+-30% around 0 where they
    scale by (1 + w), norm_offset: Gemma's), other 1-D tensors (biases) N(0, 0.1), embeddings N(0, 1)
    and matrices N(0, 1/fan_in).
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if norm_offset else 1.0))
            elif p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1)
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)


def save_tiny_model(out: Path, family: str, vocab_size: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    spread: bool = False, max_shard_size: str | None = None, **config_overrides: Any):
    """Write config.json, generation_config.json and safetensors weights of tiny_model(...) to `out`;
    return the model."""
    model = tiny_model(family, vocab_size, seed=seed, dtype=dtype, spread=spread, **config_overrides)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return model


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def sentencepiece_checkpoint(out: Path, sp_model: Path, *, family: str = "llama", vocab_size: int | None = None,
                             add_bos: bool = True, chat_template: str | None = None,
                             tokenizer_json: Path | None = None, pad_token: str | None = None,
                             **config_overrides: Any) -> Path:
    """A checkpoint whose tokenizer is a real sentencepiece model (optionally with a tokenizer.json)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = vocab_size or sp.get_piece_size()
    save_tiny_model(out, family, n, bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(),
                    pad_token_id=sp.piece_to_id(pad_token) if pad_token else None, **config_overrides)
    shutil.copyfile(sp_model, out / "tokenizer.model")
    tc: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": sp.id_to_piece(sp.bos_id()),
        "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()),
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "model_max_length": 4096,
    }
    if pad_token:
        tc["pad_token"] = pad_token
    if chat_template:
        tc["chat_template"] = chat_template
    write_json(out / "tokenizer_config.json", tc)
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    return out


def converted_tokenizer_json(sp_model: Path, dest_dir: Path, add_bos: bool = True) -> Path:
    """tokenizer.json as transformers converts it from a sentencepiece model (what users get)."""
    from transformers import AutoTokenizer

    src = dest_dir / "_src"
    src.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sp_model, src / "tokenizer.model")
    write_json(src / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer", "add_bos_token": add_bos})
    write_json(src / "config.json", {"model_type": "llama"})
    tok = AutoTokenizer.from_pretrained(str(src))
    tok.save_pretrained(str(dest_dir / "_out"))
    return dest_dir / "_out" / "tokenizer.json"


def fast_checkpoint(out: Path, tokenizer_json: Path, *, family: str = "llama", vocab_size: int | None = None,
                    bos_token: str | None, eos_token: str, pad_token: str | None = None,
                    chat_template: str | None = None, tokenizer_config: dict | None = None,
                    add_bos: bool = False, **config_overrides: Any) -> Path:
    """A checkpoint whose tokenizer is a real tokenizer.json (BPE vocabularies: Llama 3, Qwen2, ...).

    add_bos=True installs the post-processor Meta's Llama 3 tokenizer.json ships (ByteLevel, then
    a TemplateProcessing that prepends BOS); the GGUF-converted vocabularies have none.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    n = vocab_size or tok.get_vocab_size(with_added_tokens=True)
    ids = {t: tok.token_to_id(t) for t in (bos_token, eos_token, pad_token) if t}
    save_tiny_model(out, family, n, bos_token_id=ids.get(bos_token), eos_token_id=ids[eos_token],
                    pad_token_id=ids.get(pad_token), **config_overrides)
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    if add_bos:
        tj = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
        tj["post_processor"] = bos_post_processor(bos_token, ids[bos_token])
        write_json(out / "tokenizer.json", tj)
    tc: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos_token,
                          "eos_token": eos_token, "model_max_length": 8192}
    if pad_token:
        tc["pad_token"] = pad_token
    if chat_template:
        tc["chat_template"] = chat_template
    tc.update(tokenizer_config or {})
    write_json(out / "tokenizer_config.json", tc)
    return out


def real_checkpoint(out: Path, tokenizer_dir: Path, name: str, **config_overrides: Any) -> Path:
    """A tiny model of `name`'s family around an official repo's tokenizer files, copied verbatim.

    `name` is a key of REAL_TOKENIZER_MODELS; the token ids in config.json are the ones the files name.
    """
    from tokenizers import Tokenizer

    family, vocab_size = REAL_TOKENIZER_MODELS[name]
    vocab_size = config_overrides.pop("vocab_size", vocab_size)
    tc = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))

    def token_id(key: str) -> int | None:
        token = tc.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        return tok.token_to_id(token) if token else None

    ids = dict(bos_token_id=token_id("bos_token"), eos_token_id=token_id("eos_token"),
               pad_token_id=token_id("pad_token"))
    ids.update(config_overrides)
    save_tiny_model(out, family, vocab_size, **ids)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / file, out / file)
    return out


def bos_post_processor(bos: str, bos_id: int) -> dict[str, Any]:
    """The post_processor of Meta's Llama 3 tokenizer.json: byte-level offsets, then BOS first."""
    return {
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
            },
        ],
    }
