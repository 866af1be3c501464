
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

from trainer.kernels.rope import apply_rope
from trainer.models import ops


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


def _projections(batch: int, heads: int, kv_heads: int, seq: int, head_dim: int, dtype: torch.dtype,
                 layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, q_leaf, k_leaf): q [B, T, H * D], k [B, T, KV * D] as the decoder's projections give them, and
    the leaves the gradients reach.

    layout "fresh": the projections' own tensors (rotated in place); "fused": slices of one qkv buffer
    (Phi-3, rotated out of place); "leaf": leaves that require grad (may not be modified in place).
    """
    dev = device()
    widths = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    if layout == "fused":
        qkv = torch.randn(batch, seq, sum(widths), device=dev).to(dtype).requires_grad_()
        q, k, _ = qkv.split(widths, dim=-1)
        return q, k, qkv, qkv
    q_leaf = torch.randn(batch, seq, widths[0], device=dev).to(dtype).requires_grad_()
    k_leaf = torch.randn(batch, seq, widths[1], device=dev).to(dtype).requires_grad_()
    if layout == "leaf":
        return q_leaf, k_leaf, q_leaf, k_leaf
    assert layout == "fresh", layout
    # An op that is not a view gives the projections' kind of tensor: non-leaf, owning its memory.
    return q_leaf * 1, k_leaf * 1, q_leaf, k_leaf


def _check(q: torch.Tensor, k: torch.Tensor, leaves: tuple[torch.Tensor, ...], cos: torch.Tensor,
           sin: torch.Tensor, head_dim: int, dtype: torch.dtype, *, in_place: bool,
           expanded_grads: bool = False) -> None:
    # Reference first: ops.apply_rope on float32 copies (it rotates in float32 for every input dtype).
    qr, kr = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    q_ref, k_ref = ops.apply_rope(qr, kr, cos, sin, head_dim)
    if expanded_grads:  # sum() hands backward an expanded (zero-stride) gradient that may not be overwritten
        dq_out, dk_out = torch.ones((), device=q.device), torch.ones((), device=q.device)
        dq_ref, dk_ref = torch.autograd.grad(q_ref.sum() + k_ref.sum(), (qr, kr))
    else:
        dq_out = torch.randn(q.shape, device=q.device).to(dtype)
        dk_out = torch.randn(k.shape, device=q.device).to(dtype)
        dq_ref, dk_ref = torch.autograd.grad((q_ref, k_ref), (qr, kr), (dq_out.float(), dk_out.float()))
    q_before, k_before = q.detach().clone(), k.detach().clone()

    q_rot, k_rot = apply_rope(q, k, cos, sin, head_dim)

    assert (q_rot.data_ptr() == q.data_ptr() and k_rot.data_ptr() == k.data_ptr()) == in_place
    if not in_place:
        assert torch.equal(q, q_before) and torch.equal(k, k_before), "out of place, yet q or k changed"
    if expanded_grads:
        grads = torch.autograd.grad(q_rot.sum() + k_rot.sum(), leaves)
    else:
        grads = torch.autograd.grad((q_rot, k_rot), leaves, (dq_out, dk_out))
    if len(leaves) == 1:  # q and k are slices of one fused buffer: their gradients are slices of its gradient
        dq, dk = grads[0][..., : q.shape[-1]], grads[0][..., q.shape[-1]: q.shape[-1] + k.shape[-1]]
    else:
        dq, dk = grads
    assert q_rot.dtype == k_rot.dtype == dq.dtype == dk.dtype == dtype
    for name, got, want in (("q", q_rot, q_ref), ("k", k_rot, k_ref), ("dq", dq, dq_ref), ("dk", dk, dk_ref)):
        assert_close(got, want, dtype, name)


def _run(dims: tuple[int, ...], dtype: torch.dtype, layout: str = "fresh", rotated: int | None = None,
         **table_kw) -> None:
    batch, heads, kv_heads, seq, head_dim = dims
    q, k, q_leaf, k_leaf = _projections(batch, heads, kv_heads, seq, head_dim, dtype, layout)
    cos, sin = _tables(batch, seq, rotated or head_dim, **table_kw)
    leaves = (q_leaf,) if layout == "fused" else (q_leaf, k_leaf)
    _check(q, k, leaves, cos, sin, head_dim, dtype, in_place=layout == "fresh")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["fresh", "fused", "leaf"])
@pytest.mark.parametrize("dims", [(2, 4, 2, 7, 64), (1, 3, 1, 13, 96), (2, 2, 2, 5, 100)],
                         ids=lambda d: "b{}h{}kv{}t{}d{}".format(*d))
def test_rope_matches_reference_forward_and_backward(dims, layout, dtype):
    torch.manual_seed(seed(dims, layout, str(dtype)))
    _run(dims, dtype, layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["fresh", "fused"])
def test_partial_rotary_rotates_leading_dims_and_keeps_the_rest(dtype, layout):
    """Phi-4-mini style: 3/4 of each head rotated; the remaining dims pass through unchanged."""
    torch.manual_seed(5)
    _run((2, 4, 2, 9, 64), dtype, layout, rotated=48)


def test_rope_with_scaled_tables_and_packed_positions():
    """LongRoPE's attention factor scales cos/sin; packed rows restart positions mid-sequence."""
    torch.manual_seed(6)
    _run((3, 4, 1, 10, 64), torch.bfloat16, theta=500000.0, scaling=1.19, packed=True)


