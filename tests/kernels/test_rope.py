import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CI runs the kernels on CPU

import pytest  # noqa: E402
from kernel_checks import DTYPES, assert_close, device  # noqa: E402

from trainer.kernels.rope import apply_rope  # noqa: E402
from trainer.models import ops  # noqa: E402


def _tables(batch: int, seq: int, rotated: int, *, theta: float = 10000.0, scaling: float = 1.0,
            packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    dev = device()
    inv_freq = 1.0 / theta ** (torch.arange(0, rotated, 2, dtype=torch.float32, device=dev) / rotated)
    if packed:  # documents restarting mid-row, positions far from 0 (rows of a long packed batch)
        positions = torch.stack([torch.randint(0, 50_000, (1,), device=dev) + torch.arange(seq, device=dev) % 5
                                 for _ in range(batch)])
    else:
        positions = torch.arange(seq, device=dev).expand(batch, seq)
    return ops.rope_tables(positions, inv_freq, scaling)


def _qk(batch: int, heads: int, kv_heads: int, seq: int, head_dim: int, dtype: torch.dtype,
        decoder_layout: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dev = device()
    if decoder_layout:  # the decoder's q: a [B, T, H, D] projection output viewed as [B, H, T, D]
        q = torch.randn(batch, seq, heads, head_dim, device=dev).to(dtype).transpose(1, 2)
        k = torch.randn(batch, seq, kv_heads, head_dim, device=dev).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(batch, heads, seq, head_dim, device=dev).to(dtype)
        k = torch.randn(batch, kv_heads, seq, head_dim, device=dev).to(dtype)
    return q.requires_grad_(), k.requires_grad_()


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> None:
    dq_out, dk_out = torch.randn(q.shape, device=q.device).to(dtype), torch.randn(k.shape, device=q.device).to(dtype)
    q_rot, k_rot = apply_rope(q, k, cos, sin)
    dq, dk = torch.autograd.grad((q_rot, k_rot), (q, k), (dq_out, dk_out))

    # Reference: ops.apply_rope on float32 copies (it rotates in float32 for every input dtype).
    qr, kr = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    q_ref, k_ref = ops.apply_rope(qr, kr, cos, sin)
    dq_ref, dk_ref = torch.autograd.grad((q_ref, k_ref), (qr, kr), (dq_out.float(), dk_out.float()))

    assert q_rot.dtype == k_rot.dtype == dq.dtype == dk.dtype == dtype
    for name, got, want in (("q", q_rot, q_ref), ("k", k_rot, k_ref), ("dq", dq, dq_ref), ("dk", dk, dk_ref)):
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decoder_layout", [True, False], ids=["bthd", "bhtd"])
@pytest.mark.parametrize("dims", [(2, 4, 2, 7, 64), (1, 3, 1, 13, 96), (2, 2, 2, 5, 100)],
                         ids=lambda d: "b{}h{}kv{}t{}d{}".format(*d))
def test_rope_matches_reference_forward_and_backward(dims, decoder_layout, dtype):
    torch.manual_seed(hash((dims, decoder_layout, str(dtype))) % 2**31)
    batch, heads, kv_heads, seq, head_dim = dims
    q, k = _qk(batch, heads, kv_heads, seq, head_dim, dtype, decoder_layout)
    cos, sin = _tables(batch, seq, head_dim)
    _check(q, k, cos, sin, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_partial_rotary_rotates_leading_dims_and_copies_the_rest(dtype):
    """Phi-4-mini style: 3/4 of each head rotated; the remaining dims pass through unchanged."""
    torch.manual_seed(5)
    q, k = _qk(2, 4, 2, 9, 64, dtype, decoder_layout=True)
    cos, sin = _tables(2, 9, 48)
    _check(q, k, cos, sin, dtype)


def test_rope_with_scaled_tables_and_packed_positions():
    """LongRoPE's attention factor scales cos/sin; packed rows restart positions mid-sequence."""
    torch.manual_seed(6)
    q, k = _qk(3, 4, 1, 10, 64, torch.bfloat16, decoder_layout=True)
    cos, sin = _tables(3, 10, 64, theta=500000.0, scaling=1.19, packed=True)
    _check(q, k, cos, sin, torch.bfloat16)


def test_rope_broadcasts_a_batch_one_table():
    torch.manual_seed(7)
    q, k = _qk(3, 2, 2, 6, 64, torch.float32, decoder_layout=False)
    cos, sin = _tables(1, 6, 64)
    _check(q, k, cos, sin, torch.float32)


def test_rope_follows_the_reference_for_any_tables():
    """Random cos/sin whose two halves differ: pins down which half of the table pairs with which."""
    torch.manual_seed(8)
    q, k = _qk(2, 2, 1, 5, 64, torch.float32, decoder_layout=True)
    cos, sin = torch.randn(2, 5, 64, device=q.device), torch.randn(2, 5, 64, device=q.device)
    _check(q, k, cos, sin, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [(2, 32, 8, 2047, 128), (2, 16, 16, 2047, 256), (1, 24, 8, 4099, 128)],
                         ids=["llama3-8b", "gemma-7b", "odd-seq"])
def test_rope_full_size(dims, dtype):
    torch.manual_seed(dims[1])
    batch, heads, kv_heads, seq, head_dim = dims
    q, k = _qk(batch, heads, kv_heads, seq, head_dim, dtype, decoder_layout=True)
    cos, sin = _tables(batch, seq, head_dim, theta=500000.0, packed=True)
    _check(q, k, cos, sin, dtype)
