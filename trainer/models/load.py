"""Load a Hugging Face checkpoint dir into the decoder, one tensor at a time, optionally in NF4."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from healer.errors import CheckpointError
from healer.model_dir import ModelDir
from trainer.models.decoder import CausalLM, RotaryEmbedding
from trainer.models.spec import ModelSpec
from trainer.options import DEFAULT_OPTIONS, ModelOptions


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               load_in_4bit: bool = False, options: ModelOptions = DEFAULT_OPTIONS) -> CausalLM:
    """Build the decoder for `path`'s config.json, with `options`, and fill it from its safetensors.

    Tensors are read one at a time and placed on `device` in `dtype`. With `load_in_4bit` every
    linear in `spec.linear_names` becomes a bitsandbytes Linear4bit quantized to NF4 with double
    quantization as it arrives, on `device`, so at most one 16-bit matrix is there at a time;
    embeddings, norms and lm_head stay in `dtype`. Base parameters are frozen (requires_grad=False).
    """
    ckpt = ModelDir(path)
    try:
        spec = ModelSpec.from_config(ckpt.config)
    except CheckpointError as e:
        raise type(e)(f"{ckpt.path}: {e}") from None
    device = torch.device(device)
    with torch.device("meta"):  # shapes only; each tensor is materialized from the checkpoint below
        model = CausalLM(spec, options)
    if load_in_4bit:
        _use_4bit_linears(model, dtype)
    for name, param in list(model.named_parameters()):  # a tied lm_head is listed once, as embed_tokens
        _load_parameter(ckpt, model, name, param, dtype, device)
    if spec.tie_word_embeddings:
        model.tie_weights()
    for rotary in (m for m in model.modules() if isinstance(m, RotaryEmbedding)):
        rotary.to(device)
    return model


def _use_4bit_linears(model: CausalLM, dtype: torch.dtype) -> None:
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for path in model.spec.linear_names:
            parent_name, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_name)
            old = getattr(parent, attr)
            setattr(parent, attr, bnb.nn.Linear4bit(
                old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=dtype,
                compress_statistics=True, quant_type="nf4", device="meta"))


def _load_parameter(ckpt: ModelDir, model: CausalLM, name: str, param: nn.Parameter, dtype: torch.dtype,
                    device: torch.device) -> None:
    import bitsandbytes as bnb

    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    shape = ckpt.tensor_shape(name)
    if tuple(shape) != tuple(param.shape):
        raise CheckpointError(f"{ckpt.path}: tensor {name} has shape {list(shape)}, "
                              f"config.json implies {list(param.shape)}")
    tensor = ckpt.tensor(name).to(dtype)
    if isinstance(module, bnb.nn.Linear4bit) and attr == "weight":
        # Params4bit.to(device) moves the 16-bit matrix there and quantizes it there.
        module.weight = bnb.nn.Params4bit(tensor, requires_grad=False, quant_type="nf4",
                                          compress_statistics=True, module=module).to(device)
    else:
        module._parameters[attr] = nn.Parameter(tensor.to(device), requires_grad=False)
