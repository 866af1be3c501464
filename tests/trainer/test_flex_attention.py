"""FlexAttention (eager, on the CPU) against a float64 reference and the dense-mask path.

The reference builds its mask element by element from the documents' spans, independently of
ops.attention_mask and ops.block_mask. FlexAttention has no backward on the CPU, so its gradients
are only compared here on CUDA (bench/attention.py also reports them against the dense path).
"""

import math

import pytest
import torch

from trainer.models import ops

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def _documents(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]


def _reference(q, k, v, doc_lengths, window, softcap, scale):
    """float64 attention with an explicit per-element mask."""
    q, k, v = (t.double().cpu() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    seq_len = q.shape[2]
    owner = [d for d, n in enumerate(doc_lengths) for _ in range(n)]
    allowed = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    for i in range(seq_len):
        for j in range(i + 1):
            allowed[i, j] = owner[i] == owner[j] and (window is None or i - j < window)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, -math.inf)
    return scores.softmax(-1) @ v


CASES = {
    "packed": ([12, 1, 20, 4], None, None),
    "sliding_window": ([37], 8, None),
    "softcap": ([37], None, 0.5),
    "packed_window_softcap": ([30, 9, 31], 11, 0.5),
    "window_longer_than_documents": ([5, 65], 64, 2.0),
}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
@pytest.mark.parametrize("case", CASES)
def test_flex_attention_matches_float64_reference_and_dense_path(case, device):
    doc_lengths, window, softcap = CASES[case]
    seq_len = sum(doc_lengths)
    gen = torch.Generator().manual_seed(seq_len)
    # Large scores, so that the softcap's tanh is far from linear.
    q = torch.randn(1, HEADS, seq_len, HEAD_DIM, generator=gen) * 3
    k = torch.randn(1, KV_HEADS, seq_len, HEAD_DIM, generator=gen) * 3
    v = torch.randn(1, KV_HEADS, seq_len, HEAD_DIM, generator=gen)
    grad_out = torch.randn(1, HEADS, seq_len, HEAD_DIM, generator=gen)
    q, k, v, grad_out = (t.to(device) for t in (q, k, v, grad_out))
    scale = HEAD_DIM ** -0.5
    documents = _documents(doc_lengths).to(device) if len(doc_lengths) > 1 else None
    # On CUDA the decoder's way: a BlockMask only where compiled flex passes its trial, else the dense
    # mask (H100, torch 2.11: the length-70 float32 case failed to compile). The CPU has no flex
    # backward, so there the BlockMask is taken as is and only its forward is compared.
    check = ops.AttentionShape(HEADS, KV_HEADS, HEAD_DIM, q.dtype, scale, softcap) if q.is_cuda else None
    masks = {
        flex: ops.layer_masks(documents, seq_len, [window], q.device, flex=flex, softcap=softcap,
                              check=check)[window]
        for flex in (False, True)
    }
    assert isinstance(masks[True], ops.BlockMask) or q.is_cuda

    backward = {False: True, True: q.is_cuda}  # FlexAttention has no backward on the CPU

    def run(fn, with_grads):
        leaves = [t.clone().requires_grad_(with_grads) for t in (q, k, v)]
        out = fn(*leaves)
        out = out.double().cpu()
        if not with_grads:
            return out, None
        (out * grad_out.double().cpu()).sum().backward()
        return out, [t.grad.double().cpu() for t in leaves]

    ref_out, ref_grads = run(lambda *a: _reference(*a, doc_lengths, window, softcap, scale), True)
    for flex, mask in masks.items():
        out, grads = run(lambda *a, mask=mask: ops.attention(*a, mask, scale=scale, softcap=softcap), backward[flex])
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, msg=f"output, flex={flex}")
        for name, g, ref in zip("qkv", grads or [], ref_grads, strict=False):
            torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5, msg=f"d{name}, flex={flex}")


def test_flex_layer_masks_leave_plain_causal_to_sdpa_without_softcap():
    masks = ops.layer_masks(None, 70, [None, 128, 16], torch.device("cpu"), flex=True)
    assert masks[None] is None and masks[128] is None
    assert isinstance(masks[16], ops.BlockMask)
    capped = ops.layer_masks(None, 70, [None], torch.device("cpu"), flex=True, softcap=30.0)
    assert isinstance(capped[None], ops.BlockMask)


def test_block_mask_agrees_with_dense_mask_for_batched_documents():
    documents = torch.stack([_documents([30, 40])[0], _documents([1, 68, 1])[0]])
    dense = ops.attention_mask(documents, 70, 25, torch.device("cpu"))
    blocks = ops.block_mask(documents, 70, 25, torch.device("cpu"))
    b, i, j = torch.meshgrid(torch.arange(2), torch.arange(70), torch.arange(70), indexing="ij")
    from_mod = blocks.mask_mod(b, torch.zeros_like(b), i, j)
    assert torch.equal(from_mod, dense[:, 0])


def test_flex_failing_its_trial_falls_back_to_the_dense_mask(recwarn):
    """A real failure: FlexAttention has no backward on the CPU, so its forward+backward trial fails
    there; layer_masks must then hand out `attention_mask`'s dense mask, and warn once per shape."""
    shape = ops.AttentionShape(HEADS, KV_HEADS, HEAD_DIM, torch.float32, HEAD_DIM ** -0.5, 0.5)
    documents = _documents([30, 40])
    for _ in range(2):
        masks = ops.layer_masks(documents, 70, [None, 25], torch.device("cpu"), flex=True, softcap=0.5,
                                check=shape)
        for window, mask in masks.items():
            assert torch.equal(mask, ops.attention_mask(documents, 70, window, torch.device("cpu")))
    trials = [w for w in recwarn.list if "forward+backward trial" in str(w.message)]
    assert len(trials) == 2, [str(w.message) for w in recwarn.list]  # one per window, not per call
    assert "NotImplementedError" in str(trials[0].message)
    blocks = ops.block_mask(documents, 70, 25, torch.device("cpu"))
    assert ops.flex_compiles(blocks, shape, rule=(True, 25)) is False
