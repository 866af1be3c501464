"""The variants of bench/train.py, each run in its own process, and what they measure.

Every variant loads the same random-weight checkpoint in 4-bit, starts LoRA from the same A matrices
(`same_lora_init`; B is zero), trains on the same micro-batches (`micro_batches` from one seeded
generator) and is measured by the same code: `throughput` (timed optimizer steps) and, with
--max-seq, `longest_sequence` (one step at batch 1 per length until the GPU runs out of memory).
A variant is an object with `vocab`, `after_load_gib`, `step(micro_batches) -> loss` and
`recover()` (drop what a step that ran out of memory left behind).

The Unsloth variant needs packages the GPU machine lacks (UNSLOTH_PINS); bench/unsloth_wheels.py makes the
wheels to carry and bench/README.md says how to run it.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import io
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

LORA_RANK = 32  # alpha = rank: scaling 1, as in every variant
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# ours: model.layers.3.mlp.up_proj.lora_A.weight; PEFT: ...model.layers.3.mlp.up_proj.lora_A.default.weight
_LORA_A = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_A(?:\.default)?\.weight$")
# lengths tried at batch 1: dense up to 128K (where the targets sit), then every 32K up to --max-seq-limit
LADDER = [8192, 16384, 32768, 49152, 65536, 98304, 131072]
UNSLOTH_PINS = ("unsloth==2026.10.9", "unsloth_zoo==2026.10.9")


@dataclass
class Settings:
    """What the command line asks of one variant."""

    steps: int
    batch: int
    seq: int
    accum: int
    gc: str = "on"
    max_seq: bool = False
    max_seq_limit: int = 262144
    time_budget: float = 300.0
    lengths: tuple[int, ...] = ()  # the lengths to try instead of `ladder(max_seq_limit)`


def _gib(stat: str) -> float:
    return getattr(torch.cuda, stat)() / 2**30 if torch.cuda.is_available() else 0.0


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def micro_batches(gen: torch.Generator, vocab: int, batch: int, seq: int, accum: int) -> list[torch.Tensor]:
    """One optimizer step's token ids, [batch, seq] each, on the CPU; every variant draws them this way."""
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(accum)]


def same_lora_init(model: torch.nn.Module) -> int:
    """Overwrite every LoRA A with values drawn from a generator seeded by its layer and projection.

    Same distribution as PEFT's kaiming_uniform_(a=sqrt(5)): uniform in +-1/sqrt(in_features). Ours and
    PEFT consume the global random stream differently, so without this the variants' losses would
    part after the first step for a reason that is not the implementation. Returns the count.
    """
    count = 0
    for name, p in model.named_parameters():
        m = _LORA_A.search(name)
        if m is None:
            continue
        gen = torch.Generator().manual_seed(int(m[1]) * len(LORA_TARGETS) + LORA_TARGETS.index(m[2]))
        bound = 1 / math.sqrt(p.shape[1])
        with torch.no_grad():
            p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen))
        count += 1
    assert count and count % len(LORA_TARGETS) == 0, f"found {count} LoRA A matrices"
    return count


