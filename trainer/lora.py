"""LoRA over frozen base linears (16-bit nn.Linear or bitsandbytes NF4 Linear4bit), saved as a PEFT adapter.

    y = base(x) + dropout(x) A^T B^T * s,   s = alpha / r   (alpha / sqrt(r) with rsLoRA)

A (r x in) starts Kaiming-uniform with a = sqrt(5) and B (out x r) at zero, as PEFT does, so a
fresh adapter leaves the model unchanged. LoRA weights live in float32 whatever the base dtype:
they are the only trained weights and small. The saved files are what `peft.PeftModel` reads:
adapter_config.json and adapter_model.safetensors with keys
`base_model.model.<module path>.lora_A.weight` (no adapter name).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from healer.model_dir import check_adapter_config
from healer.outputs import replace_dir
from trainer.config import DEFAULT_TARGET_MODULES, ConfigError
from trainer.options import DEFAULT_OPTIONS, ModelOptions

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# Phi-3 stores q/k/v and gate/up as one fused linear each; asking for all parts adapts the fused one.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class LoRASettings:
    """What to adapt and how: rank, alpha, dropout, rsLoRA, target linears, fully trained modules."""

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    modules_to_save: list[str] = field(default_factory=list)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def lora_delta(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
               dropout: nn.Module) -> torch.Tensor:
    """dropout(x) A^T B^T * scaling, computed in the LoRA weights' dtype (a kernel can replace this)."""
    h = dropout(x.to(lora_A.dtype))
    return (h @ lora_A.t()) @ lora_B.t() * scaling


class LoRALinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update; attribute names follow PEFT's.

    Without dropout, forward runs trainer.kernels.lora_fused.lora_linear (hand-written backward, the
    dequantized NF4 weight is not saved) where options.use_kernels says so, with an NF4 base's forward
    product in e4m3 under options.fp8.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, options: ModelOptions = DEFAULT_OPTIONS):
        super().__init__()
        assert r >= 1
        self.options = options
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r = r
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        device = next(base_layer.parameters()).device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def rebuilt(self, options: ModelOptions) -> LoRALinear:
        """This layer with other options: the same base layer and the same LoRA factors (shared, not copied,
        so gradients reach this layer's), to run one set of weights down another path. A shallow copy, so
        no factors are allocated or drawn from the random generator only to be dropped."""
        twin = copy.copy(self)
        twin.options = options
        return twin

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether forward(x) takes the fused path."""
        # With dropout the LoRA branch sees dropout(x): its backward would need the mask or the dropped x
        # saved, a [tokens x in] tensor per projection, which is the memory the fused path exists to save.
        if not isinstance(self.lora_dropout, nn.Identity):
            return False
        return self.options.use_kernels(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_kernel(x):  # imported here: importing Triton costs time the CPU-only paths need not pay
            from trainer.kernels.lora_fused import lora_linear

            return lora_linear(x, self.base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling,
                               fp8=self.options.fp8)
        result = self.base_layer(x)
        delta = lora_delta(x, self.lora_A.weight, self.lora_B.weight, self.scaling, self.lora_dropout)
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, options={self.options}"


def mlp_uses_kernel(x: torch.Tensor, options: ModelOptions, *projections: nn.Module | None) -> bool:
    """Whether an MLP built with `options` and these projections (gate, up, down; None for a missing one)
    should run as one trainer.kernels.lora_fused.lora_mlp call on input x: every LoRALinear among them takes
    its fused path and every other one is a frozen base linear (with none adapted, options decide)."""
    present = [m for m in projections if m is not None]
    adapted = [m for m in present if isinstance(m, LoRALinear)]
    if any(not _is_linear(m) or any(p.requires_grad for p in m.parameters())
           for m in present if not isinstance(m, LoRALinear)):
        return False
    return all(m.uses_kernel(x) for m in adapted) if adapted else options.use_kernels(x)


def projections_use_kernel(x: torch.Tensor, *projections: nn.Module) -> bool:
    """Whether projections of one input x (q, k, v) should run as one trainer.kernels.lora_fused.lora_projections
    call: every one a LoRALinear that takes its fused path."""
    return all(isinstance(m, LoRALinear) and m.uses_kernel(x) for m in projections)


def fp8_layers(model: nn.Module) -> int:
    """How many LoRALinear layers of `model` run their forward base product in e4m3: built with options.fp8
    over an NF4 base (trainer.kernels.lora_fused.fp8_capable then decides per call)."""
    return sum(1 for m in lora_modules(model).values()
               if m.options.fp8 and getattr(m.base_layer.weight, "quant_state", None) is not None)


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def resolve_target_modules(model: nn.Module, requested: list[str]) -> list[str]:
    """The linear names to adapt in `model`: `requested`, with q/k/v and gate/up mapped onto fused ones."""
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)}
    names: list[str] = []
    for name in requested:
        if name in present:
            names.append(name)
            continue
        fused = next((f for f, parts in FUSED.items() if name in parts and f in present), None)
        if fused is None:
            raise ConfigError(f"target module {name!r} is not a linear layer of this model "
                              f"(linear layers: {', '.join(sorted(present))})")
        missing = [p for p in FUSED[fused] if p not in requested]
        if missing:
            raise ConfigError(f"this model fuses {', '.join(FUSED[fused])} into {fused}: target {fused} "
                              f"(or all of {', '.join(FUSED[fused])}), not {name} alone")
        if fused not in names:
            names.append(fused)
    return names


def apply_lora(model: nn.Module, settings: LoRASettings, options: ModelOptions | None = None) -> LoRASettings:
    """Freeze `model`, wrap the targeted linears in LoRALinear, unfreeze modules_to_save.

    The LoRA layers are built with `options`; by default the model's own (trainer.models.CausalLM.options),
    so that they take the paths the decoder around them takes. Returns the settings with target_modules as
    applied (fused names where the model fuses).
    """
    if options is None:
        options = getattr(model, "options", None) or DEFAULT_OPTIONS
    targets = resolve_target_modules(model, settings.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and _is_linear(module):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, LoRALinear(module, settings.r, settings.alpha, settings.dropout,
                                             settings.use_rslora, options))
            wrapped.append(name)
    assert wrapped, targets
    for name in modules_to_save_paths(model, settings.modules_to_save):
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return dataclasses.replace(settings, target_modules=targets)


def modules_to_save_paths(model: nn.Module, names: list[str]) -> list[str]:
    """Module paths whose last name is in `names` (e.g. embed_tokens -> model.embed_tokens)."""
    paths = [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in names]
    found = {p.rsplit(".", 1)[-1] for p in paths}
    missing = [n for n in names if n not in found]
    if missing:
        raise ConfigError(f"modules_to_save: no module named {', '.join(missing)} in this model")
    return paths


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path -> LoRALinear for every adapted linear."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module, modules_to_save: list[str] = ()) -> dict[str, torch.Tensor]:
    """Trained weights under PEFT's saved key names."""
    state: dict[str, torch.Tensor] = {}
    for path, m in lora_modules(model).items():
        state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.lora_A.weight.detach()
        state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_B.weight.detach()
    for path in modules_to_save_paths(model, list(modules_to_save)):
        for pname, p in model.get_submodule(path).named_parameters():
            state[f"{PEFT_PREFIX}{path}.{pname}"] = p.detach()
    return {k: v.contiguous().cpu() for k, v in state.items()}


