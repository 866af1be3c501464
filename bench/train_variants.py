"""The variants of bench/train.py, each run in its own process, and what they measure.

Every variant loads the same random-weight checkpoint in 4-bit, starts LoRA from the same A matrices
(`same_lora_init`; B is zero), trains on the same micro-batches (`micro_batches` from one seeded
generator) and is measured by the same code: `throughput` (timed optimizer steps) and, with
--max-seq, `longest_sequence` (one step at batch 1 per length until the GPU runs out of memory).
A variant is an object with `vocab`, `after_load_gib`, `step(micro_batches) -> loss` and
`recover()` (drop what a step that ran out of memory left behind).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
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

    def __init__(self, model_dir: Path, s: Settings, graphs: bool = False, fp8: bool = False):
        import bitsandbytes as bnb

        from trainer.checkpointing import set_gradient_checkpointing
        from trainer.distributed import from_environment, wrap
        from trainer.lora import LoRASettings, apply_lora, trainable_parameters, use_fp8_products
        from trainer.models import load_model

        # under torchrun: one rank per GPU, each with its own micro-batches
        self.dp = from_environment("cuda")
        self.device = self.dp.device if self.dp else _device()
        self.world, self.rank = (self.dp.world_size, self.dp.rank) if self.dp else (1, 0)
        torch.manual_seed(0)
        model = load_model(model_dir, dtype=torch.bfloat16, device=str(self.device), load_in_4bit=True)
        self.after_load_gib = _gib("memory_allocated")
        apply_lora(model, LoRASettings(r=LORA_RANK, alpha=float(LORA_RANK), target_modules=LORA_TARGETS))
        same_lora_init(model)
        if fp8:  # as trainer run --fp8
            use_fp8_products(model)
        self.gc = s.gc
        self.set_gc = set_gradient_checkpointing
        set_gradient_checkpointing(model, s.gc)
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
        # a fresh offloader: the failed step may have left layer inputs parked in the old one
        self.set_gc(self.core, self.gc)

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

    def step(self, micro: list[torch.Tensor]) -> float:
        total = 0.0
        for ids in micro:
            ids = ids.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = self.model(input_ids=ids, labels=ids).loss / len(micro)
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
    v.close()
    return result


VARIANTS = {
    "ours, Triton kernels": Ours,
    "ours, Triton kernels + CUDA graphs": lambda model_dir, s: Ours(model_dir, s, graphs=True),
    "ours, Triton + CUDA graphs + FP8": lambda model_dir, s: Ours(model_dir, s, graphs=True, fp8=True),
    "ours, plain PyTorch": Ours,  # the parent sets TRAINER_KERNELS=0 for this one
    "HF transformers+PEFT": HFStack,
    "HF+PEFT + Liger-Kernel": lambda model_dir, s: HFStack(model_dir, s, liger=True),
}
ENV = {"ours, plain PyTorch": {"TRAINER_KERNELS": "0"}}
