"""TrainConfig: one dataclass whose fields are the YAML keys and the `trainer run` flags.

A YAML file sets fields; flags override the file; `resolve_config` validates the result. The
field metadata carries the help text and, for switches, the flag pair the CLI shows.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from healer.errors import HealerError
from trainer.options import RECOMPUTE_MODES, ModelOptions

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR_SCHEDULERS = ("linear", "cosine")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
GRADIENT_CHECKPOINTING = RECOMPUTE_MODES
REQUIRED = ("model", "data", "out")
# Bounds that catch a typo (an extra 000) before any memory is planned: no real run comes near them.
MAX_EPOCHS = 10_000
MAX_LORA_R = 65_536
MAX_SEQ_LEN = 1 << 20
MAX_PLANNED_SEQUENCES = 10_000_000  # the step plan holds one index per sequence per epoch
MAX_LR = 10.0  # Adam moves each weight by about lr per step; far above this its update overflows float32


class ConfigError(HealerError):
    """A training setting is missing, unknown or out of range."""


def _f(default: Any, help: str, *, flag: str | None = None) -> Any:
    meta = {"help": help, "flag": flag}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of a training run (YAML key = field name; CLI flag = --field-name)."""

    model: str | None = _f(None, "Hugging Face model directory to fine-tune.")
    data: str | None = _f(None, "Local dataset file: .jsonl, .json, .parquet or .csv.")
    out: str | None = _f(None, "Run directory to write (adapter, config, metrics, loss plot).")
    template: str | None = _f(None, "Chat template: a name (chatml), a .jinja file, or unset for the model's own.")
    max_seq_len: int = _f(2048, "Longest training sequence in tokens; longer examples are truncated.")
    batch_size: int = _f(2, "Sequences per micro-batch.")
    grad_accum: int = _f(4, "Micro-batches per optimizer step.")
    lr: float = _f(2e-4, "Peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    epochs: int = _f(1, "Passes over the dataset (ignored when max_steps is set).")
    max_steps: int | None = _f(None, "Optimizer steps to run (overrides epochs).")
    warmup_steps: int = _f(10, "Linear warmup steps.")
    lr_scheduler: str = _f("linear", "Learning-rate schedule after warmup: linear or cosine.")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this value (0 disables clipping).")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: float = _f(16.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.")
    use_rslora: bool = _f(False, "Rank-stabilized LoRA scaling alpha / sqrt(r).", flag="--use-rslora/--no-rslora")
    target_modules: list[str] = _f(list(DEFAULT_TARGET_MODULES), "Linear layers to adapt (comma-separated).")
    modules_to_save: list[str] = _f([], "Whole modules to train and save, e.g. embed_tokens,lm_head.")
    packing: bool = _f(False, "Pack examples into full sequences (no attention across examples).",
                       flag="--packing/--no-packing")
    train_on_inputs: bool = _f(False, "Train on every token, not only assistant replies.",
                               flag="--train-on-inputs/--assistant-only")
    load_in_4bit: bool = _f(True, "Quantize base weights to NF4 (QLoRA); --load-in-16bit for plain LoRA.",
                            flag="--load-in-4bit/--load-in-16bit")
    fix_untrained: bool = _f(True, "Repair untrained embedding rows of tokens the data uses (in memory).",
                             flag="--fix-untrained/--no-fix-untrained")
    max_bad_steps: int = _f(10, "Stop after this many consecutive steps with non-finite loss or gradients.")
    seed: int = _f(42, "Random seed (data order, LoRA init, dropout).")
    device: str = _f("auto", "auto, cpu or cuda.")
    dtype: str = _f("auto", "Compute dtype: auto (bfloat16 on GPU, float32 on CPU), float32 or bfloat16.")
    logging_steps: int = _f(1, "Write metrics every N optimizer steps.")
    save_steps: int = _f(0, "Save a resumable checkpoint every N steps (0: only the final adapter); "
                            "the last 2 are kept and `trainer run --resume RUN_DIR` continues from the latest.")
    gradient_checkpointing: str = _f("off", "Recompute decoder layers in backward: off, on, or offload (also park "
                                            "each layer's input in CPU memory; longest sequences).")
    cuda_graphs: bool = _f(False, "Replay each micro-batch's forward and backward as a CUDA graph (one GPU, "
                                  "unpacked rows, no LoRA dropout): less host time per step. Rows are padded "
                                  "(by under a quarter) so that shapes repeat; others run as usual.",
                           flag="--cuda-graphs/--no-cuda-graphs")
    kernels: str = _f("auto", "Triton kernels: auto (on CUDA GPUs), off (plain PyTorch everywhere: the reference "
                              "they are tested and measured against) or interpret (everywhere, under "
                              "TRITON_INTERPRET=1: for tests on CPU).")
    flex_attention: bool = _f(True, "FlexAttention on CUDA for packed, sliding-window and softcapped attention "
                                    "(off: dense masks; bench/README.md, attention).",
                              flag="--flex-attention/--no-flex-attention")
    fp8: bool = _f(False, "Run the NF4 base layers' forward products (and their recompute) in FP8 (e4m3, "
                          "scaled per row) on GPUs with FP8 matmuls (Ada, Hopper): faster and less exact "
                          "(figures: bench/README.md, FP8 forward products); the backward stays bf16. Needs "
                          "4-bit loading, bf16 and no LoRA dropout.", flag="--fp8/--no-fp8")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def config_fields() -> list[dataclasses.Field]:
    """The fields of TrainConfig in declaration order (the CLI builds one option per field)."""
    return list(dataclasses.fields(TrainConfig))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; unknown keys are a ConfigError naming them."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of setting: value, got {type(data).__name__}")
    known = {f.name for f in config_fields()}
    unknown = [str(k) for k in data if k not in known]
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k
                 for k in unknown]
        raise ConfigError(f"{p}: unknown setting(s): {', '.join(hints)}")
    return data