def test_rope_broadcasts_a_batch_one_table():
    torch.manual_seed(7)
    q, k, q_leaf, k_leaf = _projections(3, 2, 2, 6, 64, torch.float32, "fresh")
    cos, sin = _tables(1, 6, 64)
    _check(q, k, (q_leaf, k_leaf), cos, sin, 64, torch.float32, in_place=True)


def test_rope_follows_the_reference_for_any_tables():
    """Random cos/sin whose two halves differ: pins down which half of the table pairs with which."""
    torch.manual_seed(8)
    q, k, q_leaf, k_leaf = _projections(2, 2, 1, 5, 64, torch.float32, "fresh")
    cos, sin = torch.randn(2, 5, 64, device=q.device), torch.randn(2, 5, 64, device=q.device)
    _check(q, k, (q_leaf, k_leaf), cos, sin, 64, torch.float32, in_place=True)


def test_in_place_backward_leaves_an_expanded_gradient_alone():
    torch.manual_seed(9)
    q, k, q_leaf, k_leaf = _projections(2, 4, 2, 7, 64, torch.bfloat16, "fresh")
    cos, sin = _tables(2, 7, 64)
    _check(q, k, (q_leaf, k_leaf), cos, sin, 64, torch.bfloat16, in_place=True, expanded_grads=True)


def test_in_place_rope_is_refused_by_autograd_when_q_was_saved_before_the_rotation():
    """mark_dirty bumps q's version: a node that saved the unrotated q cannot silently use rotated values."""
    torch.manual_seed(10)
    q, k, q_leaf, _ = _projections(1, 2, 1, 4, 64, torch.float32, "fresh")
    cos, sin = _tables(1, 4, 64)
    squares = q * q  # saves q for its backward
    q_rot, k_rot = apply_rope(q, k, cos, sin, 64)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad((squares.sum() + q_rot.sum()), (q_leaf,))


@pytest.mark.parametrize("lora_dropout", [0.1, 0.0], ids=["plain-lora", "fused-lora"])
@pytest.mark.parametrize("mode", ["on", "offload"])
def test_in_place_rope_trains_with_lora_on_q_and_k_under_checkpointing(tmp_path, monkeypatch, mode, lora_dropout):
    """Through the real decoder: LoRA on q_proj and k_proj, gradient checkpointing on (recompute) and
    offload; loss and LoRA gradients equal the plain path's without checkpointing. (Without checkpointing:
    test_rms_norm.py's decoder test.) With dropout LoRALinear takes its plain path; without, q, k and v run as
    one LoRA-fused Function (trainer/kernels/lora_fused.py, lora_projections), whose outputs must be tensors of
    their own for the rotation to overwrite them."""
    ref_loss, ref_grads = loss_and_trainable_grads(tiny_decoder(tmp_path / "plain", "llama", lora_dropout=lora_dropout))
    model = tiny_decoder(tmp_path / "kernels", "llama", lora_dropout=lora_dropout, options=kernels_on(recompute=mode))
    # (the q projection, a copy taken before the rotation, the node that made it), once more per recompute
    import trainer.models.decoder as decoder

    projections = []
    real_rope = decoder.apply_rope

    def recording_rope(q, k, *args, **kwargs):
        projections.append((q, q.detach().clone(), type(q.grad_fn).__name__))
        return real_rope(q, k, *args, **kwargs)

    monkeypatch.setattr(decoder, "apply_rope", recording_rope)
    loss, grads = loss_and_trainable_grads(model)
    made_by = {node for _, _, node in projections}
    assert ("LoRAProjectionsFunctionBackward" in made_by) == (lora_dropout == 0.0), made_by
    assert projections and not any(torch.equal(out, before) for out, before, _ in projections), "not in place"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert_close(g, ref_grads[name], torch.float32, name, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["fresh", "fused"])
@pytest.mark.parametrize("dims", [(2, 32, 8, 2047, 128), (2, 16, 16, 2047, 256), (1, 24, 8, 4099, 128)],
                         ids=["llama3-8b", "gemma-7b", "odd-seq"])
def test_rope_full_size(dims, layout, dtype):
    torch.manual_seed(dims[1])
    _run(dims, dtype, layout, theta=500000.0, packed=True)