class Ours:
    """Our trainer: load_model in NF4, apply_lora, --gc mode, trainer.loop.train_step, paged 8-bit AdamW."""

    def __init__(self, model_dir: Path, s: Settings, graphs: bool = False, fp8: bool = False, kernels: str = "auto"):
        import bitsandbytes as bnb

        from trainer.distributed import from_environment, wrap
        from trainer.lora import LoRASettings, apply_lora, fp8_layers, trainable_parameters
        from trainer.models import load_model
        from trainer.options import ModelOptions

        # under torchrun: one rank per GPU, each with its own micro-batches
        self.dp = from_environment("cuda")
        self.device = self.dp.device if self.dp else _device()
        self.world, self.rank = (self.dp.world_size, self.dp.rank) if self.dp else (1, 0)
        torch.manual_seed(0)
        # as trainer run builds them (trainer.config.model_options): --kernels, --fp8, --gradient-checkpointing
        options = ModelOptions(kernels=kernels, fp8=fp8, recompute=s.gc)
        model = load_model(model_dir, dtype=torch.bfloat16, device=str(self.device), load_in_4bit=True,
                           options=options)
        self.after_load_gib = _gib("memory_allocated")
        apply_lora(model, LoRASettings(r=LORA_RANK, alpha=float(LORA_RANK), target_modules=LORA_TARGETS))
        same_lora_init(model)
        if fp8:  # as trainer run --fp8
            assert fp8_layers(model) > 0
        model.train()
        self.vocab = model.spec.vocab_size
        self.core = model
        self.model = wrap(model, self.dp) if self.dp else model
        self.opt = bnb.optim.PagedAdamW8bit(trainable_parameters(model), lr=2e-4)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda _: 1.0)
        self.graphs = None
        if graphs and self.dp is None:  # as trainer.loop.run_steps builds them for --cuda-graphs
            from trainer.graphs import MicroBatchGraphs

            self.graphs = MicroBatchGraphs(model, trainable_parameters(model), autocast_dtype=torch.bfloat16,
                                           device=self.device, max_tokens=s.batch * s.seq)
            assert self.graphs.reason is None, self.graphs.reason

    def step(self, micro: list[torch.Tensor]) -> float:
        from trainer.data import Batch
        from trainer.loop import train_step

        batches = []
        for ids in micro:
            b, n = ids.shape
            pos = torch.arange(n).expand(b, n).contiguous()
            batches.append(Batch(ids, ids.clone(), pos, [], b * (n - 1)))
        r = train_step(self.model, batches, self.opt, self.sched, max_grad_norm=1.0,
                       autocast_dtype=torch.bfloat16, device=self.device, dp=self.dp, graphs=self.graphs)
        return r.loss

    def recover(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        # the failed step may have left layer inputs parked in the offloader
        if self.core.model.offloader is not None:
            self.core.model.offloader.clear()

    def close(self) -> None:
        from trainer.distributed import shutdown

        shutdown(self.dp)


class HFStack:
    """The Hugging Face stack as its docs show it: transformers 4-bit (bitsandbytes NF4, double quant),
    prepare_model_for_kbit_training (gradient checkpointing on), PEFT LoRA, SDPA, paged 8-bit AdamW.

    With `liger`, Liger-Kernel's apply_liger_kernel_to_<family>() runs first, as its README shows (RoPE,
    RMSNorm, SwiGLU/GeGLU and fused linear cross-entropy patched into the transformers classes)."""

    world, rank = 1, 0

    def __init__(self, model_dir: Path, s: Settings, liger: bool = False):
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        if liger:
            family = json.loads((model_dir / "config.json").read_text())["model_type"]
            try:
                import liger_kernel.transformers as liger_transformers
            except ImportError as e:
                raise SystemExit(f"liger-kernel is not importable: {e}") from None
            getattr(liger_transformers, f"apply_liger_kernel_to_{family}")()
        self.device = _device()
        torch.manual_seed(0)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        place = {"": 0 if self.device.type == "cuda" else "cpu"}
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant,
                                                     dtype=torch.bfloat16, attn_implementation="sdpa",
                                                     device_map=place)
        self.after_load_gib = _gib("memory_allocated")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=LORA_TARGETS))
        same_lora_init(model)
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = bnb.optim.PagedAdamW8bit(self.params, lr=2e-4)
        self.vocab = model.config.vocab_size

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of one micro-batch, as transformers computes it from `labels`."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return self.model(input_ids=ids, labels=ids).loss

    def step(self, micro: list[torch.Tensor]) -> float:
        total = 0.0
        for ids in micro:
            loss = self.loss(ids.to(self.device)) / len(micro)
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total

    def recover(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        pass


class Unsloth(HFStack):
    """Unsloth as its docs show it: FastLanguageModel.from_pretrained(load_in_4bit=True, dtype=bf16) (NF4,
    double quantization), FastLanguageModel.get_peft_model(r=32, alpha=32, dropout 0, no bias, the seven
    projections, use_gradient_checkpointing="unsloth"), for_training (as its trainer does), paged 8-bit
    AdamW; the step is HFStack's (the same `labels` loss under bf16 autocast, clipping and optimizer),
    so only the model differs.

    `import unsloth` patches transformers and PEFT, so it comes first in this process. Unsloth loads a
    tokenizer beside the model; the random checkpoint has none, so it gets a four-token one of its own
    (`_placeholder_tokenizer`: the benchmark feeds token ids, never text). `max_seq_length` is the longest
    length this run feeds, because Unsloth silently truncates longer inputs; past the config's
    max_position_embeddings it adds linear RoPE scaling, which changes no FLOP. `report()` says whether
    Unsloth's own code ran (`unsloth_report`)."""

    def __init__(self, model_dir: Path, s: Settings):
        self.imported_first = not any(m in sys.modules for m in ("transformers", "peft", "trl"))
        try:
            import unsloth  # noqa: F401  (before transformers and PEFT: it patches them)
        except Exception as e:  # bench/train.py checks this first; a direct run gets the same advice
            raise SystemExit(f"import unsloth failed ({type(e).__name__}: {e}): see bench/README.md, "
                             "'Running the Unsloth comparison'") from None
        import bitsandbytes as bnb
        from unsloth import FastLanguageModel

        self.log = _UnslothLog()
        for name in ("unsloth", "unsloth_zoo"):
            logging.getLogger(name).addHandler(self.log)
        self.device = _device()
        self.max_seq_length = max([s.seq, *((s.lengths or ladder(s.max_seq_limit)) if s.max_seq else ())])
        torch.manual_seed(0)
        printed = io.StringIO()  # its banner names the attention kernels it found (FA2, xformers)
        try:
            with contextlib.redirect_stdout(printed):
                model, _ = FastLanguageModel.from_pretrained(
                    str(model_dir), max_seq_length=self.max_seq_length, dtype=torch.bfloat16, load_in_4bit=True,
                    tokenizer_name=str(_placeholder_tokenizer(model_dir)), fix_tokenizer=False,
                    use_exact_model_name=True)
                self.after_load_gib = _gib("memory_allocated")
                model = FastLanguageModel.get_peft_model(
                    model, r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, bias="none",
                    target_modules=LORA_TARGETS, use_gradient_checkpointing="unsloth", use_rslora=False,
                    loftq_config=None)
        finally:  # stdout carries the result line only; the parent shows stderr when a variant fails
            sys.stderr.write(printed.getvalue())
        self.printed = [line for line in printed.getvalue().splitlines() if line.strip()]
        same_lora_init(model)
        FastLanguageModel.for_training(model)  # what its trainer does: train mode, checkpointing armed
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = bnb.optim.PagedAdamW8bit(self.params, lr=2e-4)
        self.vocab = model.config.vocab_size
        self.loss_functions: collections.Counter | None = None

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.max_seq_length:  # Unsloth would train on the first max_seq_length tokens
            raise ValueError(f"{ids.shape[1]} tokens > max_seq_length {self.max_seq_length}")
        loss = super().loss(ids)
        if self.loss_functions is None:  # the first micro-batch of the run: which Functions built the loss
            self.loss_functions = autograd_functions(loss)
        return loss

    def report(self) -> dict:
        import unsloth
        import unsloth_zoo

        return {"version": unsloth.__version__, "zoo_version": unsloth_zoo.__version__,
                "imported_before_transformers": self.imported_first,
                **unsloth_report(self.model), "log": self.log.lines, "printed": self.printed,
                "loss_autograd_functions": dict(self.loss_functions or {})}


class _UnslothLog(logging.Handler):
    """Keeps what Unsloth logs (its "patched N layers with ..." line among them) for the result."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _placeholder_tokenizer(model_dir: Path) -> Path:
    """`<model_dir>-tokenizer`: a four-token fast tokenizer (unk, bos, eos, pad), made once."""
    out = model_dir.with_name(model_dir.name + "-tokenizer")
    if not (out / "tokenizer_config.json").exists():
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                      unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        tok.save_pretrained(out)
    return out


def _from_unsloth(fn: object) -> bool:
    fn = getattr(fn, "__func__", fn)  # a bound method
    fn = getattr(fn, "func", fn)  # a functools.partial
    return str(getattr(fn, "__module__", None) or "").startswith("unsloth")


def unsloth_report(model: torch.nn.Module) -> dict:
    """Whether Unsloth's code sits where it claims to: per decoder layer, its fused LoRA autograd functions
    for q/k/v, o and the MLP (the check behind its "patched N layers with ..." log line), and the module
    that defines each patched class's forward. `fast_path` is True only when every layer has all three."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    fused = collections.Counter()
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        fused["qkv"] += _from_unsloth(getattr(attn, "apply_qkv", None))
        fused["o"] += _from_unsloth(getattr(attn, "apply_o", None))
        fused["mlp"] += any(_from_unsloth(vars(mlp).get(n)) for n in ("forward", "_unsloth_forward"))
    attn = getattr(layers[0], "self_attn", None) if layers else None
    forwards = {}  # FastModel's route (Gemma 3) compiles patched copies of these instead of fusing per layer
    for m in (layers[0] if layers else None, attn, getattr(layers[0], "mlp", None) if layers else None,
              getattr(attn, "q_proj", None), model.get_base_model()):
        if m is not None:
            forwards[type(m).__name__] = getattr(type(m).forward, "__module__", None)
    try:
        from unsloth.utils.attention_dispatch import select_attention_backend

        attention = select_attention_backend()
    except ImportError as e:  # the module moved: say so instead of guessing
        attention = f"unknown ({e})"
    return {"layers": len(layers), "fused_lora": dict(fused),
            "fast_path": bool(layers) and all(fused[k] == len(layers) for k in ("qkv", "o", "mlp")),
            "class_forwards": forwards, "attention_backend": attention,
            "gradient_checkpointing": str(getattr(model, "_unsloth_gradient_checkpointing", None)),
            "checkpointing_modules": sum(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules())}


def autograd_functions(t: torch.Tensor) -> collections.Counter:
    """Node names of `t`'s autograd graph, counted (checkpointed layers show as one node each)."""
    seen, todo, names = set(), [t.grad_fn], collections.Counter()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names[type(node).__name__] += 1
        todo.extend(n for n, _ in node.next_functions)
    return names


def throughput(v: Ours | HFStack, s: Settings, gen: torch.Generator) -> dict:
    """`s.steps` timed optimizer steps; tokens/s over steps 3.. (the first two warm up kernels, allocator)."""
    losses, times = [], []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(s.steps):
        micro = micro_batches(gen, v.vocab, s.batch, s.seq, s.accum)
        _sync()
        t = time.perf_counter()
        losses.append(v.step(micro))
        _sync()
        times.append(time.perf_counter() - t)
    warm = times[2:] or times
    return {
        "tokens_per_s": v.world * s.batch * s.seq * s.accum * len(warm) / sum(warm),
        "peak_allocated_gib": _gib("max_memory_allocated"),
        "peak_reserved_gib": _gib("max_memory_reserved"),
        "losses": [round(x, 6) for x in losses],
        "step_s": [round(x, 3) for x in times],
    }


def _out_of_memory(e: RuntimeError) -> bool:
    # bitsandbytes and Triton launches can surface an allocation failure as a plain RuntimeError
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _probe(v: Ours | HFStack, seq: int, gen: torch.Generator) -> dict:
    """One optimizer step (accum 1) at batch 1 x `seq`: fits or not, peak allocated, step time."""
    ids = torch.randint(0, v.vocab, (1, seq), generator=gen)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync()
    t = time.perf_counter()
    try:
        v.step([ids])
        fits = True
    except RuntimeError as e:
        if not _out_of_memory(e):
            raise
        fits = False
    if not fits:  # outside the except block, so the traceback's frames (and their activations) are gone
        v.recover()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"seq": seq, "fits": False}
    _sync()
    return {"seq": seq, "fits": True, "peak_allocated_gib": round(_gib("max_memory_allocated"), 3),
            "step_s": round(time.perf_counter() - t, 3)}


