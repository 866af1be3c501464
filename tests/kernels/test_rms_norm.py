
import pytest
import torch
from kernel_checks import (
    DTYPES,
    assert_close,
    device,
    kernels_on,
    loss_and_trainable_grads,
    seed,
    tiny_decoder,
)

from trainer.kernels.rms_norm import add_rms_norm, rms_norm
from trainer.models import ops


def _check(shape: tuple[int, ...], dtype: torch.dtype, offset: float, eps: float = 1e-6,
           weight_dtype: torch.dtype | None = None, transpose_input: bool = False) -> None:
    dev = device()
    hidden = shape[-1]
    x = torch.randn(shape, device=dev) * 3 + 0.5
    if transpose_input:  # same values, rows no longer contiguous
        x = x.transpose(0, -2).contiguous().transpose(0, -2)
    x = x.to(dtype).requires_grad_()
    w = (torch.randn(hidden, device=dev) * 0.5 + (0.0 if offset else 1.0)).to(weight_dtype or dtype).requires_grad_()
    dy = torch.randn(shape, device=dev).to(dtype)

    y = rms_norm(x, w, eps, offset)
    dx, dw = torch.autograd.grad(y, (x, w), dy)

    # Reference: ops.rms_norm on float32 copies (it computes in float32 for every input dtype).
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = ops.rms_norm(xr, wr, eps, offset)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.float())

    assert y.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == w.dtype
    assert_close(y, yr, dtype, "y")
    assert_close(dx, dxr, dtype, "dx")
    # dw sums over every row: float32 accumulation order adds ~sqrt(rows) ulps of float32.
    assert_close(dw, dwr, w.dtype, "dw", rtol=None if w.dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 64), (13, 96), (3, 5, 100)], ids=str)
def test_rms_norm_matches_reference_forward_and_backward(shape, dtype):
    torch.manual_seed(seed(shape, str(dtype)))
    _check(shape, dtype, offset=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemma_offset_norm_scales_by_one_plus_weight(dtype):
    torch.manual_seed(1)
    _check((3, 11, 96), dtype, offset=1.0, eps=1e-6)


def test_rms_norm_accepts_strided_rows_and_float32_weight():
    torch.manual_seed(2)
    _check((5, 6, 100), torch.bfloat16, offset=0.0, eps=1e-5, weight_dtype=torch.float32, transpose_input=True)


def test_rms_norm_without_weight_grad_gives_input_grad():
    torch.manual_seed(3)
    dev = device()
    x = torch.randn(4, 64, device=dev, requires_grad=True)
    w = torch.randn(64, device=dev)
    (dx,) = torch.autograd.grad(rms_norm(x, w, 1e-6).square().sum(), (x,))
    xr = x.detach().clone().requires_grad_()
    (dxr,) = torch.autograd.grad(ops.rms_norm(xr, w, 1e-6).square().sum(), (xr,))
    assert_close(dx, dxr, torch.float32, "dx")


def _add_norm_reference(s: torch.Tensor, w: torch.Tensor, ds: torch.Tensor | None, dy: torch.Tensor | None,
                       eps: float, offset: float):
    """The norm of the rounded sum s and every gradient in float64: ds_total = ds + (d norm / d s)^T dy
    (the gradient of both x and r), and dw."""
    s64, w64 = s.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + eps) * (offset + w64)
    dnorm, dw = torch.autograd.grad(y64, (s64, w64), dy.double()) if dy is not None else (0.0, None)
    return y64, (ds.double() if ds is not None else 0.0) + dnorm, dw


