"""Shared tolerances and input helpers for the kernel tests.

Tolerances: a kernel computes in float32 and rounds each output once, so against a float32 (or
float64) reference an output may differ by one unit in the last place of its own dtype: relative
2**-7 for bf16 (8 significant bits), 2**-10 for fp16 (11 bits). float32 outputs carry only
accumulation-order error (~1e-6 relative over a few thousand terms), hence 1e-5. The absolute floor
(1% of that, relative to the largest reference value) covers values that cancel to near zero and
fp16 subnormals.

Under TRITON_INTERPRET=1 a kernel's float32 -> bfloat16 store truncates toward zero (numpy has no bfloat16;
fp16 stores round to nearest): the error is then below one ulp instead of half, at most 2**-7 / (1 + 2**-7)
relative, so bf16 outputs reach ~0.97 of RTOL there (measured over 40 seeds per case) while staying inside
it by construction. Tests that compare a kernel's rounding with torch's use store_rounding_ulps.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch

from trainer.options import ModelOptions

RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def seed(*parts: object) -> int:
    """A seed fixed by the test's parameters (hash() of a str changes from one process to the next)."""
    return zlib.crc32(repr(parts).encode())


def store_rounding_ulps(dtype: torch.dtype) -> float:
    """Largest error of a kernel's float32 -> dtype store, in units in the last place of dtype: 1/2 (round to
    nearest, as torch's casts) on a GPU, 1 for bfloat16 under the interpreter (it truncates)."""
    return 1.0 if dtype == torch.bfloat16 and device().type == "cpu" else 0.5


def device() -> torch.device:
    """The GPU when there is one, else the CPU (kernels then run under TRITON_INTERPRET=1)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    assert os.environ.get("TRITON_INTERPRET") == "1", "no GPU: tests/conftest.py sets TRITON_INTERPRET"
    return torch.device("cpu")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 rtol: float | None = None) -> None:
    """Elementwise |actual - expected| <= rtol |expected| + rtol/100 max|expected|; NaN never passes."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    rtol = RTOL[dtype] if rtol is None else rtol
    bound = rtol * e.abs() + rtol * 1e-2 * e.abs().max()
    excess = (a - e).abs() - bound
    worst = int(excess.flatten().argmax())
    assert excess.max() <= 0, (f"{what}: {a.flatten()[worst].item()} vs {e.flatten()[worst].item()} "
                               f"(max abs err {(a - e).abs().max().item():.3g}, rtol {rtol:.3g})")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp(min=1e-300)).item()


def kernels_on(**options) -> ModelOptions:
    """Options that run the kernels on device() (under Triton's interpreter on the CPU), with `options` set."""
    return ModelOptions(kernels="auto" if torch.cuda.is_available() else "interpret", **options)


def kernels_off(**options) -> ModelOptions:
    """Options that run the plain PyTorch paths on every device, with `options` set."""
    return ModelOptions(kernels="off", **options)


def tiny_decoder(out: Path, family: str, *, lora_dropout: float = 0.0, options: ModelOptions | None = None,
                 **config_overrides):
    """A tiny `family` CausalLM (hidden 64, 2 layers, vocab 128) in float32 on device() with LoRA (r=4) on
    every linear, built with `options` (default: kernels_off()). The weights depend on nothing else: two calls
    give the same model. builders.save_tiny_model writes the checkpoint; builders.spread_weights then spreads our
    model's parameters after torch.manual_seed(0) so that every switch shows. (save_tiny_model(spread=True)
    would draw in transformers' parameter order, i.e. other values: Qwen3's float32 tolerance in
    test_rms_norm.py's decoder test fails for some draws, that one among them.)"""
    import builders

    from trainer.lora import LoRASettings, apply_lora, lora_modules
    from trainer.models import load_model

    builders.save_tiny_model(out, family, 128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                             **config_overrides)
    model = load_model(out, dtype=torch.float32, device=device(), load_in_4bit=False, options=options or kernels_off())
    torch.manual_seed(0)
    builders.spread_weights(model, norm_offset=family.startswith("gemma"))
    apply_lora(model, LoRASettings(r=4, alpha=8, dropout=lora_dropout))
    with torch.no_grad():  # a fresh adapter has B = 0, which would hide A's gradients
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.3)
    return model.train()


def loss_and_trainable_grads(model: torch.nn.Module,
                             data_seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward on a packed batch (2 x 19, the second row holding two documents)."""
    g = torch.Generator().manual_seed(data_seed)
    ids = torch.randint(3, 128, (2, 19), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    pos = torch.stack([torch.arange(19), torch.cat([torch.arange(11), torch.arange(8)])])
    ids, labels, pos = ids.to(device()), labels.to(device()), pos.to(device())
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # LoRA dropout draws the same masks in every run
    loss = model(ids, labels=labels, position_ids=pos).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def dequantized_4bit(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """bitsandbytes' 4-bit weight decoded from the format's definition, in float32, rounded once to its dtype:
    element i is code[nibble i] * absmax[i // blocksize], two nibbles a byte, high nibble first; a nested absmax
    is itself 8-bit blockwise (dequantize_blockwise + offset).

    The tests' reference instead of bitsandbytes' own CPU kernel: on AVX512 machines bitsandbytes 0.50.2
    decodes with a native kernel that restarts the absmax blocks at every row, wrong whenever a row's length
    is not a multiple of the blocksize (96 x 160 at blocksize 64, for one); on other CPUs it runs PyTorch
    code that is right. On a GPU its CUDA kernel agrees with this bit for bit (tests/kernels/test_nf4.py)."""
    import bitsandbytes.functional as bnbf

    qs = quant_state
    absmax = qs.absmax
    if qs.nested:
        absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    n = 1
    for d in qs.shape:
        n *= d
    packed = weight.reshape(-1).view(torch.uint8)
    nibbles = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()
    values = qs.code.float().to(packed.device)[nibbles] * absmax.float().repeat_interleave(qs.blocksize)[:n]
    return values.view(tuple(qs.shape)).to(qs.dtype)