def peft_config(settings: LoRASettings, base_model: str | None) -> dict[str, Any]:
    """adapter_config.json contents for PEFT's LoraConfig."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "use_rslora": settings.use_rslora,
        "target_modules": list(settings.target_modules),
        "modules_to_save": list(settings.modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(model: nn.Module, out_dir: str | Path, settings: LoRASettings,
                 base_model: str | None = None) -> Path:
    """Write a PEFT adapter dir atomically (temp dir beside it, then rename); return its path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        save_file(adapter_state_dict(model, settings.modules_to_save), str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config(settings, base_model), indent=2) + "\n",
                                          encoding="utf-8")
        replace_dir(tmp, out, old=out.with_name(f".{out.name}.old{os.getpid()}"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_adapter_config(adapter_dir: str | Path) -> LoRASettings:
    """LoRASettings from a PEFT adapter_config.json."""
    p = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p.parent}: not a LoRA adapter (no {ADAPTER_CONFIG})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON (line {e.lineno})") from None
    check_adapter_config(cfg, p)
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{p}: peft_type is {cfg.get('peft_type')!r}, only LORA adapters are supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        raise ConfigError(f"{p}: target_modules is a regex ({targets!r}); only a list of names is supported")
    return LoRASettings(r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                        use_rslora=cfg.get("use_rslora", False), target_modules=list(targets or []),
                        modules_to_save=list(cfg.get("modules_to_save") or []))


def load_adapter_weights(model: nn.Module, adapter_dir: str | Path) -> None:
    """Copy saved adapter weights into a model already wrapped with apply_lora (same settings)."""
    from safetensors.torch import load_file

    p = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not p.is_file():
        raise ConfigError(f"{p.parent}: no {ADAPTER_WEIGHTS}")
    saved = load_file(str(p))
    params = {}
    for path, m in lora_modules(model).items():
        params[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.lora_A.weight
        params[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_B.weight
    settings = read_adapter_config(adapter_dir)
    for path in modules_to_save_paths(model, settings.modules_to_save):
        for pname, prm in model.get_submodule(path).named_parameters():
            params[f"{PEFT_PREFIX}{path}.{pname}"] = prm
    if set(saved) != set(params):
        extra, missing = sorted(set(saved) - set(params)), sorted(set(params) - set(saved))
        raise ConfigError(f"{p}: adapter does not fit this model (unexpected: {extra[:3]}, missing: {missing[:3]})")
    with torch.no_grad():
        for k, prm in params.items():
            if saved[k].shape != prm.shape:
                raise ConfigError(f"{p}: {k} has shape {tuple(saved[k].shape)}, the model needs {tuple(prm.shape)}")
            prm.copy_(saved[k])


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that require grad (LoRA A/B and modules_to_save)."""
    return [p for p in model.parameters() if p.requires_grad]
