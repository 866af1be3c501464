"""What export reads: a base checkpoint plus, optionally, a LoRA adapter in PEFT's format.

A source is a run dir (adapter files in RUN_DIR/adapter/ or directly in RUN_DIR, found by
adapter_config.json), a bare adapter dir, or a plain Hugging Face model dir. Tensors are
read one at a time; `Source.tensor(name)` returns the base tensor with the adapter merged in.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from export.errors import AdapterMismatchError, ExportError, UnsupportedError
from healer.errors import CheckpointError
from healer.model_dir import TOKENIZER_FILES, ModelDir, check_adapter_config, read_json, safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
EMBED_A, EMBED_B = ".lora_embedding_A", ".lora_embedding_B"
# adapter_config keys whose non-default values change the math beyond W + s*B@A
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA", "lora_bias": "lora_bias", "layer_replication": "layer_replication",
    "target_parameters": "target_parameters", "trainable_token_indices": "trainable_token_indices",
}


@dataclass(frozen=True)
class LoraDelta:
    """One LoRA pair: delta = scale * B @ A (transposed for embeddings and fan_in_fan_out)."""

    a: str
    b: str
    scale: float
    transposed: bool


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    # same rule as peft.utils.other.get_pattern_key (rank_pattern / alpha_pattern keys)
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


class Adapter:
    """A PEFT LoRA adapter dir: adapter_config.json + adapter_model.safetensors (or .bin)."""

    def __init__(self, path: Path):
        self.path = path
        self.config_path = path / ADAPTER_CONFIG
        cfg = read_json(self.config_path)
        check_adapter_config(cfg, self.config_path)
        self.config: dict[str, Any] = cfg
        if cfg.get("peft_type", "LORA") != "LORA":
            raise UnsupportedError(f"{self.config_path}: peft_type {cfg.get('peft_type')}; only LoRA adapters can be merged")
        for key, what in UNSUPPORTED_OPTIONS.items():
            if cfg.get(key):
                raise UnsupportedError(f"{self.config_path}: {what} adapters are not supported by export; "
                                       "merge with peft's merge_and_unload instead")
        self.weights_path = next((p for p in (path / "adapter_model.safetensors", path / "adapter_model.bin")
                                  if p.is_file()), None)
        if self.weights_path is None:
            raise CheckpointError(f"{path}: adapter_config.json but no adapter_model.safetensors")

    @cached_property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        if self.weights_path.suffix == ".safetensors":
            header = safetensors_header(self.weights_path)
            return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        return {k: tuple(v.shape) for k, v in self._bin.items()}

    @cached_property
    def _bin(self) -> dict[str, torch.Tensor]:
        return torch.load(self.weights_path, map_location="cpu", weights_only=True, mmap=True)

    def read(self, key: str) -> torch.Tensor:
        if self.weights_path.suffix != ".safetensors":
            return self._bin[key]
        from safetensors import safe_open

        with safe_open(str(self.weights_path), framework="pt") as f:
            return f.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    @cached_property
    def _parsed(self) -> tuple[dict[str, LoraDelta], dict[str, str]]:
        """(base tensor name -> LoraDelta, base tensor name -> adapter key of a full replacement)."""
        pairs: dict[str, dict[str, str]] = {}
        replaced: dict[str, str] = {}
        for key in self._shapes:
            name = key.removeprefix(PEFT_PREFIX)
            for suffix, role, kind in ((LORA_A, "a", "linear"), (LORA_B, "b", "linear"),
                                       (EMBED_A, "a", "embedding"), (EMBED_B, "b", "embedding")):
                if name.endswith(suffix):
                    module = name.removesuffix(suffix)
                    pairs.setdefault(module, {"kind": kind})[role] = key
                    break
            else:
                if ".lora_" in name:
                    raise UnsupportedError(f"{self.weights_path}: tensor {key} is a LoRA variant export does not merge")
                # PEFT saves whole tensors for modules_to_save and trained embeddings (as .base_layer)
                replaced[name.replace(".base_layer.", ".")] = key
        alpha_pattern = self.config.get("alpha_pattern") or {}
        deltas = {}
        for module, p in pairs.items():
            if "a" not in p or "b" not in p:
                raise CheckpointError(f"{self.weights_path}: {module} has only one of lora_A / lora_B")
            for key in (p["a"], p["b"]):
                if len(self.shape(key)) != 2 or 0 in self.shape(key):
                    raise CheckpointError(f"{self.weights_path}: tensor {key} has shape {list(self.shape(key))}; "
                                          "LoRA factors are 2-D matrices [rank, in] and [out, rank]")
            r = self.shape(p["a"])[0]
            pattern = _pattern_key(alpha_pattern, module)
            alpha = alpha_pattern[pattern] if pattern else self.config.get("lora_alpha", 8)
            scale = alpha / (math.sqrt(r) if self.config.get("use_rslora") else r)
            transposed = p["kind"] == "embedding" or bool(self.config.get("fan_in_fan_out"))
            deltas[f"{module}.weight"] = LoraDelta(p["a"], p["b"], scale, transposed)
        return deltas, replaced

    @property
    def deltas(self) -> dict[str, LoraDelta]:
        return self._parsed[0]

    @property
    def replaced(self) -> dict[str, str]:
        return self._parsed[1]

    def delta_shape(self, d: LoraDelta) -> tuple[int, int]:
        (r_a, n_in), (n_out, r_b) = self.shape(d.a), self.shape(d.b)
        if r_a != r_b:
            raise CheckpointError(f"{self.weights_path}: {d.a} has rank {r_a} but {d.b} has rank {r_b}")
        return (n_in, n_out) if d.transposed else (n_out, n_in)

    def delta(self, d: LoraDelta) -> torch.Tensor:
        """scale * B @ A in float32, laid out like the base weight."""
        out = (self.read(d.b).float() @ self.read(d.a).float()).mul_(d.scale)
        return out.T if d.transposed else out


class Source:
    """A base checkpoint with an optional adapter; `tensor(name)` is the merged tensor."""

    def __init__(self, base: ModelDir, adapter: Adapter | None, tokenizer_dir: Path):
        self.base = base
        self.adapter = adapter
        self.tokenizer_dir = tokenizer_dir

    @property
    def config(self) -> dict[str, Any]:
        return self.base.config

    def require(self, *keys: str) -> None:
        """CheckpointError naming config.json unless each of `keys` is an integer in it."""
        for key in keys:
            if not isinstance(self.config.get(key), int):
                raise CheckpointError(f"{self.base.path / 'config.json'}: {key} is missing or not an integer "
                                      f"({self.config.get(key)!r}); export needs the model's full config")

    @property
    def inputs(self) -> list[Path]:
        """Every directory export reads: no output may be, contain or lie inside one of them."""
        return [self.base.path, self.tokenizer_dir] + ([self.adapter.path] if self.adapter is not None else [])

    def tensor_names(self) -> list[str]:
        return self.base.tensor_names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.tensor_shape(name)

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype the base stores `name` in (read from the header, no data)."""
        path = self.base.weight_map[name]
        if path.suffix == ".safetensors":
            stored = safetensors_header(path)[name]["dtype"]
            if stored not in _SAFETENSORS_DTYPES:
                raise UnsupportedError(f"{path}: tensor {name} is stored as {stored}, which export cannot convert "
                                       f"(it reads {', '.join(_SAFETENSORS_DTYPES)})")
            return _SAFETENSORS_DTYPES[stored]
        return self.base.tensor(name).dtype

    def is_changed(self, name: str) -> bool:
        return self.adapter is not None and (name in self.adapter.deltas or name in self.adapter.replaced)

    def tensor(self, name: str) -> torch.Tensor:
        """The merged tensor: float32 where the adapter changes it, else the base tensor as stored."""
        if self.adapter is None:
            return self.base.tensor(name)
        key = self.adapter.replaced.get(name)
        w = self.adapter.read(key) if key else self.base.tensor(name)
        d = self.adapter.deltas.get(name)
        if d is None:
            return w
        return w.float().add_(self.adapter.delta(d))

    def validate(self) -> None:
        """Refuse adapters whose modules or shapes do not fit the base (one actionable line)."""
        if self.adapter is None:
            return
        ad, base = self.adapter, self.base
        hint = "was the adapter trained on another model? pass the right one with --base"
        auto = ad.config.get("auto_mapping") or {}
        trained_on, archs = auto.get("base_model_class"), base.config.get("architectures") or []
        if trained_on and archs and trained_on not in archs:
            raise AdapterMismatchError(f"adapter was trained on a {trained_on}, base {base.path} is a {archs[0]}; {hint}")
        if base.tie_word_embeddings and base.lm_head_name is None and (
                "lm_head.weight" in ad.deltas or "lm_head.weight" in ad.replaced):
            raise UnsupportedError("adapter changes lm_head of a model with tied embeddings; "
                                   "export cannot untie them (retrain without lm_head in the adapter)")
        names = set(base.tensor_names())
        for name, d in ad.deltas.items():
            if name not in names:
                raise AdapterMismatchError(f"adapter has LoRA weights for {name}, which base {base.path} lacks; {hint}")
            want, got = base.tensor_shape(name), ad.delta_shape(d)
            if tuple(want) != tuple(got):
                raise AdapterMismatchError(f"adapter's LoRA update of {name} has shape {list(got)}, "
                                           f"base {base.path} has {list(want)}; {hint}")
        for name, key in ad.replaced.items():
            if name not in names:
                raise AdapterMismatchError(f"adapter stores {name}, which base {base.path} lacks; {hint}")
            if tuple(ad.shape(key)) != tuple(base.tensor_shape(name)):
                raise AdapterMismatchError(f"adapter stores {name} with shape {list(ad.shape(key))}, "
                                           f"base {base.path} has {list(base.tensor_shape(name))}; {hint}")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def find_adapter_dir(path: Path) -> Path | None:
    """RUN_DIR/adapter or RUN_DIR itself, whichever holds adapter_config.json."""
    for candidate in (path, path / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    return None


def _resolve_base(recorded: str | None, adapter: Adapter) -> Path:
    if not recorded:
        raise ExportError(f"{adapter.config_path} records no base model; pass the base model dir with --base")
    for candidate in (Path(recorded), adapter.path / recorded, adapter.path.parent / recorded):
        if (candidate / "config.json").is_file():
            return candidate
    raise ExportError(f"base model {recorded!r} recorded in {adapter.config_path} is not a local model dir; "
                      "pass it with --base MODEL_DIR")


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def open_source(source: str | Path, base: str | Path | None = None) -> Source:
    """Open a run dir, adapter dir or model dir (with `base` overriding the recorded base path)."""
    source = Path(source)
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such directory (expected a run dir, adapter dir or model dir)")
    adapter_dir = find_adapter_dir(source)
    if adapter_dir is None:
        if not (source / "config.json").is_file():
            raise CheckpointError(f"{source}: neither adapter_config.json nor config.json "
                                  "(expected a run dir, adapter dir or model dir)")
        if base is not None:
            raise ExportError(f"{source} is a model dir, not an adapter; --base only applies to adapters")
        ckpt = ModelDir(source)
        adapter = None
    else:
        adapter = Adapter(adapter_dir)
        ckpt = ModelDir(base if base is not None else _resolve_base(adapter.config.get("base_model_name_or_path"),
                                                                      adapter))
    quant = ckpt.config.get("quantization_config")
    if quant:
        raise UnsupportedError(f"{ckpt.path} is quantized ({quant.get('quant_method', 'unknown method')}); "
                               "export needs the 16-bit base model: pass it with --base")
    if not ckpt.has_weights:
        raise CheckpointError(f"{ckpt.path}: no weights (*.safetensors or pytorch_model*.bin)")
    # the trainer may save a (healed) tokenizer with the adapter: it wins over the base's, as a whole
    tokenizer_dir = adapter_dir if adapter_dir is not None and _has_tokenizer(adapter_dir) else ckpt.path
    src = Source(ckpt, adapter, tokenizer_dir)
    src.validate()
    return src


def tokenizer_files(directory: Path) -> list[Path]:
    """Every tokenizer file in `directory` (what a merged checkpoint must carry along)."""
    names = (*TOKENIZER_FILES, "vocab.json", "merges.txt", "tekken.json")
    return [directory / n for n in names if (directory / n).is_file()]
