"""k-quant blocks (export.kquants) against gguf-py's reference dequantizers.

The values our quantizer says a block holds must be exactly what gguf-py (the format's reference
reader, written by llama.cpp's authors) decodes from our bytes; the error must be that of the
format's bit width. Agreement with llama.cpp's own quantizer and mixes is in test_kquants_llama_cpp.py.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from export import kquants

Q = gguf.GGMLQuantizationType
K_TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# relative mean squared error on Gaussian blocks: each bit halves the step (a quarter of the
# error); ours measured 0.088, 0.023, 0.0051, 0.0013, 0.00031 (llama.cpp's: test_kquants_llama_cpp.py)
MAX_RELATIVE_MSE = {Q.Q2_K: 0.1, Q.Q3_K: 0.03, Q.Q4_K: 0.007, Q.Q5_K: 0.0018, Q.Q6_K: 0.0005}


def awkward_blocks(seed: int = 0) -> torch.Tensor:
    """Gaussian super-blocks plus the cases with special paths in the C code: all zero, a zero
    sub-block, constant, all positive, one outlier, tiny and large magnitudes, f16-limited scales."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 256, generator=gen)
    x[1] = 0
    x[2, :32] = 0
    x[3] = 0.5
    x[4] = x[4].abs()
    x[5, 7] = 40.0
    x[6] *= 1e-6
    x[7] *= 1e3
    x[8] = -x[8].abs()
    x[9, 16:] = 0
    x[10] = torch.arange(256) - 128.0
    return x


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_gguf_dequantizes_our_blocks_to_exactly_the_values_we_quantized_to(qtype):
    x = awkward_blocks()
    packed, values = kquants.quantize_blocks(x, qtype)
    assert packed.dtype == torch.uint8 and packed.shape == (x.shape[0], gguf.GGML_QUANT_SIZES[qtype][1])
    decoded = gguf.quants.dequantize(packed.numpy(), qtype)
    np.testing.assert_array_equal(decoded, values.numpy())


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_quant_error_is_that_of_its_bit_width(qtype):
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    _, values = kquants.quantize_blocks(x, qtype)
    assert float(((values - x) ** 2).mean() / (x ** 2).mean()) < MAX_RELATIVE_MSE[qtype]
    zero_block = kquants.quantize_blocks(torch.zeros(1, 256), qtype)[1]
    assert torch.equal(zero_block.abs(), torch.zeros(1, 256))


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_quantize_streams_chunks_into_gguf_byte_shape(qtype):
    x = awkward_blocks(2).reshape(8, 2048).numpy()
    whole = kquants.quantize(x, qtype)
    assert whole.shape == gguf.quants.quant_shape_to_byte_shape(x.shape, qtype)
    np.testing.assert_array_equal(kquants.quantize(x, qtype, chunk_values=3 * 256), whole)
    np.testing.assert_array_equal(gguf.quants.dequantize(whole, qtype),
                                  kquants.quantize_blocks(torch.from_numpy(x).reshape(-1, 256), qtype)[1]
                                  .reshape(x.shape).numpy())


def test_rows_not_a_multiple_of_256_fall_back_like_llama_cpp():
    assert kquants.fallback(Q.Q4_K, 4096) == Q.Q4_K
    assert [kquants.fallback(t, 352) for t in K_TYPES] == [Q.Q4_0, Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.Q8_0]
    assert kquants.fallback(Q.Q6_K, 100) == Q.F16


def test_cli_names_fallback_types_and_lists_the_mixes_for_an_unknown_quant(tmp_path):
    """64-wide rows fit no 256-value block: llama-quantize stores Q4_K as Q5_0 and Q6_K (and the
    output) as Q8_0; test_kquants_llama_cpp.py checks these choices against llama.cpp's own."""
    import builders
    import testdata
    from click.testing import CliRunner

    from cli import trainer

    base = builders.sentencepiece_checkpoint(tmp_path / "base", testdata.sentencepiece_model("llama-spm"))
    runner = CliRunner()
    ok = runner.invoke(trainer, ["export", str(base), "-o", str(tmp_path / "m.gguf"), "--format", "gguf",
                                 "--quant", "q4_k_m"])
    assert ok.exit_code == 0, ok.output
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert (types["blk.0.attn_q.weight"], types["blk.1.attn_v.weight"], types["output.weight"]) == (
        Q.Q5_0, Q.Q8_0, Q.Q8_0)
    notes = {line.split(" stored as ")[1].split(",")[0]: line for line in ok.output.splitlines()
             if line.startswith("note:")}
    assert set(notes) == {"Q5_0", "Q8_0"}
    assert "blk.N.attn_q.weight x2" in notes["Q5_0"] and "output.weight" in notes["Q8_0"]
    bad = runner.invoke(trainer, ["export", str(base), "-o", str(tmp_path / "x.gguf"), "--format", "gguf",
                                  "--quant", "q4_k"])
    assert bad.exit_code == 2 and bad.output.strip().count("\n") == 0
    assert all(mix in bad.output for mix in kquants.MIXES)
