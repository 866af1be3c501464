"""The whole decoder on CUDA with FlexAttention (the default there) against float64 on the CPU.

Packed rows (documents), Gemma 2's sliding windows and attention softcap: the cases that take the
flex path. Loss and the gradient of every parameter are compared with the float64 CPU model, which
takes the dense-mask path. Run through the device tool: `pytest -m gpu tests/trainer`.
"""

from __future__ import annotations

import pytest
import torch
from model_fixtures import VOCAB, hf_checkpoint

from trainer.models import load_model, ops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CASES = {
    "llama_packed": ("llama", {}),
    "gemma2_window_softcaps_packed": ("gemma2", dict(sliding_window=16, attn_logit_softcapping=5.0,
                                                     final_logit_softcapping=10.0)),
    # q/k norms; Gemma 3's windowed layers with their own RoPE base beside a global one
    "qwen3_packed": ("qwen3", {}),
    "gemma3_window_local_rope_packed": ("gemma3_text", dict(
        sliding_window=16, num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}


def _packed_batch(seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, seq), generator=g)
    lengths = [[40, 1, seq - 41], [seq // 2, seq - seq // 2]]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels, positions


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_flex_decoder_loss_and_gradients_match_float64(tmp_path, case, dtype):
    family, overrides = CASES[case]
    # head_dim 64, as real models have; 300 tokens: not a multiple of FlexAttention's 128 block (under one
    # block, at 100 tokens, compiling the backward failed on the H100 and the dense path served)
    hf_checkpoint(tmp_path, family, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  **overrides)
    ids, labels, positions = _packed_batch(300)
    results = {}
    for device, dt in (("cpu", torch.float64), ("cuda", dtype)):
        model = load_model(tmp_path, dtype=dt, device=device)
        model.train().requires_grad_(True)  # load_model freezes the base; every gradient is compared here
        loss = model(ids.to(device), labels=labels.to(device), position_ids=positions.to(device)).loss
        loss.backward()
        results[device] = (loss.item(), {n: p.grad.double().cpu() for n, p in model.named_parameters()})
    ref_loss, ref_grads = results["cpu"]
    loss, grads = results["cuda"]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert abs(loss - ref_loss) <= tol * abs(ref_loss)
    for name, ref in ref_grads.items():
        err = (grads[name] - ref).norm() / ref.norm().clamp(min=1e-12)
        assert err <= 5 * tol, f"{name}: relative error {err:.2e}"
    if dtype == torch.bfloat16:  # the training dtype: flex must really have served, not the fallback
        softcap = overrides.get("attn_logit_softcapping")
        served = [ok for (shape, _, _, length, *_), ok in ops._FLEX_VERDICTS.items()
                  if shape.head_dim == 64 and shape.softcap == softcap and length == 300]
        assert served and all(served), ops._FLEX_VERDICTS
