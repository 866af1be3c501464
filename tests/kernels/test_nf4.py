"""The one-launch 4-bit dequantization (trainer/kernels/nf4.py) against bitsandbytes' dequantize_4bit.

The reference is the format's definition (kernel_checks.dequantized_4bit), and on a GPU also bitsandbytes'
CUDA kernel; the comparison is exact: both compute each scale and value in float32 and round once to the output
dtype, so any difference is a bug (a wrong nibble order, absmax block, nested scale or rounding).
"""


import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from kernel_checks import DTYPES, dequantized_4bit, device, seed

from trainer.kernels.lora_fused import dense_weight
from trainer.kernels.nf4 import NF4_GPU_BLOCKSIZES, dequantize_nf4


def reference(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """The format's definition (kernel_checks.dequantized_4bit); on a GPU also bitsandbytes' dequantize_4bit,
    which must agree with it bit for bit. Not bitsandbytes on the CPU: its AVX512 kernel restarts the absmax
    blocks at every row (see dequantized_4bit)."""
    expected = dequantized_4bit(weight, quant_state)
    if weight.is_cuda:
        assert torch.equal(bnbf.dequantize_4bit(weight, quant_state), expected), "bitsandbytes vs the definition"
    return expected


def check(shape: tuple[int, ...], dtype: torch.dtype, blocksize: int, nested: bool, quant_type: str = "nf4",
          scale: float = 1.0, quant_storage: torch.dtype = torch.uint8) -> None:
    torch.manual_seed(seed(shape, str(dtype), blocksize, nested, quant_type, str(quant_storage)))
    x = (torch.randn(shape, device=device()) * scale).to(dtype)
    weight, qs = bnbf.quantize_4bit(x, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type,
                                    quant_storage=quant_storage)
    assert qs.nested == nested and qs.dtype == dtype
    expected = reference(weight, qs)
    out = torch.full(shape, float("nan"), dtype=dtype, device=device())  # every element must be written
    got = dequantize_nf4(weight, qs, out)
    assert got is out
    assert torch.equal(got, expected), (f"{(got != expected).sum().item()} of {got.numel()} differ, max "
                                        f"{(got.double() - expected.double()).abs().max().item():.3g}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flat"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", [(96, 80), (37, 64), (128, 200)], ids=str)
def test_dequantize_equals_bitsandbytes_bit_for_bit(shape, blocksize, nested, dtype):
    check(shape, dtype, blocksize, nested)


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flat"])
@pytest.mark.parametrize("shape", [(33, 7), (1, 5), (3, 1)], ids=str)
def test_odd_element_counts_leave_the_padding_nibble_out(shape, nested):
    check(shape, torch.bfloat16, 64, nested)


@pytest.mark.parametrize("blocksize", [32, 256, 1024, 4096])
def test_every_bitsandbytes_blocksize(blocksize):
    if torch.cuda.is_available() and blocksize not in NF4_GPU_BLOCKSIZES:
        # a misaligned-address fault would poison the CUDA context for every later test
        pytest.skip(f"blocksize {blocksize} faulted on the H100 (misaligned address); dense_weight keeps "
                    "bitsandbytes' path for it on a GPU")
    check((40, 150), torch.bfloat16, blocksize, nested=True)


def test_many_nested_absmax_blocks():
    """More than one block of 256 absmax codes (state2.absmax has several entries): 100 x 640 at blocksize 64
    is 1000 absmax values, 4 nested blocks."""
    check((100, 640), torch.bfloat16, 64, nested=True, scale=5.0)


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flat"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fp4(dtype, nested):
    check((37, 64), dtype, 64, nested, quant_type="fp4")


def test_codes_stored_in_a_16_bit_tensor():
    check((24, 64), torch.bfloat16, 64, nested=True, quant_storage=torch.bfloat16)


def linear4bit(in_features: int, out_features: int, dtype: torch.dtype) -> bnb.nn.Linear4bit:
    """A Linear4bit quantized the way trainer.models.load_model does it (NF4, double quantization)."""
    module = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, compress_statistics=True,
                               quant_type="nf4", device="meta")
    tensor = (torch.randn(out_features, in_features) * in_features**-0.5).to(dtype)
    module.weight = bnb.nn.Params4bit(tensor, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                      module=module).to(device())
    return module


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_params4bit_weight_of_a_loaded_linear4bit(dtype):
    torch.manual_seed(seed("params4bit", str(dtype)))
    w = linear4bit(96, 160, dtype).weight
    assert w.quant_state.nested and w.quant_state.shape == (160, 96)
    out = torch.empty(160, 96, dtype=dtype, device=device())
    assert torch.equal(dequantize_nf4(w, w.quant_state, out), reference(w, w.quant_state))


def test_dense_weight_of_a_linear4bit_equals_bitsandbytes():
    """trainer.kernels.lora_fused.dense_weight routes NF4 weights here (on CUDA, or interpreted in CI)."""
    torch.manual_seed(seed("dense_weight"))
    module = linear4bit(80, 48, torch.bfloat16)
    expected = reference(module.weight, module.weight.quant_state)
    assert torch.equal(dense_weight(module, torch.bfloat16), expected)


# --- full size (GPU): Llama-3-8B MLP shapes against bitsandbytes' CUDA kernels -------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(4096, 14336), (14336, 4096)], ids=str)
def test_full_size_equals_bitsandbytes_on_cuda(shape, dtype):
    check(shape, dtype, 64, nested=True, scale=0.02)


def test_launch_arguments_are_kept_per_weight_follow_its_quant_state_and_go_with_it():
    import gc

    from trainer.kernels import nf4

    torch.manual_seed(seed("launch cache"))
    x, y = torch.randn(48, 64, device=device()), torch.randn(48, 64, device=device()) * 3
    wx, qx = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    wy, qy = bnbf.quantize_4bit(y, blocksize=64, compress_statistics=True, quant_type="nf4")
    gc.collect()  # earlier tests' weights leave first
    before = len(nf4._LAUNCHES)
    for out in (torch.empty(48, 64, device=device()), torch.empty(48, 64, device=device())):  # a fresh out each
        assert torch.equal(dequantize_nf4(wx, qx, out), reference(wx, qx))
    assert len(nf4._LAUNCHES) == before + 1
    # the same packed codes read with another quant state (absmax, nested codes): its values, not the cached ones
    assert torch.equal(dequantize_nf4(wx, qy, torch.empty(48, 64, device=device())), reference(wx, qy))
    del wx
    gc.collect()
    assert len(nf4._LAUNCHES) == before
    del wy