def _check_add(shape: tuple[int, ...], x_dtype: torch.dtype, offset: float, *,
               r_dtype: torch.dtype | None = None, w_dtype: torch.dtype | None = None, eps: float = 1e-6,
               grads: str = "both", transpose_input: bool = False) -> None:
    dev = device()
    r_dtype, w_dtype = r_dtype or x_dtype, w_dtype or x_dtype
    # A residual stream of large norm plus an update of unit size, as in a decoder layer.
    x = torch.randn(shape, device=dev) * 4 + 0.5
    if transpose_input:  # same values, rows no longer contiguous
        x = x.transpose(0, -2).contiguous().transpose(0, -2)
    x = x.to(x_dtype).requires_grad_()
    r = torch.randn(shape, device=dev).to(r_dtype).requires_grad_()
    w = (torch.randn(shape[-1], device=dev) * 0.5 + (0.0 if offset else 1.0)).to(w_dtype).requires_grad_()
    s_dtype = torch.promote_types(x_dtype, r_dtype)
    ds = torch.randn(shape, device=dev).to(s_dtype) if grads in ("both", "s") else None
    dy = torch.randn(shape, device=dev).to(s_dtype) if grads in ("both", "y") else None

    s, y = add_rms_norm(x, r, w, eps, offset)
    outs, gouts = zip(*[(o, g) for o, g in ((s, ds), (y, dy)) if g is not None])
    dx, dr, dw = torch.autograd.grad(outs, (x, r, w), gouts, allow_unused=True)

    assert s.dtype == y.dtype == s_dtype and dx.dtype == x_dtype and dr.dtype == r_dtype
    # s is the sum rounded once to its dtype; compiled, it is torch's x + r bit for bit (the interpreter
    # truncates float32 -> bfloat16 instead of rounding to nearest, so there it may be one ulp lower).
    assert_close(s, x.double() + r.double(), s_dtype, "s")
    if dev.type == "cuda":
        assert torch.equal(s, x + r)
    # The norm is that of the rounded s (as for the plain add followed by the plain norm).
    y_ref, dsum_ref, dw_ref = _add_norm_reference(s, w, ds, dy, eps, offset)
    assert_close(y, y_ref, s_dtype, "y")
    assert_close(dx, dsum_ref, x_dtype, "dx")
    assert_close(dr, dsum_ref, r_dtype, "dr")
    if dy is None:
        assert dw is None
    else:
        assert dw.dtype == w_dtype
        assert_close(dw, dw_ref, w_dtype, "dw", rtol=None if w_dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 96), (13, 96), (3, 5, 100)], ids=str)
def test_add_rms_norm_matches_float64_forward_and_backward(shape, dtype):
    torch.manual_seed(seed(shape, str(dtype), "add"))
    _check_add(shape, dtype, offset=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemma_add_rms_norm_scales_by_one_plus_weight(dtype):
    torch.manual_seed(11)
    _check_add((3, 11, 96), dtype, offset=1.0)


def test_add_rms_norm_with_float32_residual_and_bfloat16_update_returns_float32():
    """Under autocast the attention output is bf16 while the residual stream stays float32."""
    torch.manual_seed(12)
    _check_add((2, 9, 96), torch.float32, offset=0.0, r_dtype=torch.bfloat16, w_dtype=torch.float32,
               transpose_input=True)


@pytest.mark.parametrize("grads", ["s", "y"])
def test_add_rms_norm_backward_with_only_one_output_used(grads):
    torch.manual_seed(13)
    _check_add((4, 5, 96), torch.bfloat16, offset=0.0, grads=grads)


DECODER_CASES = {"llama": {}, "gemma": {}, "gemma2": {"sliding_window": 8}, "qwen3": {},
                 "gemma3_text": {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}}


@pytest.mark.parametrize("family", DECODER_CASES)
def test_decoder_loss_and_lora_grads_with_kernels_equal_the_plain_path(tmp_path, family):
    """The whole decoder (fused add + norm, RoPE, the LoRA-fused projections and the other kernels) against
    the same model built with kernels off, LoRA on every linear; Qwen3's and Gemma 3's per-head q/k norms run
    the RMSNorm kernel."""
    ref_loss, ref_grads = loss_and_trainable_grads(tiny_decoder(tmp_path / "plain", family, **DECODER_CASES[family]))
    model = tiny_decoder(tmp_path / "kernels", family, options=kernels_on(), **DECODER_CASES[family])
    assert "kernels='off'" not in repr(model) and repr(kernels_on()) in repr(model)
    mlp_inputs, k_norms = [], []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda m, args: mlp_inputs.append(args[0]))
    if model.spec.qk_norm:
        model.model.layers[0].self_attn.k_norm.register_forward_hook(lambda m, args, out: k_norms.append(out))
    loss, grads = loss_and_trainable_grads(model)
    assert type(mlp_inputs[0].grad_fn).__name__ == "AddRMSNormFunctionBackward", "fused add + norm unused"
    if model.spec.qk_norm:
        assert type(k_norms[0].grad_fn).__name__ == "RMSNormFunctionBackward", "q/k norm kernel unused"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2  # A, B x 7 linears x 2 layers
    for name, g in grads.items():
        # float32 throughout: only summation order and fused roundings differ
        assert_close(g, ref_grads[name], torch.float32, name, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [4096, 3072], ids=str)
def test_rms_norm_full_size_matches_reference(hidden, dtype):
    torch.manual_seed(hidden)
    _check((2, 2047, hidden), dtype, offset=0.0)
    _check((1, 4099, hidden), dtype, offset=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [4096, 3072], ids=str)
def test_add_rms_norm_full_size_matches_float64(hidden, dtype):
    torch.manual_seed(hidden + 1)
    _check_add((2, 2047, hidden), dtype, offset=0.0)
    _check_add((1, 4099, hidden), dtype, offset=1.0)
