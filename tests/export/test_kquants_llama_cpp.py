"""Our k-quant GGUF files against llama.cpp's own quantizer (llama_model_quantize on our f16 file).

For every mix: llama.cpp loads and runs our file; each tensor has the type llama-quantize gives
it and the file the same size; over a few hundred tokens our file's next-token distributions
are as close to the f16 file's as llama.cpp's quantization of it (mean KL and top-1 agreement
within 10%). For each K-type, our blocks of the f16 values are mostly byte for byte llama.cpp's.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import builders
import gguf
import numpy as np
import pytest
import testdata
import torch
from export_helpers import (  # noqa: F401
    LlamaCppModel,
    confident_weights,
    kl_and_top1,
    llama_cpp_quantize,
    llama_cpp_required,
    log_probs,
)

import export
from export import kquants

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("llama_cpp_required")]

Q = gguf.GGMLQuantizationType
MIXES = list(kquants.MIXES)
# 256-wide rows take k-quants; the 352-wide ffn_down rows (11 blocks of 32) take llama.cpp's
# fallbacks; 8 layers make use_more_bits and the first-eighth rules pick some layers and not others;
# 4 query heads per KV head is the n_gqa >= 4 of q2_k's attn_v rule
SHAPE = dict(hidden_size=256, intermediate_size=352, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=1, max_position_embeddings=512)
N_TOKENS = 300


def confident_llama(path: Path) -> Path:
    """A random Llama whose next token is partly decided (export_helpers.confident_weights): ~85% of
    positions have a clear winner in f16."""
    builders.sentencepiece_checkpoint(path, testdata.sentencepiece_model("llama-spm"), family="llama", **SHAPE)
    return confident_weights(path)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(base dir, our f16 GGUF, token ids, f16 log-probs in llama.cpp)."""
    root = tmp_path_factory.mktemp("kquants")
    base = confident_llama(root / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", export.TokenizationWarning)  # Llama 2 vocab, no ChatML: irrelevant here
        f16 = export.to_gguf(base, root / "f16.gguf", "f16")
    text = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    with LlamaCppModel(f16) as m:
        ids = m.tokenize(text)[:N_TOKENS]
    assert len(ids) == N_TOKENS
    return base, f16, ids, log_probs(f16, ids)


@pytest.mark.parametrize("mix", MIXES)
def test_mix_runs_in_llama_cpp_like_llama_cpps_own_quantization(model, mix, tmp_path):
    base, f16, ids, ref = model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", export.TokenizationWarning)
        ours = export.to_gguf(base, tmp_path / "ours.gguf", mix)
    theirs = llama_cpp_quantize(f16, tmp_path / "theirs.gguf", kquants.MIXES[mix][1])

    our_types = {t.name: t.tensor_type for t in gguf.GGUFReader(ours).tensors}
    their_types = {t.name: t.tensor_type for t in gguf.GGUFReader(theirs).tensors}
    assert our_types == their_types
    assert abs(ours.stat().st_size - theirs.stat().st_size) <= 0.01 * theirs.stat().st_size

    got = log_probs(ours, ids)
    assert torch.isfinite(got).all()
    our_kl, our_top1 = kl_and_top1(ref, got)
    their_kl, their_top1 = kl_and_top1(ref, log_probs(theirs, ids))
    print(f"{mix}: KL ours {our_kl:.6f} llama.cpp {their_kl:.6f}; top-1 ours {our_top1:.3f} "
          f"llama.cpp {their_top1:.3f}; size {ours.stat().st_size} vs {theirs.stat().st_size}")
    assert our_kl <= 1.1 * their_kl
    assert our_top1 >= 0.9 * their_top1


@pytest.mark.parametrize("mix,qtype", [("q2_k", Q.Q2_K), ("q3_k_m", Q.Q3_K), ("q4_k_m", Q.Q4_K),
                                       ("q5_k_m", Q.Q5_K), ("q6_k", Q.Q6_K)], ids=lambda v: str(getattr(v, "name", v)))
def test_our_blocks_of_the_f16_values_are_llama_cpps_blocks(model, mix, qtype, tmp_path):
    """Same f16 input, same algorithm: blocks differ only where float sums in another order break a near
    tie between two candidate scales (measured identical: Q2_K 99.99%, Q3_K 99.99%, Q4_K 98.0%, Q5_K 99.5%,
    Q6_K 97.0%)."""
    _, f16, _, _ = model
    theirs = gguf.GGUFReader(llama_cpp_quantize(f16, tmp_path / "theirs.gguf", kquants.MIXES[mix][1]))
    source = {t.name: t for t in gguf.GGUFReader(f16).tensors}
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    same = total = 0
    for t in theirs.tensors:
        if t.tensor_type != qtype:
            continue
        values = np.asarray(source[t.name].data, dtype=np.float32)
        ours = kquants.quantize(values, qtype, torch.device("cpu")).reshape(-1, size)
        same += int((ours == np.asarray(t.data).reshape(-1, size)).all(-1).sum())
        total += ours.shape[0]
    assert total > 0
    print(f"{qtype.name}: {same} of {total} blocks identical")
    assert same >= 0.95 * total


FAMILIES = {
    # tied output: token_embd takes the output's type; no output.weight
    "gemma": lambda p: builders.sentencepiece_checkpoint(p, testdata.sentencepiece_model("llama-spm"),
                                                         family="gemma", **SHAPE),
    # fused attn_qkv (an attn_v-like tensor for llama.cpp) and ffn_up holding gate and up
    "phi3": lambda p: builders.sentencepiece_checkpoint(p, testdata.sentencepiece_model("phi-3"), family="phi3",
                                                        vocab_size=32064, **SHAPE,
                                                        tokenizer_json=testdata.fast_tokenizer_json("phi-3")),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tied_and_fused_families_get_llama_cpps_types_and_size(family, tmp_path):
    base = FAMILIES[family](tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", export.TokenizationWarning)
        f16 = export.to_gguf(base, tmp_path / "f16.gguf", "f16")
        ours = export.to_gguf(base, tmp_path / "ours.gguf", "q4_k_m")
    theirs = llama_cpp_quantize(f16, tmp_path / "theirs.gguf", kquants.MIXES["q4_k_m"][1])
    our_types = {t.name: t.tensor_type for t in gguf.GGUFReader(ours).tensors}
    assert our_types == {t.name: t.tensor_type for t in gguf.GGUFReader(theirs).tensors}
    assert Q.Q6_K in our_types.values()
    assert ours.stat().st_size == theirs.stat().st_size
    with LlamaCppModel(ours) as m:
        assert torch.isfinite(m.logits(m.tokenize("Hello world"))).all()
