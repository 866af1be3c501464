"""Recompute (gradient checkpointing) modes: off, on (recompute) and offload (host-parked inputs) give the
same loss and the same LoRA gradients; on CPU the offload path runs with plain references instead of copies."""

from __future__ import annotations

from pathlib import Path

import builders
import pytest
import torch

from trainer.data import IGNORE_INDEX
from trainer.lora import LoRASettings, apply_lora, lora_modules
from trainer.models import load_model
from trainer.options import ModelOptions
from trainer.recompute import OffloadedLayer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    builders.save_tiny_model(out, "llama", 128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return out


def loss_and_grads(path: Path, mode: str, *, dropout: float, modules_to_save: list[str] = (),
                   autocast: torch.dtype | None = None):
    model = load_model(path, dtype=torch.float32, device="cpu", load_in_4bit=False,
                       options=ModelOptions(recompute=mode))
    torch.manual_seed(0)
    apply_lora(model, LoRASettings(r=4, alpha=8, dropout=dropout, modules_to_save=list(modules_to_save)))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 17), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    # two documents in the second row: the per-layer masks must reach the recomputed layers too
    pos = torch.stack([torch.arange(17), torch.cat([torch.arange(9), torch.arange(8)])])
    torch.manual_seed(123)  # dropout masks: the same draw in every mode
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(ids, labels=labels, position_ids=pos)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads, model


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_modes_give_the_same_loss_and_lora_gradients(tiny, dropout):
    ref_loss, ref_grads, _ = loss_and_grads(tiny, "off", dropout=dropout)
    assert ref_grads and all(bool(g.abs().sum() > 0) for g in ref_grads.values())
    for mode in ("on", "offload"):
        loss, grads, _ = loss_and_grads(tiny, mode, dropout=dropout)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=f"{mode}: {name}")


def test_recomputed_layers_run_under_the_forward_autocast_dtype(tiny):
    # a recompute in float32 would differ from the bfloat16 forward by bf16 rounding (about 1e-2)
    ref_loss, ref_grads, _ = loss_and_grads(tiny, "off", dropout=0.0, autocast=torch.bfloat16)
    for mode in ("on", "offload"):
        loss, grads, _ = loss_and_grads(tiny, mode, dropout=0.0, autocast=torch.bfloat16)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"{mode}: {name}")


def test_unknown_checkpointing_mode_is_a_config_error_naming_the_modes():
    from trainer.config import ConfigError, resolve_config

    with pytest.raises(ConfigError, match="off, on, offload"):
        resolve_config(None, model="m", data="d", out="o", gradient_checkpointing="sometimes")


def test_offload_mode_gives_the_embedding_its_gradient_when_it_is_trained(tiny):
    _, ref_grads, _ = loss_and_grads(tiny, "off", dropout=0.0, modules_to_save=["embed_tokens"])
    _, grads, _ = loss_and_grads(tiny, "offload", dropout=0.0, modules_to_save=["embed_tokens"])
    names = [n for n in grads if "embed_tokens" in n]
    assert names
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_offload_keeps_parameter_names_and_the_mode_shows_in_the_model(tiny):
    _, _, model = loss_and_grads(tiny, "offload", dropout=0.0)
    plain = load_model(tiny, dtype=torch.float32, device="cpu", load_in_4bit=False)
    apply_lora(plain, LoRASettings(r=4, alpha=8))
    assert all(isinstance(layer, OffloadedLayer) for layer in model.model.layers)
    assert model.model.offloader is not None and plain.model.offloader is None
    assert not any(isinstance(layer, OffloadedLayer) for layer in plain.model.layers)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert "recompute='offload'" in repr(model) and "recompute='off'" in repr(plain)
    # the LoRA layers were built with the model's options
    assert all(m.options is model.options for m in lora_modules(model).values())