def ladder(limit: int) -> list[int]:
    """The lengths `longest_sequence` tries, in order, up to `limit`."""
    return [n for n in LADDER if n <= limit] + list(range(LADDER[-1] + 32768, limit + 1, 32768))


def linear_reach(probes: list[dict]) -> int | None:
    """Length at which the line through the two longest fitting probes' peaks meets the card's memory."""
    fit = sorted((p for p in probes if p["fits"]), key=lambda p: p["seq"])[-2:]
    if len(fit) < 2 or not torch.cuda.is_available():
        return None
    (a, pa), (b, pb) = ((p["seq"], p["peak_allocated_gib"]) for p in fit)
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    slope = (pb - pa) / (b - a)
    return int(b + (total - pb) / slope) if slope > 0 else None


def longest_sequence(v: Ours | HFStack, s: Settings, gen: torch.Generator) -> dict:
    """Try `s.lengths` (default `ladder(s.max_seq_limit)`) upward until a step runs out of memory, then
    one probe halfway back.

    Stops early, and says so, when the next probe's predicted end (last step time scaled by the
    square of the length ratio: attention grows quadratically) would pass `s.time_budget` seconds.
    `linear_reach` is an estimate, not a measurement: the card's memory over the last peaks' slope.
    """
    start = time.perf_counter()
    probes: list[dict] = []
    stopped = None

    def over_budget(seq: int) -> bool:
        last = next((p for p in reversed(probes) if p["fits"]), None)
        predicted = last["step_s"] * (seq / last["seq"]) ** 2 if last else 0.0
        return time.perf_counter() - start + predicted > s.time_budget

    for seq in sorted(s.lengths) or ladder(s.max_seq_limit):
        if over_budget(seq):
            stopped = f"time budget of {s.time_budget:g} s before trying {seq}"
            break
        probes.append(_probe(v, seq, gen))
        if not probes[-1]["fits"]:
            break
    fit = [p for p in probes if p["fits"]]
    if probes and not probes[-1]["fits"]:
        low = fit[-1]["seq"] if fit else 0
        mid = (low + probes[-1]["seq"]) // 2 // 256 * 256
        if low < mid and not over_budget(mid):
            probes.append(_probe(v, mid, gen))
            fit = [p for p in probes if p["fits"]]
        elif low < mid:
            stopped = f"time budget of {s.time_budget:g} s before the bisection probe at {mid}"
    best = max(fit, key=lambda p: p["seq"]) if fit else None
    return {
        "longest": best["seq"] if best else 0,
        "peak_allocated_gib": best["peak_allocated_gib"] if best else None,
        "step_s": best["step_s"] if best else None,
        "limit_reached": bool(probes) and all(p["fits"] for p in probes) and stopped is None,
        "stopped": stopped,
        "search_s": round(time.perf_counter() - start, 1),
        "linear_reach": linear_reach(probes),
        "probes": sorted(probes, key=lambda p: p["seq"]),
    }


