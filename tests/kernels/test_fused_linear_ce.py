
import pytest
import torch
from kernel_checks import DTYPES, device, relative_error, seed, store_rounding_ulps

from trainer.kernels.fused_linear_ce import fused_linear_cross_entropy
from trainer.models import ops

# The interpreter's numpy overflows exp() in saturated tails on purpose (exp -> inf -> 1 - 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _inputs(batch: int, seq: int, hidden: int, vocab: int, dtype: torch.dtype, *, logit_scale: float = 1.0,
            ignored: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dev = device()
    h = torch.randn(batch, seq, hidden, device=dev).to(dtype).requires_grad_()
    # Logits of spread ~ logit_scale: rows of h @ W.T with unit h and W rows of norm logit_scale.
    w = (torch.randn(vocab, hidden, device=dev) * logit_scale / hidden**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), device=dev)
    labels[torch.rand(batch, seq, device=dev) < ignored] = ops.IGNORE_INDEX
    return h, w, ops.shift_targets(labels)


def _plain_path(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, **kw):
    """lm_head in the model dtype, then ops.causal_lm_loss: the decoder's plain path."""
    hr, wr = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = ops.causal_lm_loss(hr @ wr.t(), targets, **kw)
    return (loss, *torch.autograd.grad(loss, (hr, wr)))


def _float64_truth(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, softcap: float | None = None,
                   num_items_in_batch: int | torch.Tensor | None = None, rows_per_chunk: int = 512):
    """The same loss with every step in float64 (ops.causal_lm_loss itself computes in float32).

    Chunked over tokens only to bound memory at full size (float64 logits of 4096 x 256000 are 8 GB).
    """
    h2, t1 = h.detach().reshape(-1, h.shape[-1]).double(), targets.reshape(-1)
    w64 = w.detach().double().requires_grad_()
    n = num_items_in_batch if num_items_in_batch is not None else (t1 != ops.IGNORE_INDEX).sum().clamp(min=1)
    loss, dh, dw = torch.zeros((), dtype=torch.float64, device=h.device), torch.empty_like(h2), torch.zeros_like(w64)
    for start in range(0, h2.shape[0], rows_per_chunk):
        hc = h2[start:start + rows_per_chunk].requires_grad_()
        z = hc @ w64.t()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        part = torch.nn.functional.cross_entropy(z, t1[start:start + rows_per_chunk], reduction="sum",
                                                 ignore_index=ops.IGNORE_INDEX) / n
        dhc, dwc = torch.autograd.grad(part, (hc, w64))
        loss, dh[start:start + rows_per_chunk], dw = loss + part.detach(), dhc, dw + dwc
    return loss, dh.view(h.shape), dw


def _error_ratio(dtype: torch.dtype) -> float:
    """How much further from float64 than the plain path a fused gradient may be (see _check)."""
    # The two paths differ in how each element of dloss/dlogits is rounded to the model dtype (the kernel's
    # store; autograd's cast back from float32 on the plain path) and in float32 summation order. With both
    # rounding to nearest the fused gradient's error equals the plain path's give or take half (the rounding
    # of individual terms falls differently; interpreted fp16, which rounds to nearest: at most 1.0x over 30
    # seeds per case). A kernel store whose rounding error can be twice torch's (the interpreter truncates to
    # bfloat16: up to 1 ulp against 1/2) adds up to twice the error: measured up to 1.7x the plain path's
    # over 150 seeds per case.
    return 1.5 * store_rounding_ulps(dtype) / 0.5


def _check(h, w, targets, dtype, chunk_size=None, **kw) -> None:
    loss = fused_linear_cross_entropy(h, w, targets, chunk_size=chunk_size, **kw)
    dh, dw = torch.autograd.grad(loss, (h, w))
    loss_plain, dh_plain, dw_plain = _plain_path(h, w, targets, **kw)
    _, dh64, dw64 = _float64_truth(h, w, targets, **kw)
    assert loss.dtype == torch.float32 and dh.dtype == dw.dtype == dtype
    # Same logits, float32 statistics on both sides: only summation order differs.
    assert torch.allclose(loss, loss_plain, rtol=1e-5, atol=1e-6), (loss.item(), loss_plain.item())
    # Gradients are sums over V (dh) or tokens (dW) of terms rounded to the model dtype, so they are
    # judged as whole tensors against float64: no further from it than the plain path is, by the ratio
    # that the two paths' roundings allow (_error_ratio), plus float32 noise.
    for name, got, plain, exact in (("dh", dh, dh_plain, dh64), ("dw", dw, dw_plain, dw64)):
        err, err_plain = relative_error(got, exact), relative_error(plain, exact)
        assert err <= _error_ratio(dtype) * err_plain + 1e-6, (name, err, err_plain)
        assert torch.isfinite(got).all(), name


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["nocap", "cap30"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [(2, 19, 64, 1000, 8), (1, 23, 96, 3001, None)],
                         ids=["v1000-chunks", "v3001-onechunk"])
def test_fused_loss_and_grads_match_lm_head_plus_causal_lm_loss(dims, dtype, softcap):
    torch.manual_seed(seed(dims, str(dtype), softcap))
    batch, seq, hidden, vocab, chunk = dims
    h, w, targets = _inputs(batch, seq, hidden, vocab, dtype, logit_scale=4.0)
    _check(h, w, targets, dtype, chunk_size=chunk, softcap=softcap)


