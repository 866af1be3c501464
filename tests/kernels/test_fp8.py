"""FP8 (e4m3) forward products (trainer/kernels/fp8.py, nf4.py's e4m3 output, lora_fused's plan.fp8) against
torch's own float8 casts, the 4-bit format's definition and float64 math.

The casts are compared bit for bit: e4m3 is a rounding of float32 with one right answer (nearest, ties to even),
and torch's .to(float8_e4m3fn) gives it. The projections are compared with float64 products of the same e4m3
operands and scales, so what is checked is the plumbing (which scale goes where, the LoRA term and bias added
after the product), to bf16 rounding; that FP8 is less exact than bf16 is bench/fp8_matmul.py's subject.
"""

import math
import os

import bitsandbytes.functional as bnbf
import pytest
import torch
import triton
import triton.language as tl
from kernel_checks import dequantized_4bit, device, relative_error, seed
from test_lora_fused import BF16_BOUND, adapted, base_linear, mlp_modules, plain_mlp

from trainer.config import ConfigError, resolve_config
from trainer.kernels import fp8
from trainer.kernels.fp8 import E4M3, quantize_rows
from trainer.kernels.lora_fused import fp8_weight, lora_linear, lora_mlp, lora_projections
from trainer.kernels.lora_projection import _plan
from trainer.kernels.nf4 import dequantize_nf4, row_absmax
from trainer.kernels.triton_math import e4m3_bits
from trainer.lora import LoRALinear, LoRASettings, apply_lora, fp8_layers
from trainer.options import ModelOptions

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _bits_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, e4m3_bits(tl.load(x_ptr + i, mask=i < n)), mask=i < n)


def e4m3_reference(x: torch.Tensor) -> torch.Tensor:
    """torch's cast, saturated at +-448 as the hardware's satfinite cast is (torch's overflows to NaN)."""
    return x.clamp(-448, 448).to(E4M3).view(torch.uint8)


def test_e4m3_bits_round_every_value_as_torch_does():
    # every e4m3 value, the midpoints between neighbours (ties: to even), a float32 ulp either side of each,
    # and random values over e4m3's whole range and past it (saturation)
    codes = torch.arange(0, 127, dtype=torch.uint8).view(E4M3).float()  # 0 .. 448, no NaN
    mids = (codes[1:] + codes[:-1]) / 2
    around = torch.cat([mids, mids.nextafter(torch.zeros(())), mids.nextafter(torch.full((), 1e9))])
    torch.manual_seed(seed("e4m3 bits"))
    rand = torch.randn(4000) * torch.logspace(-12, 3, 4000)
    x = torch.cat([codes, around, rand, torch.tensor([500.0, 1e30, 2.0**-10, 2.0**-9 * 0.5, 2.0**-9 * 1.5])])
    x = torch.cat([x, -x]).to(device())
    got = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    _bits_kernel[(triton.cdiv(x.numel(), 1024),)](x, got, x.numel(), BLOCK=1024)
    want = e4m3_reference(x)
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} differ, e.g. {x[bad[:4]].tolist()}: {got[bad[:4]].tolist()} " \
                             f"vs {want[bad[:4]].tolist()}"


def rounded_quotient(a, b) -> torch.Tensor:
    """a / b in float32, rounded once (as the kernels' div_rn): torch's CUDA division by a Python scalar
    multiplies by the reciprocal, and `448 / t` is t's reciprocal times 448, both rounded twice. The float64
    quotient of float32 operands rounds to the float32 one exactly."""
    a = a.double() if isinstance(a, torch.Tensor) else a
    b = b.double() if isinstance(b, torch.Tensor) else b
    return (a / b).float()


@pytest.mark.parametrize("one_pass_max", [16384, 64], ids=["one pass", "two passes"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(5, 100), (3, 5000), (2, 4096), (1, 1)], ids=str)
def test_quantize_rows_scales_each_row_to_448_and_casts_as_torch_does(shape, dtype, one_pass_max, monkeypatch):
    monkeypatch.setattr(fp8, "_ONE_PASS_MAX", one_pass_max)  # rows wider than this are read twice
    torch.manual_seed(seed(shape, str(dtype)))
    mags = torch.logspace(-4, 4, shape[0]) if dtype != torch.float16 else torch.logspace(-2, 2, shape[0])
    x = (torch.randn(shape) * mags[:, None]).to(dtype).to(device())
    if shape[0] > 2:
        x[1] = 0  # a padding row
    x8, scale = quantize_rows(x)
    amax = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    assert x8.dtype == E4M3 and scale.shape == (shape[0], 1) and scale.dtype == torch.float32
    assert torch.equal(scale, rounded_quotient(amax, 448))
    assert torch.equal(x8.view(torch.uint8), (x.float() * rounded_quotient(448, amax)).to(E4M3).view(torch.uint8))
    # what the product sees: within half an e4m3 step (1/16 relative) of x, or an e4m3 subnormal's 2^-10
    back = x8.float() * scale
    assert ((back - x.float()).abs() <= x.float().abs() / 16 + 2.0**-10 * scale).all()