def run(name: str, model_dir: Path, s: Settings) -> dict:
    """Build variant `name` (a key of VARIANTS) in this process, measure it, return the measurements."""
    from trainer.loop import collector_frozen

    v = VARIANTS[name](model_dir, s)
    gen = torch.Generator().manual_seed(1 + v.rank)
    result = {"world_size": v.world, "mem_after_load_gib": v.after_load_gib}
    if isinstance(v, Ours):
        result["gc"] = s.gc
    # ours trains as trainer.loop.train does, with the garbage collector's long-lived objects frozen
    with collector_frozen() if isinstance(v, Ours) else contextlib.nullcontext():
        if s.steps:
            result.update(throughput(v, s, gen))
        if s.max_seq:
            result["max_seq"] = longest_sequence(v, s, gen)
    if isinstance(v, Ours) and v.graphs is not None:
        result["graph_replays"] = v.graphs.replays
    if isinstance(v, Unsloth):
        result["unsloth"] = v.report()
    v.close()
    return result


VARIANTS = {
    "ours, Triton kernels": Ours,
    "ours, Triton kernels + CUDA graphs": lambda model_dir, s: Ours(model_dir, s, graphs=True),
    "ours, Triton + CUDA graphs + FP8": lambda model_dir, s: Ours(model_dir, s, graphs=True, fp8=True),
    "ours, plain PyTorch": lambda model_dir, s: Ours(model_dir, s, kernels="off"),
    "HF transformers+PEFT": HFStack,
    "HF+PEFT + Liger-Kernel": lambda model_dir, s: HFStack(model_dir, s, liger=True),
    "Unsloth": Unsloth,
}
# Unsloth: no hub traffic (its usage statistics, a tokenizer lookup), and its compiled modules outside the tree
ENV = {"Unsloth": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1",
                   "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_compiled_cache"}}
# what a variant's process must import, and the pins that provide it; bench/train.py checks before any run
NEEDS = {"Unsloth": ("unsloth", UNSLOTH_PINS)}