def test_vocab_spanning_several_blocks_with_saturating_softcap():
    """V = 5000 > one 4096-wide block; logits of spread ~60 push Gemma 2's 30 tanh(x / 30) into its tails."""
    torch.manual_seed(8)
    h, w, targets = _inputs(1, 9, 64, 5000, torch.float32, logit_scale=60.0)
    _check(h, w, targets, torch.float32, softcap=30.0)
    _check(h, w, targets, torch.float32)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_num_items_in_batch_divides_the_summed_loss(as_tensor):
    torch.manual_seed(9)
    h, w, targets = _inputs(2, 11, 64, 1000, torch.bfloat16)
    n = torch.tensor(37, device=h.device) if as_tensor else 37
    _check(h, w, targets, torch.bfloat16, chunk_size=4, num_items_in_batch=n)


def test_all_targets_ignored_gives_zero_loss_and_zero_grads():
    torch.manual_seed(10)
    h, w, targets = _inputs(2, 5, 64, 1000, torch.float32)
    targets = torch.full_like(targets, ops.IGNORE_INDEX)
    loss = fused_linear_cross_entropy(h, w, targets)
    dh, dw = torch.autograd.grad(loss, (h, w))
    assert loss.item() == 0.0 and not dh.any() and not dw.any()
    assert ops.causal_lm_loss(h @ w.t(), targets).item() == 0.0


@pytest.mark.parametrize("softcap", [None, 8.0], ids=["plain", "softcap"])
def test_row_kernel_gives_ignored_targets_no_loss_and_no_gradient(softcap):
    """Under CUDA graph capture every row reaches the kernel (no nonzero() to drop ignored ones)."""
    from trainer.kernels.fused_linear_ce import _ce_chunk

    torch.manual_seed(14)
    dev = device()
    logits = (torch.randn(7, 1000, device=dev) * 3).float()
    targets = torch.randint(0, 1000, (7,), device=dev)
    targets[[0, 3, 4]] = ops.IGNORE_INDEX
    counted = targets != ops.IGNORE_INDEX
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z.requires_grad_()
    ref = torch.nn.functional.cross_entropy(z, targets, ignore_index=ops.IGNORE_INDEX, reduction="none")
    (dz,) = torch.autograd.grad(ref.sum() / 5, z)
    dx = dz * (1 - torch.tanh(logits.double() / softcap) ** 2) if softcap is not None else dz
    loss = torch.full((7,), float("nan"), device=dev)
    buf = logits.clone()
    _ce_chunk(buf, targets, loss, torch.tensor([1 / 5], device=dev), softcap, write_grad=True)
    assert torch.equal(loss[~counted].cpu(), torch.zeros(3)) and not buf[~counted].any()
    torch.testing.assert_close(loss[counted].double(), ref[counted], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buf[counted].double(), dx[counted], rtol=1e-4, atol=1e-7)


def test_target_outside_the_vocabulary_is_refused():
    torch.manual_seed(13)
    h, w, targets = _inputs(1, 6, 64, 1000, torch.float32)
    targets[0, 2] = 1000
    with pytest.raises(AssertionError, match="outside"):
        fused_linear_cross_entropy(h, w, targets)


def test_frozen_head_and_no_grad_paths_give_the_same_loss():
    """QLoRA freezes lm_head: only the hidden-state gradient is computed; evaluation computes none."""
    torch.manual_seed(11)
    h, w, targets = _inputs(2, 13, 64, 1000, torch.bfloat16)
    w = w.detach()
    loss = fused_linear_cross_entropy(h, w, targets, chunk_size=8)
    (dh,) = torch.autograd.grad(2.5 * loss, (h,))
    loss_ref, dh_plain, _ = _plain_path(h, w, targets)
    _, dh64, _ = _float64_truth(h, w, targets)
    assert torch.allclose(loss, loss_ref, rtol=1e-5)
    # The backward scales the precomputed bf16 gradient by grad_output (2.5 here): one more rounding
    # (torch's, to nearest), at most 2**-8 relative.
    assert relative_error(dh, 2.5 * dh64) <= _error_ratio(torch.bfloat16) * relative_error(dh_plain, dh64) + 2.0**-8
    with torch.no_grad():
        assert torch.allclose(fused_linear_cross_entropy(h, w, targets), loss_ref, rtol=1e-5)


def test_fused_loss_agrees_with_float64_math():
    """Against the softmax cross-entropy computed in float64 from float64 logits (fp32 inputs)."""
    torch.manual_seed(12)
    h, w, targets = _inputs(1, 17, 64, 1000, torch.float32, logit_scale=20.0)
    loss = fused_linear_cross_entropy(h, w, targets, softcap=30.0)
    z = 30.0 * torch.tanh(h.detach().double() @ w.detach().double().t() / 30.0)
    keep = targets != ops.IGNORE_INDEX
    nll = torch.logsumexp(z, dim=-1) - z.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = nll[keep].sum() / keep.sum()
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [(2, 2048, 4096, 128256), (2, 2047, 4096, 32000), (1, 4099, 3072, 256000)],
                         ids=["llama3-8b", "mistral-7b-odd-seq", "gemma-7b"])
def test_fused_linear_cross_entropy_full_size(dims):
    torch.manual_seed(dims[-1])
    batch, seq, hidden, vocab = dims
    h, w, targets = _inputs(batch, seq, hidden, vocab, torch.bfloat16, logit_scale=8.0)
    softcap = 30.0 if vocab == 256000 else None
    _check(h, w, targets, torch.bfloat16, softcap=softcap)