def test_quantize_rows_reads_a_strided_view():
    x = torch.randn(6, 300, device=device()).to(torch.bfloat16)
    view = x[::2, :200]
    a8, a_scale = quantize_rows(view)
    b8, b_scale = quantize_rows(view.contiguous())
    assert torch.equal(a8.view(torch.uint8), b8.view(torch.uint8)) and torch.equal(a_scale, b_scale)


def quantized(shape, blocksize: int, nested: bool, smallest: float = 1e-2):
    torch.manual_seed(seed(shape, blocksize, nested, smallest))
    x = torch.randn(shape, device=device()) * torch.logspace(math.log10(smallest), 1, shape[0], device=device())[:, None]
    return bnbf.quantize_4bit(x.to(torch.bfloat16), blocksize=blocksize, compress_statistics=nested,
                              quant_type="nf4")


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flat"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", [(96, 128), (37, 256), (24, 200)], ids=str)
def test_nf4_to_e4m3_with_row_scales_equals_the_definition(shape, blocksize, nested):
    check_e4m3_dequantization(shape, blocksize, nested, *quantized(shape, blocksize, nested))


def test_a_nested_block_scale_below_zero_counts_by_its_magnitude():
    # rows down to 1e-4 of the largest: the 8-bit nested scales of the smallest blocks come back negative
    # (their quantization error exceeds them; seen on the GPU at 1e-2 too), flipping their values' signs
    shape = (96, 128)
    weight, qs = quantized(shape, 64, True, smallest=1e-4)
    absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    assert (absmax < 0).any()
    check_e4m3_dequantization(shape, 64, True, weight, qs)


def check_e4m3_dequantization(shape, blocksize: int, nested: bool, weight, qs):
    """row_absmax and the e4m3 output of dequantize_nf4 against code * block scale from the format's definition."""
    values = dequantized_4bit(weight, qs).float()  # the weight in bf16, exactly (bf16 holds every value here)
    # the float32 values, before the bf16 rounding: code * absmax from the definition
    absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if nested else qs.absmax
    n = shape[0] * shape[1]
    packed = weight.reshape(-1).view(torch.uint8)
    nibbles = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()
    f32 = (qs.code.float().to(packed.device)[nibbles] * absmax.float().repeat_interleave(blocksize)[:n]).view(shape)
    assert torch.equal(f32.to(torch.bfloat16).float(), values)
    amax = row_absmax(weight, qs)
    if shape[1] % blocksize == 0:  # blocks within rows: each row's own largest magnitude, exactly
        assert torch.equal(amax, f32.abs().amax(dim=1))
    else:  # blocks straddle rows: the matrix's largest, for every row
        assert torch.equal(amax, f32.abs().amax().expand(shape[0]))
    inv = 448 / amax
    out = torch.empty(shape, dtype=E4M3, device=device())
    dequantize_nf4(weight, qs, out, row_scale=inv)
    assert torch.equal(out.view(torch.uint8), (f32 * inv[:, None]).to(E4M3).view(torch.uint8))
    # the same weight into bf16 afterwards: its own launch, unchanged values
    assert torch.equal(dequantize_nf4(weight, qs, torch.empty(shape, dtype=torch.bfloat16, device=device())).float(),
                       values)


def test_an_e4m3_output_needs_row_scales():
    weight, qs = quantized((8, 64), 64, True)
    with pytest.raises(AssertionError, match="row_scale"):
        dequantize_nf4(weight, qs, torch.empty(8, 64, dtype=E4M3, device=device()))


def fp8_reference(x: torch.Tensor, m: torch.nn.Module) -> torch.Tensor:
    """x W^T from the e4m3 operands and their scales, in float64 (W the module's NF4 weight, or its base's)."""
    base = m.base_layer if isinstance(m, LoRALinear) else m
    x2 = x.reshape(-1, x.shape[-1])
    amax = x2.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    x64 = (x2.float() * rounded_quotient(448, amax)).to(E4M3).double() * rounded_quotient(amax, 448).double()
    w = base.weight
    w8, w_scale = fp8_weight(base)
    w64 = w8.double() * w_scale.double().t()
    # the e4m3 weight is the NF4 weight's (checked above): only its rounding separates it from the bf16 one
    assert relative_error(w64, dequantized_4bit(w, w.quant_state).double()) < 2**-4
    return (x64 @ w64.t()).view(*x.shape[:-1], -1)