def resolve_config(path: str | Path | None = None, *, required: tuple[str, ...] = REQUIRED,
                   **overrides: Any) -> TrainConfig:
    """Fields from the YAML file at `path`, then `overrides` that are not None; validated (with the
    settings in `required` present: a preview writes nothing and needs no `out`)."""
    values = read_yaml(path) if path is not None else {}
    known = {f.name for f in config_fields()}
    unknown = [k for k in overrides if k not in known]
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return validate(TrainConfig(**{k: _coerce(k, v) for k, v in values.items()}), required=required)


def _coerce(name: str, value: Any) -> Any:
    """Check a value against the field's type; lists may also come as comma-separated strings."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"setting {name} cannot be empty")
    base = next(a for a in args if a is not type(None)) if optional else hint
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"setting {name} must be a list of names, got {value!r}")
        return list(value)
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"setting {name} must be true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"setting {name} must be an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"setting {name} must be a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"setting {name} must be a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled field type {hint} for {name}")


def validate(cfg: TrainConfig, required: tuple[str, ...] = REQUIRED) -> TrainConfig:
    """Raise ConfigError on missing required settings or values out of range; return cfg."""
    missing = [n for n in required if getattr(cfg, n) is None]
    if missing:
        raise ConfigError("missing setting(s): " + ", ".join(missing)
                          + " (give --" + " --".join(m.replace("_", "-") for m in missing)
                          + " or set them in the config file)")
    positive = ("max_seq_len", "batch_size", "grad_accum", "epochs", "lora_r", "max_bad_steps", "logging_steps")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"setting {name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("lr", "weight_decay", "max_grad_norm", "lora_alpha", "lora_dropout"):
        if not math.isfinite(getattr(cfg, name)):
            raise ConfigError(f"setting {name} must be a finite number, got {getattr(cfg, name)}")
    for name, limit in (("epochs", MAX_EPOCHS), ("lora_r", MAX_LORA_R), ("max_seq_len", MAX_SEQ_LEN)):
        if getattr(cfg, name) > limit:
            raise ConfigError(f"setting {name} must be at most {limit:,}, got {getattr(cfg, name):,}")
    if cfg.max_steps is not None and cfg.max_steps * cfg.batch_size * cfg.grad_accum > MAX_PLANNED_SEQUENCES:
        raise ConfigError(f"setting max_steps {cfg.max_steps:,} x batch_size {cfg.batch_size} x grad_accum "
                          f"{cfg.grad_accum} plans more than {MAX_PLANNED_SEQUENCES:,} sequences; lower --max-steps")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"setting max_steps must be at least 1, got {cfg.max_steps}")
    for name in ("warmup_steps", "save_steps"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"setting {name} must be 0 or more, got {getattr(cfg, name)}")
    if not 0 < cfg.lr <= MAX_LR:
        raise ConfigError(f"setting lr must be positive and at most {MAX_LR}, got {cfg.lr}")
    if cfg.max_grad_norm < 0 or cfg.weight_decay < 0:
        raise ConfigError("settings max_grad_norm and weight_decay must be 0 or more")
    if not cfg.lora_alpha > 0:
        raise ConfigError(f"setting lora_alpha must be positive (the adapter's scale is alpha / r; 0 trains an "
                          f"adapter that cannot change the model), got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"setting lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not cfg.target_modules:
        raise ConfigError("setting target_modules is empty: name at least one linear layer, e.g. q_proj")
    if cfg.fp8 and not cfg.load_in_4bit:
        raise ConfigError("setting fp8 runs the NF4 base layers in FP8: it needs load_in_4bit (--load-in-4bit)")
    if cfg.fp8 and cfg.lora_dropout:
        raise ConfigError("setting fp8 needs lora_dropout 0 (it runs in the fused LoRA projections, which have "
                          "no dropout)")
    for name, allowed in (("lr_scheduler", LR_SCHEDULERS), ("device", DEVICES), ("dtype", DTYPES),
                          ("gradient_checkpointing", GRADIENT_CHECKPOINTING)):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"setting {name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    model_options(cfg)  # the kernels mode, and interpret without Triton's interpreter: ModelOptions checks them
    return cfg


def model_options(cfg: TrainConfig) -> ModelOptions:
    """The decoder's and LoRA layers' options for this run (trainer.options): built once, here."""
    try:
        return ModelOptions(kernels=cfg.kernels, flex_attention=cfg.flex_attention, fp8=cfg.fp8,
                            recompute=cfg.gradient_checkpointing)
    except ValueError as e:
        raise ConfigError(f"setting {e}") from None


def check_data_file(name: str) -> None:
    """ConfigError for a --data path that is not a file, or an empty one (before any loading)."""
    p = Path(name)
    if not p.exists():
        raise ConfigError(f"{p}: data file not found")
    if not p.is_file():
        raise ConfigError(f"{p}: not a file (--data takes a .jsonl, .json, .parquet or .csv file)")
    if p.stat().st_size == 0:
        raise ConfigError(f"{p}: the data file is empty")


def check_template_file(name: str | None) -> None:
    """ConfigError naming a --template FILE that is not UTF-8 text or does not parse (before any loading)."""
    if name is None or not Path(name).is_file():
        return  # a registry name, or a missing file (reported where the template is resolved)
    p = Path(name)
    try:
        source = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: template file is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the template file ({e.strerror or e})") from None
    from healer.templates.render import TemplateBudgetError, TemplateError, compile_template, render_source

    try:
        compile_template(source, str(p))
    except TemplateError as e:
        raise ConfigError(str(e)) from None
    try:  # one short conversation: a template that runs out of its budget on it does on every example
        render_source(source, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                      name=str(p))
    except TemplateBudgetError as e:
        raise ConfigError(str(e)) from None
    except TemplateError:
        pass  # it may refuse this sample (no system turn, say): the data's own conversations decide


@dataclass(frozen=True)
class OptionSpec:
    """How the CLI shows one field: its flag (a pair for switches), value type and help."""

    name: str
    flag: str
    type: type
    help: str


def option_specs() -> list[OptionSpec]:
    """One CLI option per TrainConfig field: bool -> a --x/--no-x switch, list -> comma-separated names."""
    hints = typing.get_type_hints(TrainConfig)
    specs = []
    for f in config_fields():
        hint = hints[f.name]
        if typing.get_origin(hint) is list:
            kind = list
        else:  # T | None -> T
            kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = ",".join(default) if isinstance(default, list) else default
        help = f.metadata["help"] + (f" [default: {shown}]" if shown not in (None, "") else "")
        specs.append(OptionSpec(f.name, flag, kind, help))
    return specs
