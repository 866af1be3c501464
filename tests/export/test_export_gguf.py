"""export.to_gguf read back with gguf's reader: tensors against PEFT's merge, metadata against the
transformers config, tokenizer metadata against llama.cpp's own vocabulary files."""

from __future__ import annotations

from pathlib import Path

import builders
import gguf
import numpy as np
import pytest
import testdata
import torch
from export_helpers import make_adapter, peft_merged_state

import export

Q = gguf.GGMLQuantizationType
SPM_FAMILIES = {"llama": {}, "mistral": {}, "gemma": {}, "gemma2": {"query_pre_attn_scalar": 16}, "phi3": {},
                # three layers, the middle one global: not llama.cpp's default pattern (every sixth)
                "gemma3_text": {"num_hidden_layers": 3,
                                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}}
PERMUTED = ("llama", "mistral")
ARCHS = {"mistral": gguf.MODEL_ARCH.LLAMA, "gemma3_text": gguf.MODEL_ARCH.GEMMA3}


def spm_base(path: Path, family: str) -> Path:
    return builders.sentencepiece_checkpoint(path, testdata.sentencepiece_model("llama-spm"), family=family,
                                             **SPM_FAMILIES[family])


def qwen_base(path: Path, family: str = "qwen2") -> Path:
    return builders.fast_checkpoint(path, testdata.fast_tokenizer_json("qwen2"), family=family, bos_token=None,
                                    eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """family -> (base dir, adapter dir, PEFT's float32 merge), built once per family."""
    cache: dict[str, tuple[Path, Path, dict]] = {}

    def get(family: str):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            base = qwen_base(root / "base", family) if family.startswith("qwen") else spm_base(root / "base", family)
            adapter = make_adapter(base, root / "adapter")
            cache[family] = (base, adapter, peft_merged_state(base, adapter))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def exported(adapted, tmp_path_factory):
    """(family, quant) -> gguf's reader over export.to_gguf of that family's adapter, written and parsed once:
    parsing a 151k-token vocabulary takes gguf's reader tens of seconds, and the tests only read the file."""
    cache: dict[tuple[str, str], gguf.GGUFReader] = {}

    def get(family: str, quant: str) -> gguf.GGUFReader:
        if (family, quant) not in cache:
            _, adapter, _ = adapted(family)
            path = export.to_gguf(adapter, tmp_path_factory.mktemp(f"{family}-{quant}") / "model.gguf", quant)
            cache[family, quant] = gguf.GGUFReader(path)
        return cache[family, quant]

    return get


def field(reader: gguf.GGUFReader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def tensor_values(t) -> torch.Tensor:
    """A GGUF tensor as float32 in PyTorch's row-major shape (dequantized with gguf's reference code)."""
    data = np.array(t.data)
    if t.tensor_type not in (Q.F32, Q.F16):
        data = gguf.quants.dequantize(data, t.tensor_type)
    return torch.from_numpy(np.asarray(data, dtype=np.float32)).reshape(list(reversed([int(s) for s in t.shape])))


def interleave_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head reordered from HF's rotate-half layout to llama.cpp's adjacent pairs:
    llama.cpp row 2i is HF row i, row 2i+1 is HF row d/2 + i (d = rows per head)."""
    d = w.shape[0] // n_head
    out = torch.empty_like(w)
    for h in range(n_head):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
    return out


def expected_tensors(family: str, config: dict, merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What llama.cpp's converter stores for each merged HF tensor (names from gguf's own map)."""
    arch = ARCHS.get(family) or getattr(gguf.MODEL_ARCH, family.upper())
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    out = {}
    for name, w in merged.items():
        if name == "lm_head.weight" and (family.startswith("gemma") or config.get("tie_word_embeddings")):
            continue  # tied: llama.cpp reads the output projection from token_embd
        if family in PERMUTED and name.endswith("q_proj.weight"):
            w = interleave_rope_rows(w, config["num_attention_heads"])
        if family in PERMUTED and name.endswith("k_proj.weight"):
            w = interleave_rope_rows(w, config["num_key_value_heads"])
        if family.startswith("gemma") and name.endswith("norm.weight"):
            w = w + 1  # Gemma's RMSNorm (Gemma 3's q/k norms too) multiplies by (1 + weight)
        out[name_map.get_name(name, try_suffixes=(".weight", ".bias"))] = w
    return out


def assert_within_quant_error(got: torch.Tensor, want: torch.Tensor, qtype, name: str) -> None:
    if qtype == Q.F32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=name)
    elif qtype == Q.F16:
        assert torch.equal(got, want.to(torch.float16).float()), name
    elif qtype == Q.BF16:
        assert torch.equal(got, want.to(torch.bfloat16).float()), name
    else:
        blocks_got, blocks_want = got.reshape(-1, 32), want.reshape(-1, 32)
        amax = blocks_want.abs().amax(dim=1, keepdim=True)
        # q8_0: step d = amax/127, error half a step; q4_0: d = amax/8 and the top code is clipped
        # at 15, so up to one step. Plus the f16-stored scale's rounding times the largest code.
        d, codes = (amax / 127, 127) if qtype == Q.Q8_0 else (amax / 8, 8)
        step = d * (0.5 if qtype == Q.Q8_0 else 1.0) + codes * (d * 2**-11 + 2**-25)
        err = (blocks_got - blocks_want).abs()
        assert bool((err <= step + 1e-12).all()), f"{name}: {qtype.name} error {float((err - step).max())} over bound"


CASES = [(f, "f16") for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")] + [
    ("llama", "bf16"), ("llama", "q8_0"), ("llama", "q4_0"), ("gemma", "q4_0"), ("phi3", "q8_0"), ("qwen3", "q8_0"),
    ("gemma3_text", "q4_0")]


@pytest.mark.parametrize("family,quant", CASES)
def test_every_tensor_reads_back_as_the_peft_merge_in_llama_cpp_layout(adapted, exported, family, quant):
    base, _, merged = adapted(family)
    from healer.model_dir import ModelDir

    config = ModelDir(base).config
    reader = exported(family, quant)
    want = expected_tensors(family, config, merged)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    requested = export.QUANTS[quant][0]
    for name, t in got.items():
        values = tensor_values(t)
        assert tuple(values.shape) == tuple(want[name].shape), name
        if values.ndim == 1:
            assert t.tensor_type == Q.F32, name
        elif requested == Q.Q4_0 and name in ("output.weight",) + (("token_embd.weight",) if "output.weight" not in
                                                                   got else ()):
            assert t.tensor_type == Q.Q8_0, name
        else:
            assert t.tensor_type == requested, name
        assert_within_quant_error(values, want[name], t.tensor_type, name)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"])
def test_architecture_metadata_matches_the_transformers_config(adapted, exported, family):
    from transformers import AutoConfig

    base, _, _ = adapted(family)
    cfg = AutoConfig.from_pretrained(str(base))
    reader = exported(family, "f16")
    arch = field(reader, gguf.Keys.General.ARCHITECTURE)
    assert arch == {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
                    "gemma3_text": "gemma3", "phi3": "phi3"}[family]
    K = gguf.Keys

    def key(k):
        return field(reader, k.format(arch=arch))

    assert key(K.LLM.CONTEXT_LENGTH) == cfg.max_position_embeddings
    assert key(K.LLM.EMBEDDING_LENGTH) == cfg.hidden_size
    assert key(K.LLM.FEED_FORWARD_LENGTH) == cfg.intermediate_size
    assert key(K.LLM.BLOCK_COUNT) == cfg.num_hidden_layers
    assert key(K.Attention.HEAD_COUNT) == cfg.num_attention_heads
    assert key(K.Attention.HEAD_COUNT_KV) == cfg.num_key_value_heads
    assert key(K.Attention.LAYERNORM_RMS_EPS) == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
    rope = cfg.rope_parameters
    assert key(K.Rope.FREQ_BASE) == pytest.approx(rope.get("full_attention", rope)["rope_theta"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert key(K.Attention.KEY_LENGTH) == head_dim
    if family == "gemma2":
        assert key(K.LLM.ATTN_LOGIT_SOFTCAPPING) == pytest.approx(cfg.attn_logit_softcapping)
        assert key(K.LLM.FINAL_LOGIT_SOFTCAPPING) == pytest.approx(cfg.final_logit_softcapping)
        assert key(K.Attention.SLIDING_WINDOW) == cfg.sliding_window
    if family == "gemma3_text":
        assert key(K.Attention.SLIDING_WINDOW) == cfg.sliding_window
        assert key(K.Attention.SLIDING_WINDOW_PATTERN) == [t == "sliding_attention" for t in cfg.layer_types]
        assert key(K.Rope.FREQ_BASE_SWA) == pytest.approx(rope["sliding_attention"]["rope_theta"])
        assert key(K.LLM.FINAL_LOGIT_SOFTCAPPING) is None and key(K.LLM.ATTN_LOGIT_SOFTCAPPING) is None
    if family == "phi3":
        assert key(K.Rope.SCALING_ORIG_CTX_LEN) == cfg.original_max_position_embeddings
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (not cfg.tie_word_embeddings)


def test_llama3_rope_scaling_writes_the_frequency_factors_transformers_uses(tmp_path):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    base = builders.sentencepiece_checkpoint(tmp_path / "base", testdata.sentencepiece_model("llama-spm"),
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                             rope_parameters=rope)
    reader = gguf.GGUFReader(export.to_gguf(base, tmp_path / "m.gguf", "f16"))
    (freqs,) = [t for t in reader.tensors if t.name == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"]
    cfg = AutoConfig.from_pretrained(str(base))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32))
    factors = torch.from_numpy(np.array(freqs.data, dtype=np.float64))
    assert len({round(float(f), 4) for f in factors}) > 2  # the test spans all three bands
    torch.testing.assert_close(factors, plain / scaled.double(), rtol=1e-5, atol=0)


def test_sentencepiece_vocab_equals_llama_cpps_llama_spm_gguf(exported):
    reader = exported("llama", "f16")  # the tokenizer of spm_base(llama), exported with an adapter over it
    ref = testdata.gguf_vocab("llama-spm")
    K = gguf.Keys.Tokenizer
    assert field(reader, K.MODEL) == ref["model"] == "llama"
    assert field(reader, K.PRE) == ref["pre"]
    assert field(reader, K.LIST) == ref["tokens"]
    assert np.array_equal(np.array(field(reader, K.SCORES), np.float32), np.array(ref["scores"], np.float32))
    assert field(reader, K.TOKEN_TYPE) == ref["types"]
    for k in ("bos", "eos", "unk", "add_bos"):
        assert field(reader, {"bos": K.BOS_ID, "eos": K.EOS_ID, "unk": K.UNK_ID, "add_bos": K.ADD_BOS}[k]) == ref[k], k


@pytest.fixture(scope="module")
def llama3_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama3")
    base = builders.fast_checkpoint(root / "base", testdata.fast_tokenizer_json("llama-bpe"),
                                    bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                    chat_template=testdata.template("meta-llama-Llama-3.1-8B-Instruct"))
    return base, gguf.GGUFReader(export.to_gguf(base, root / "m.gguf", "q8_0"))


def test_llama3_bpe_vocab_merges_and_pre_tokenizer_equal_llama_cpps_gguf(llama3_gguf):
    _, reader = llama3_gguf
    ref = testdata.gguf_vocab("llama-bpe")
    K = gguf.Keys.Tokenizer
    assert field(reader, K.MODEL) == ref["model"] == "gpt2"
    assert field(reader, K.PRE) == ref["pre"] == "llama-bpe"
    assert field(reader, K.LIST) == ref["tokens"]
    assert field(reader, K.TOKEN_TYPE) == ref["types"]
    assert field(reader, K.MERGES) == ref["merges"]
    assert field(reader, K.BOS_ID) == ref["bos"] and field(reader, K.EOS_ID) == ref["eos"]
    assert field(reader, K.EOT_ID) == ref["tokens"].index("<|eot_id|>")


def test_chat_template_is_written_verbatim(llama3_gguf):
    base, reader = llama3_gguf
    from healer.model_dir import ModelDir

    assert field(reader, gguf.Keys.Tokenizer.CHAT_TEMPLATE) == ModelDir(base).chat_template
    assert field(reader, gguf.Keys.Tokenizer.CHAT_TEMPLATE) == testdata.template("meta-llama-Llama-3.1-8B-Instruct")


def test_qwen2_bpe_vocab_and_pre_tokenizer_equal_llama_cpps_gguf(exported):
    reader = exported("qwen2", "f16")
    ref = testdata.gguf_vocab("qwen2")
    K = gguf.Keys.Tokenizer
    assert field(reader, K.PRE) == ref["pre"] == "qwen2"
    tokens = field(reader, K.LIST)  # the tiny model's vocab_size is the tokenizer's; llama.cpp's file pads
    assert tokens == ref["tokens"][:len(tokens)] and len(tokens) > 151_000
    assert field(reader, K.MERGES) == ref["merges"]
    assert field(reader, K.EOS_ID) == ref["eos"]


@pytest.mark.parametrize("family,overrides,named", [
    # llama.cpp scales scores by head_dim (16 here) whatever query_pre_attn_scalar says (src/models/gemma*.cpp)
    ("gemma2", {"query_pre_attn_scalar": 24}, "query_pre_attn_scalar=24"),
    ("gemma3_text", {"query_pre_attn_scalar": 24}, "query_pre_attn_scalar=24"),
    # llama.cpp's gemma3 has no attention softcap (its converter asserts there is none)
    ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
])
def test_settings_llama_cpp_would_ignore_are_refused_before_writing(tmp_path, family, overrides, named):
    base = builders.sentencepiece_checkpoint(tmp_path / "base", testdata.sentencepiece_model("llama-spm"),
                                             family=family, **{"query_pre_attn_scalar": 16, **overrides})
    with pytest.raises(export.UnsupportedError, match=named):
        export.to_gguf(base, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()