def lora64(x: torch.Tensor, m: LoRALinear) -> torch.Tensor:
    """The bias and LoRA term in float64, from bf16-rounded operands (as the kernel uses them)."""
    x64 = x.double()
    A, B = (t.to(torch.bfloat16).double() for t in (m.lora_A.weight, m.lora_B.weight))
    out = (x64 @ A.t()) @ B.t() * m.scaling
    bias = m.base_layer.bias
    return out if bias is None else out + bias.double()


def fp8_linear(n_in: int, n_out: int, bias: bool = False) -> LoRALinear:
    """A LoRALinear over an NF4 base: the fused functions run its forward product in e4m3 when given fp8=True."""
    return adapted(base_linear(n_in, n_out, "nf4", torch.bfloat16, bias=bias))


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_lora_linear_fp8_forward_is_the_e4m3_product_plus_the_lora_term_and_its_backward_is_unchanged(bias):
    torch.manual_seed(seed("fp8 linear", bias))
    m = fp8_linear(96, 160, bias)
    x = torch.randn(2, 19, 96, device=device()).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(2, 19, 160, device=device()).to(torch.bfloat16)
    with torch.autocast(device().type, dtype=torch.bfloat16):
        assert _plan(x.dtype, device().type, m.base_layer, m.lora_A.weight, True).fp8
        assert not _plan(x.dtype, device().type, m.base_layer, m.lora_A.weight, False).fp8
        y = lora_linear(x, m.base_layer, m.lora_A.weight, m.lora_B.weight, m.scaling, fp8=True)
    want = fp8_reference(x.detach(), m) + lora64(x.detach(), m)
    assert y.dtype == torch.bfloat16 and relative_error(y, want) < BF16_BOUND
    grads = torch.autograd.grad(y, [x, m.lora_A.weight, m.lora_B.weight], dy)
    # the bf16 path: its backward is the same computation
    with torch.autocast(device().type, dtype=torch.bfloat16):
        y16 = lora_linear(x, m.base_layer, m.lora_A.weight, m.lora_B.weight, m.scaling)
    for got, ref in zip(grads, torch.autograd.grad(y16, [x, m.lora_A.weight, m.lora_B.weight], dy), strict=True):
        assert torch.equal(got, ref)
    # and FP8 is measurably less exact than the bf16 product (else the test above could not tell them apart)
    assert relative_error(y, y16) > 2 * BF16_BOUND


def test_lora_projections_fp8_quantize_x_once_and_match_each_e4m3_product():
    torch.manual_seed(seed("fp8 projections"))
    mods = [fp8_linear(96, n, bias=True) for n in (160, 48, 48)]
    x = torch.randn(37, 96, device=device()).to(torch.bfloat16)
    import trainer.kernels.lora_projection as lf  # where lora_projections looks quantize_rows up

    calls = []
    original = lf.quantize_rows

    def counting(t):
        calls.append(t.shape)
        return original(t)

    lf.quantize_rows = counting
    try:
        with torch.autocast(device().type, dtype=torch.bfloat16):
            ys = lora_projections(x, tuple(mods), fp8=True)
    finally:
        lf.quantize_rows = original
    assert calls == [(37, 96)]
    for y, m in zip(ys, mods, strict=True):
        assert relative_error(y, fp8_reference(x, m) + lora64(x, m)) < BF16_BOUND


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep"])
def test_lora_mlp_fp8_stays_near_the_bf16_path(recompute):
    torch.manual_seed(seed("fp8 mlp", recompute))
    # rows a multiple of the blocksize: bitsandbytes' AVX512 CPU kernel (the plain path here) misreads other
    # rows (kernel_checks.dequantized_4bit)
    gate, up, down = mlp_modules("nf4", torch.bfloat16, False, True, hidden=128, inter=192, r=8)
    x = torch.randn(2, 13, 128, device=device()).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(2, 13, 128, device=device()).to(torch.bfloat16)
    params = [x] + [p for m in (gate, up, down) for p in (m.lora_A.weight, m.lora_B.weight)]

    def run(fp8: bool):
        with torch.autocast(device().type, dtype=torch.bfloat16):
            y = lora_mlp(x, gate, up, down, "silu", recompute=recompute, fp8=fp8)
        return [y, *torch.autograd.grad(y, params, dy)]

    with_fp8, bf16 = run(True), run(False)
    with torch.autocast(device().type, dtype=torch.bfloat16):
        plain = plain_mlp(x, gate, up, down, "silu")
    assert relative_error(bf16[0], plain) < BF16_BOUND
    # FP8's own error (about 4% per product on random operands), not a wrong scale (which is off by far more)
    for name, got, ref in zip(["y", "dx", "gate.A", "gate.B", "up.A", "up.B", "down.A", "down.B"], with_fp8, bf16,
                              strict=True):
        err = relative_error(got, ref)
        assert 0 < err < 0.1, (name, err)


def test_fp8_runs_only_over_nf4_bases_and_needs_4bit_and_no_dropout():
    def adapted_layers(kind: str, fp8: bool) -> torch.nn.Module:
        model = torch.nn.Sequential(base_linear(32, 32, kind, torch.bfloat16), base_linear(32, 16, kind, torch.bfloat16))
        model.requires_grad_(False)
        apply_lora(model, LoRASettings(r=4, alpha=8, target_modules=["0", "1"]), ModelOptions(fp8=fp8))
        return model

    assert fp8_layers(adapted_layers("linear", True)) == 0 and fp8_layers(adapted_layers("nf4", True)) == 2
    assert fp8_layers(adapted_layers("nf4", False)) == 0
    assert "fp8=True" in repr(adapted_layers("nf4", True)[0])
    with pytest.raises(ConfigError, match="load_in_4bit"):
        resolve_config(model="m", data="d", out="o", fp8=True, load_in_4bit=False)
    with pytest.raises(ConfigError, match="lora_dropout"):
        resolve_config(model="m", data="d", out="o", fp8=True, lora_dropout=0.1)



@pytest.mark.parametrize("checkpointing", ["off", "on", "offload"])
def test_a_decoder_with_fp8_products_trains_like_the_bf16_one(tmp_path, monkeypatch, checkpointing):
    """The tiny Llama in NF4 under bf16 autocast, every projection on its fused path: built with fp8, every
    forward product (q/k/v, o, gate/up, down; recomputed ones too) is an e4m3 one, and loss and LoRA gradients
    stay within FP8's error of the model built without it."""
    import builders
    from test_lora_fused import decoder_loss_and_grads

    import trainer.kernels.lora_projection as lf  # where every projection's forward looks fp8_weight up

    builders.save_tiny_model(tmp_path / "m", "llama", 128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    products = []
    original = lf.fp8_weight
    monkeypatch.setattr(lf, "fp8_weight", lambda base: products.append(base) or original(base))

    def step(fp8: bool):
        loss, grads, _ = decoder_loss_and_grads(tmp_path / "m", fused=True, checkpointing=checkpointing,
                                                load_in_4bit=True, autocast=torch.bfloat16, dtype=torch.bfloat16,
                                                fp8=fp8)
        return loss, grads

    loss16, grads16 = step(False)
    assert products == []
    loss8, grads8 = step(True)
    # forward: 7 per layer (down included: the forward returns the MLP's output); a recomputed layer's gate and up
    # again with its q, k, v and o (its down product is skipped), and without checkpointing the MLP's backward
    # recomputes gate and up
    per_layer = {"off": 7 + 2, "on": 7 + 6, "offload": 7 + 6}[checkpointing]
    assert len(products) == 2 * per_layer, len(products)
    # measured on CPU: loss 1.5e-4 apart, gradients 5.1% on average (8.5% at most) where bf16 against float32
    # is about 1% (test_lora_fused): FP8's cost, stated in --fp8's help
    assert relative_error(loss8, loss16) < 2e-3, (loss8, loss16)
    errs = {n: relative_error(grads8[n], grads16[n]) for n in grads16}
    assert max(errs.values()) < 0.15 and 0 < sum(errs.values()) / len(errs) < 0.08, errs


@pytest.mark.gpu
@pytest.mark.parametrize("n_in,n_out", [(4096, 14336), (14336, 4096), (4096, 1024)], ids=str)
def test_lora_linear_fp8_full_size(n_in, n_out):
    """Llama-3-8B sizes at 2 x 2048 tokens on the GPU: cuBLAS's row-scaled e4m3 product with the hardware casts,
    against float64 products of the same operands."""
    torch.manual_seed(n_in + n_out)
    m = fp8_linear(n_in, n_out)
    x = torch.randn(2, 2048, n_in, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = lora_linear(x, m.base_layer, m.lora_A.weight, m.lora_B.weight, m.scaling, fp8=True)
    assert relative_error(y, fp8_reference(x, m) + lora64(x, m)) < BF16_BOUND
