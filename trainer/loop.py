"""The training run, explicit from top to bottom: checks, data, model, LoRA, the loop, the run dir.

`train(config)` is the whole run; the pieces it calls are public: `train_step` (one optimizer
step over its micro-batches, with the NaN guard's bookkeeping; data-parallel under torchrun),
`run_steps` (the loop, with checkpoints every save_steps), `lr_lambda`, `build_optimizer`,
`repair_untrained_rows`, `check_model`. Resume lives in trainer.resume, gradient checkpointing
modes in trainer.recompute, DDP in trainer.distributed.

Loss normalization: every micro-batch loss is sum / (predicted tokens of the whole step), so
an accumulated step equals one big batch whatever the padding or packing of its parts.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from healer.errors import CheckpointError
from healer.model_dir import ModelDir
from healer.outputs import atomic_file, refuse_overlap, remove, terminate_as_interrupt, write_atomic
from trainer.config import (
    MAX_PLANNED_SEQUENCES,
    ConfigError,
    TrainConfig,
    check_data_file,
    check_template_file,
    model_options,
    validate,
)
from trainer.data import (
    IGNORE_INDEX,
    Batch,
    TrainSequence,
    as_sequences,
    collate,
    pack,
    prepare_model_data,
    step_plan,
)
from trainer.distributed import DataParallel, from_environment, shard_step, shutdown, wrap
from trainer.graphs import MicroBatchGraphs, forward_backward, padded_length
from trainer.lora import LoRASettings, apply_lora, fp8_layers, save_adapter, trainable_parameters
from trainer.options import ModelOptions
from trainer.resume import Progress, save_checkpoint
from trainer.run_dir import RUN_MARKER, check_out_dir, is_run_dir, mark_run

BLOCKING_CHECKS = ("tokenizer.id_out_of_range", "tokenizer.bos_missing")


class TrainingDiverged(Exception):
    """The NaN guard stopped the run: too many consecutive steps with non-finite loss or gradients, or an
    update that made the trained parameters non-finite."""

    def __init__(self, message: str, steps: list[int], rows: list[int]):
        super().__init__(message)
        self.steps, self.rows = steps, rows


class OutOfMemory(Exception):
    """A step ran out of GPU memory; the message names the batch shape and the flags that would help."""


class ModelCheckError(CheckpointError):
    """A doctor finding or an untrained token that training would hit: fix the model first."""


# ----------------------------------------------------------------------------- checks before training


def check_model(model_dir: str | Path) -> None:
    """Stop on doctor findings that would corrupt training (token ids past the embedding, missing BOS)."""
    import healer

    report = healer.diagnose(model_dir)
    for check in BLOCKING_CHECKS:
        for f in report.by_check(check):
            fix = f" Fix: {f.fix}" if f.fix else ""
            raise ModelCheckError(f"{model_dir}: {f.message}{fix}")


def check_lora_rank(r: int, ckpt: ModelDir) -> None:
    """ConfigError for a rank wider than the model's layers: it adds parameters and memory, no capacity."""
    hidden = ckpt.config.get("hidden_size")
    if isinstance(hidden, int) and r > hidden:
        raise ConfigError(f"setting lora_r {r:,} is larger than the model's hidden size {hidden} (a rank above the "
                          f"layer width adds memory, not capacity); choose --lora-r {hidden} or less")


def check_plan_size(cfg: TrainConfig, examples: int) -> None:
    """ConfigError when --epochs over this dataset plans more sequences than MAX_PLANNED_SEQUENCES."""
    planned = cfg.max_steps * cfg.batch_size * cfg.grad_accum if cfg.max_steps else cfg.epochs * examples
    if planned > MAX_PLANNED_SEQUENCES:
        raise ConfigError(f"setting epochs {cfg.epochs:,} over {examples:,} examples plans {planned:,} sequences "
                          f"(at most {MAX_PLANNED_SEQUENCES:,}); lower --epochs or set --max-steps")


def repair_untrained_rows(model: nn.Module, ckpt: ModelDir, token_ids: Iterable[int], *,
                          fix: bool) -> dict[int, str]:
    """Give tokens the data uses whose embedding rows were never trained the mean of the trained rows.

    Detection and the mean read the checkpoint on disk (healer.embeddings); the rows are written
    into the loaded model only. With fix=False such tokens stop the run instead. Returns id -> token.
    """
    from healer.embeddings import (
        EmbeddingNames,
        checkpoint_untrained_rows,
        load_vocab,
        protected_ids,
        stored_matrix,
        trained_mean,
    )

    vocab = load_vocab(ckpt)
    untrained = checkpoint_untrained_rows(ckpt, protected_ids(ckpt, vocab))
    used = sorted(set(untrained) & set(token_ids))
    if not used:
        return {}
    tokens = {i: (vocab.id_to_token(i) if vocab else None) or f"id {i}" for i in used}
    if not fix:
        shown = ", ".join(f"{t} ({i})" for i, t in list(tokens.items())[:5])
        more = f" and {len(used) - 5} more" if len(used) > 5 else ""
        raise ModelCheckError(f"{ckpt.path}: {len(used)} token(s) in the training data have untrained embedding "
                              f"rows: {shown}{more}. Fix: healer fix {ckpt.path} -o OUT, or train without "
                              "--no-fix-untrained to repair them in memory")
    names = EmbeddingNames.of(ckpt)
    idx = torch.tensor(used)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[idx.to(embed.device)] = trained_mean(stored_matrix(ckpt, names.embed), untrained).to(embed)
        head = model.lm_head.weight
        if names.lm_head is not None and head is not embed:
            head[idx.to(head.device)] = trained_mean(stored_matrix(ckpt, names.lm_head), untrained).to(head)
    return tokens


# ----------------------------------------------------------------------------- optimizer and schedule


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device cuda requested but no CUDA GPU is available (use --device cpu)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """bitsandbytes 8-bit paged AdamW on CUDA (optimizer state in 8 bits, paged to CPU under pressure),
    torch AdamW elsewhere."""
    if device.type == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the peak lr at optimizer step s (transformers' linear / cosine schedules with warmup)."""

    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return f


# ----------------------------------------------------------------------------- one step


@dataclass
class StepResult:
    """What one optimizer step did; `bad_rows` are the dataset rows of micro-batches that went non-finite."""

    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    rows: list[int]
    bad_rows: list[int]
    # after the optimizer step: are the trained parameters still finite? A tensor, read by the caller at its
    # next host sync (no extra sync per step); None for a skipped step
    params_finite: torch.Tensor | None = None


def params_finite(params: list[nn.Parameter]) -> torch.Tensor:
    """True (a tensor) when every element of `params` is finite: one multi-tensor norm, no host sync."""
    # the max norm, not the 2-norm: squares of large finite weights would overflow to inf
    return torch.isfinite(torch.nn.utils.get_total_norm(params, math.inf, foreach=True))


def _grads_finite(params: list[nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    # One multi-tensor norm (foreach) instead of a norm per parameter: 448 launches per micro-batch
    # for a 32-layer model were a visible share of the host's time per step.
    return torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True))


@contextmanager
def collector_frozen() -> Iterator[None]:
    """Python's cyclic garbage collector leaves alone everything alive on entry (gc.freeze) until exit.

    A training step is partly host-bound on a fast GPU, so host pauses show in the step time. Without this
    a full collection walked the hundreds of thousands of objects that torch, transformers and the model leave
    alive every few steps, long enough to show in the step time (bench/step_jitter.py; bench/KERNEL_NOTES.md,
    step-to-step spread). Objects made during training are collected as before.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _factor_casts(device: torch.device):
    """On CUDA, LoRA factors cast once per step for the fused projections (lora_fused.cached_factor_casts);
    elsewhere nothing, and Triton stays unimported (the CPU tests choose its interpreter before importing it)."""
    if device.type != "cuda":
        return nullcontext()
    from trainer.kernels.lora_fused import cached_factor_casts

    return cached_factor_casts()


def train_step(model: nn.Module, micro_batches: list[Batch], optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, *, max_grad_norm: float,
               autocast_dtype: torch.dtype, device: torch.device, dp: DataParallel | None = None,
               graphs: MicroBatchGraphs | None = None) -> StepResult:
    """Forward/backward every micro-batch, clip, and step unless the loss or a gradient is non-finite.

    Under data parallelism `model` is the DDP wrapper and `micro_batches` this rank's share: the loss
    is normalized by the step's target tokens on all ranks and reported summed over ranks. With `graphs`
    (single process, CUDA) the micro-batches it accepts run by CUDA graph replay (trainer.graphs).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    n_targets = sum(b.n_targets for b in micro_batches)
    if dp is not None:
        n_targets = int(dp.sum(n_targets, torch.int64))
    n_targets = max(1, n_targets)
    # DDP averages gradients over ranks; the step's gradient is their sum
    scale = dp.world_size if dp is not None else 1
    lr = optimizer.param_groups[0]["lr"]
    losses, finite = [], []
    with _factor_casts(device):
        for i, b in enumerate(micro_batches):
            loss = graphs.run(b, n_targets) if graphs is not None and graphs.accepts(b) else None
            if loss is None:
                # Plain positions are left to the model (the same arange): with position_ids it would look for
                # packed documents on the GPU, and that check waits for the GPU (a host sync per micro-batch).
                plain = b.plain_positions
                b = b.to(device)
                # gradients are all-reduced once per step, in the last micro-batch's backward
                sync = model.no_sync() if dp is not None and i < len(micro_batches) - 1 else nullcontext()
                with sync:
                    loss = forward_backward(model, b.input_ids, b.labels, None if plain else b.position_ids,
                                            n_targets, autocast_dtype, scale)
            losses.append(loss.float())
            # deferred: one host sync per step, not per micro-batch
            finite.append(torch.isfinite(losses[-1]) & _grads_finite(params).to(losses[-1].device))
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    loss = float(dp.sum(torch.stack(losses).sum(), torch.float32)) if dp is not None else float(torch.stack(losses).sum())
    grad_norm = float(norm)
    ok = [bool(f) for f in torch.stack(finite).cpu()]
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    after = None
    if not skipped:
        optimizer.step()
        scheduler.step()
        # a finite gradient can still give a non-finite update (an overflowing lr, a huge Adam step)
        after = params_finite(params)
    # captured graphs accumulate into the gradients where they are: keep them, zeroed
    optimizer.zero_grad(set_to_none=graphs is None)
    rows = [r for b in micro_batches for r in b.rows]
    # gradients accumulate: the first micro-batch that turned them non-finite is the culprit
    first_bad = next((i for i, f in enumerate(ok) if not f), None)
    bad_rows = micro_batches[first_bad].rows if first_bad is not None else (rows if skipped else [])
    return StepResult(loss, grad_norm, lr, skipped, rows, list(bad_rows), after)


def write_loss_plot(path: Path, steps: list[int], losses: list[float]) -> None:
    """Loss per optimizer step as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(steps, losses, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def peak_memory(device: torch.device) -> int:
    """Peak allocated bytes on the GPU, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ----------------------------------------------------------------------------- the run


@dataclass
class RunResult:
    """What a finished run produced and measured."""

    run_dir: Path
    adapter_dir: Path
    steps: int
    losses: list[float]
    skipped_steps: list[int]
    tokens: int
    wall_s: float
    peak_mem: int
    rows: int
    examples: int
    sequences: int
    truncated: int
    dropped: int
    repaired_tokens: dict[int, str] = field(default_factory=dict)
    graphs: dict[str, int] | None = None  # --cuda-graphs: shapes captured, micro-batches replayed of all

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        """A one-screen plain-text summary of the run."""
        lines = [
            f"run dir        {self.run_dir}",
            f"adapter        {self.adapter_dir}",
            f"data           {self.rows} rows -> {self.examples} examples ({self.truncated} truncated, "
            f"{self.dropped} dropped without targets) -> {self.sequences} sequences",
            f"steps          {self.steps} ({len(self.skipped_steps)} skipped by the NaN guard)",
            f"loss           {self.first_loss:.4f} -> {self.final_loss:.4f} (first step -> mean of last 10%)",
            f"throughput     {self.tokens_per_s:,.0f} tokens/s, {self.tokens:,} tokens in {self.wall_s:.1f} s",
            f"peak memory    {self.peak_mem / 2**30:.2f} GiB",
        ]
        if self.graphs is not None:
            g = self.graphs
            lines.append(f"cuda graphs    {g['replayed']:,} of {g['micro_batches']:,} micro-batches replayed, "
                         f"{g['shapes']} shape(s) captured")
        if self.repaired_tokens:
            shown = ", ".join(list(self.repaired_tokens.values())[:6])
            lines.append(f"repaired       {len(self.repaired_tokens)} untrained token rows in memory: {shown}")
        return "\n".join(lines)


class _Progress:
    """A rich progress bar with loss, tokens/s, memory and ETA; plain log lines when not a terminal."""

    def __init__(self, total: int, console, logging_steps: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console, self.logging_steps = console, logging_steps
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("{task.fields[mem]}"), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, disable=not self.live,
        )
        self.task = self.progress.add_task("train", total=total, loss="-", tps="-", mem="-")

    def __enter__(self) -> _Progress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, total: int, loss: float, tps: float, mem: int) -> None:
        mem_s = f"{mem / 2**30:.2f} GiB"
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", tps=f"{tps:,.0f}", mem=mem_s)
        if not self.live and (step % self.logging_steps == 0 or step == total):
            self.console.print(f"step {step}/{total}  loss {loss:.4f}  {tps:,.0f} tok/s  {mem_s}")

    def warn(self, text: str) -> None:
        self.progress.console.print(f"[yellow]{text}[/yellow]")


def train(config: TrainConfig, *, console=None, resume: bool = False, force: bool = False,
          inputs: Iterable[str | Path | None] = ()) -> RunResult:
    """Fine-tune config.model on config.data with LoRA / QLoRA and write the run dir at config.out.

    resume=True continues the run at config.out from its latest checkpoint (from the start if it has
    none); force=True replaces an earlier run there. An --out that is, contains or lies inside the
    model, the data, the template file or one of `inputs` (e.g. the --config file) is refused either way.
    Under torchrun (WORLD_SIZE > 1) the ranks train data-parallel and only rank 0 writes.
    """
    cfg = validate(config)
    check_data_file(cfg.data)
    check_template_file(cfg.template)
    template_file = cfg.template if cfg.template and Path(cfg.template).is_file() else None
    refuse_overlap(cfg.out, [cfg.model, cfg.data, template_file, *inputs], flag="--out")
    dp = from_environment(cfg.device)
    try:
        with terminate_as_interrupt():  # a SIGTERMed run is marked failed in run.json like any other
            return _train(cfg, console, resume, dp, force)
    finally:
        shutdown(dp)


def _train(cfg: TrainConfig, console, resume: bool, dp: DataParallel | None, force: bool = False) -> RunResult:
    from rich.console import Console

    from trainer.models import ModelSpec, load_model
    from trainer.resume import ResumeError, check_ranks, latest_checkpoint

    main = dp is None or dp.is_main
    console = console or Console(stderr=True, quiet=not main)
    out = check_out_dir(cfg.out, resume=resume, force=force)
    if resume and not is_run_dir(out):
        raise ResumeError(f"{out}: not a trainer run dir; nothing to resume")
    if resume and (latest := latest_checkpoint(out)) is not None:
        check_ranks(latest, dp)  # before minutes of model loading
    if dp is not None:
        dp.barrier()  # every rank has looked at the run dir before rank 0 writes to it
    model_dir = Path(cfg.model).resolve()
    ckpt = ModelDir(model_dir)
    ModelSpec.from_config(ckpt.config)  # an unsupported architecture fails before any work
    check_lora_rank(cfg.lora_r, ckpt)
    check_model(model_dir)
    tokenizer = ckpt.hf_tokenizer()
    _, data = prepare_model_data(ckpt, cfg.data, cfg.template, max_seq_len=cfg.max_seq_len,
                                 train_on_inputs=cfg.train_on_inputs)
    if data.truncated:
        console.print(f"{data.truncated} of {data.rows} examples were longer than {cfg.max_seq_len} tokens "
                      f"and were truncated")
    if data.dropped_no_targets:
        console.print(f"{data.dropped_no_targets} examples had no assistant tokens left and were dropped")
    check_plan_size(cfg, len(data.examples))  # before the model is loaded or the plan allocated

    device = dp.device if dp is not None else resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    options = model_options(cfg)
    if cfg.fp8:
        _check_fp8(device, dtype, options)  # before minutes of model loading
    torch.manual_seed(cfg.seed)
    model = load_model(model_dir, dtype=dtype, device=device, load_in_4bit=cfg.load_in_4bit, options=options)
    vocab_rows = model.model.embed_tokens.num_embeddings
    too_big = max(data.token_ids())
    if too_big >= vocab_rows:
        raise ModelCheckError(f"{model_dir}: the data encodes token id {too_big}, past the model's {vocab_rows} "
                              f"embedding rows. Fix: healer fix {model_dir} -o OUT")
    repaired = repair_untrained_rows(model, ckpt, data.token_ids(), fix=cfg.fix_untrained)
    if repaired:
        console.print(f"repaired {len(repaired)} untrained embedding row(s) in memory with the mean of the trained "
                      f"rows: {', '.join(list(repaired.values())[:8])}")
    settings = apply_lora(model, LoRASettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora,
                                              list(cfg.target_modules), list(cfg.modules_to_save)))
    if cfg.fp8:
        marked = fp8_layers(model)
        console.print(f"--fp8: forward products of {marked} NF4 base layers in e4m3 (backward in {str(dtype)[6:]})")
    model.train()

    sequences = pack(data.examples, cfg.max_seq_len) if cfg.packing else as_sequences(data.examples)
    plan = step_plan(len(sequences), batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, epochs=cfg.epochs,
                     max_steps=cfg.max_steps, seed=cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    resolved = TrainConfig(**{**cfg.to_dict(), "model": str(model_dir), "data": str(Path(cfg.data).resolve()),
                              "out": str(out.resolve()), "target_modules": settings.target_modules})
    if main and force and not resume and is_run_dir(out):
        remove(out)  # --force: the earlier run goes (check_out_dir allows only a run dir here)
    created = not out.exists()
    try:
        if main:
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / RUN_MARKER, json.dumps({"kind": "trainer-run", "model": str(model_dir),
                                                       "started": datetime.now(UTC).isoformat(),
                                                       "status": "running", "pid": os.getpid()}) + "\n")
            write_atomic(out / "config.yaml", resolved.to_yaml())
        run = _run(cfg, model, settings, data, sequences, plan, pad_id, device, dtype, out, resume, console, dp,
                   model_dir, repaired)
    except BaseException as e:
        if main and created and not is_run_dir(out):
            remove(out)  # failed before run.json was written (e.g. a full disk): nothing worth keeping
        elif main:
            mark_run(out, "failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise
    if main:
        mark_run(out, "finished")
    return run


def _run(cfg: TrainConfig, model: nn.Module, settings, data, sequences: list[TrainSequence], plan, pad_id: int,
         device: torch.device, dtype: torch.dtype, out: Path, resume: bool, console, dp: DataParallel | None,
         model_dir: Path, repaired: dict) -> RunResult:
    """The part of a run that writes into the run dir: optimizer, steps, adapter, plot and summary."""
    from trainer.resume import latest_checkpoint, load_checkpoint

    main = dp is None or dp.is_main

    params = trainable_parameters(model)
    optimizer = build_optimizer(params, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, len(plan)))
    progress = Progress()
    latest = latest_checkpoint(out) if resume else None
    if latest is not None:
        progress = load_checkpoint(latest, model, optimizer, scheduler, dp)
        console.print(f"resuming from {latest} (step {progress.step} of {len(plan)})")
    # once the run can start (a refused resume stays one line): what print(model) shows at its top
    console.print(f"code paths: {model.options}", soft_wrap=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trained = wrap(model, dp) if dp is not None else model
    with collector_frozen():
        ran = run_steps(trained, sequences, plan, optimizer, scheduler, cfg, out=out, pad_id=pad_id, device=device,
                  dtype=dtype, console=console, progress=progress, dp=dp,
                  save=lambda: save_checkpoint(out, model, optimizer, scheduler, progress, settings=settings,
                                               base_model=str(model_dir), dp=dp))
    adapter_dir = out / "adapter"
    steps = [i + 1 for i, (loss, skipped) in enumerate(progress.history) if not skipped]
    losses = [loss for loss, skipped in progress.history if not skipped]
    run = RunResult(out, adapter_dir, len(plan), losses, progress.skipped, progress.tokens, progress.wall_s,
                    peak_memory(device), data.rows, len(data.examples), len(sequences), data.truncated,
                    data.dropped_no_targets, repaired, ran["graphs"])
    if not bool(params_finite(params)):  # the guard's last word: never a non-finite adapter
        raise TrainingDiverged(_diverged_params_message(len(plan), out), [len(plan)], [])
    if main:
        save_adapter(model, adapter_dir, settings, base_model=str(model_dir))
        write_loss_plot(out / "loss.png", steps, losses)
        write_atomic(out / "summary.txt", run.summary() + "\n")
    return run


def run_steps(model: nn.Module, sequences: list[TrainSequence], plan: list[list[list[int]]],
              optimizer: torch.optim.Optimizer, scheduler, cfg: TrainConfig, *, out: Path, pad_id: int,
              device: torch.device, dtype: torch.dtype, console, progress: Progress | None = None,
              dp: DataParallel | None = None, save=None) -> dict[str, Any]:
    """Run the steps of `plan` after progress.step, appending to metrics.jsonl (rank 0) and calling
    `save()` every cfg.save_steps steps (on every rank: it gathers their random states to rank 0);
    raise TrainingDiverged after max_bad_steps bad steps in a row, or once an update has made the trained
    parameters non-finite (before any later checkpoint is saved).

    `progress` is updated in place; the result holds its history, skipped steps, tokens and wall time, and
    with --cuda-graphs the shapes captured and micro-batches replayed (else None)."""
    progress = progress if progress is not None else Progress()
    main = dp is None or dp.is_main
    bad_run = [list(rows) for rows in progress.bad_run_rows]
    start = time.perf_counter()
    metrics_path = out / "metrics.jsonl"
    if main:
        kept = []
        if progress.step and metrics_path.is_file():
            kept = [line for line in metrics_path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= progress.step]
        write_atomic(metrics_path, "".join(line + "\n" for line in kept))
    metrics = open(metrics_path, "a", encoding="utf-8") if main else None
    graphs = _graphs(model, optimizer, cfg, device, dtype, dp, console)
    micro_batches = 0
    pending: tuple[int, torch.Tensor] | None = None  # (step, its params_finite flag), read one step late

    def check_params() -> None:
        nonlocal pending
        if pending is not None and not bool(pending[1]):
            raise TrainingDiverged(_diverged_params_message(pending[0], out), [pending[0]], [])
        pending = None

    try:
        with _Progress(len(plan), console, cfg.logging_steps) as bar:
            for step in range(progress.step + 1, len(plan) + 1):
                t0 = time.perf_counter()
                micro = plan[step - 1]
                # unpacked rows of lengths that repeat, for graph replay
                pad_up_to = cfg.max_seq_len if graphs is not None and not cfg.packing else None
                batches = _micro_batches(sequences, micro, pad_id, cfg.batch_size, dp, pad_up_to)
                micro_batches += len(batches)
                try:
                    r = train_step(model, batches, optimizer, scheduler, max_grad_norm=cfg.max_grad_norm,
                                   autocast_dtype=dtype, device=device, dp=dp, graphs=graphs)
                except torch.OutOfMemoryError:
                    raise OutOfMemory(_oom_message(step, batches, cfg, out)) from None
                check_params()  # the previous step's update, now that this step has synced
                if r.params_finite is not None:
                    pending = (step, r.params_finite)
                step_tokens = sum(len(sequences[i].input_ids) for mb in micro for i in mb)
                tps = step_tokens / max(time.perf_counter() - t0, 1e-9)
                mem = peak_memory(device)
                progress.step, progress.tokens = step, progress.tokens + step_tokens
                progress.history.append((r.loss, r.skipped))
                record: dict[str, Any] = {"step": step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm,
                                          "tokens_per_s": round(tps, 1), "peak_mem": mem}
                if r.skipped:
                    progress.skipped.append(step)
                    bad_run.append(list(r.bad_rows))
                    record.update(skipped=True, rows=sorted(r.bad_rows))
                    bar.warn(f"step {step}: non-finite loss or gradient (loss {r.loss}, grad norm {r.grad_norm}); "
                             f"optimizer step skipped; dataset rows {_rows(r.bad_rows)}")
                else:
                    bad_run = []
                progress.bad_run_rows = bad_run
                if metrics is not None and (r.skipped or step % cfg.logging_steps == 0 or step == len(plan)):
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                bar.update(step, len(plan), r.loss, tps, mem)
                if len(bad_run) >= cfg.max_bad_steps:
                    rows = sorted({x for b in bad_run for x in b})
                    first, last = step - len(bad_run) + 1, step
                    raise TrainingDiverged(
                        f"{len(bad_run)} consecutive steps ({first}-{last}) had a non-finite loss or gradient; the "
                        f"run stopped. Dataset rows involved (0-based): {_rows(rows)}", list(range(first, last + 1)),
                        rows)
                if save is not None and cfg.save_steps and step % cfg.save_steps == 0:
                    check_params()  # a checkpoint is only ever written from finite parameters
                    save()
            check_params()
    finally:
        if metrics is not None:
            metrics.close()
    progress.wall_s = progress.wall_s + time.perf_counter() - start
    graph_counts = None if graphs is None else {"shapes": len(graphs.captured), "replayed": graphs.replays,
                                                "micro_batches": micro_batches}
    return {"history": progress.history, "skipped": progress.skipped, "tokens": progress.tokens,
            "wall_s": progress.wall_s, "graphs": graph_counts}


def _diverged_params_message(step: int, out: Path) -> str:
    from trainer.resume import latest_checkpoint

    latest = latest_checkpoint(out)
    kept = (f"; the last checkpoint {latest} holds finite parameters (trainer run --resume {out} continues from it)"
            if latest is not None else "; no adapter was written")
    return (f"step {step}'s optimizer update made the trained parameters non-finite (NaN or Inf); the run stopped"
            f"{kept}. Lower --lr or set --max-grad-norm")


def _check_fp8(device: torch.device, dtype: torch.dtype, options: ModelOptions) -> None:
    """A ConfigError saying why --fp8 cannot run here, if it cannot."""

    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError("--fp8 needs a CUDA GPU with FP8 matmuls (compute capability 8.9 or newer: Ada, Hopper)")
    if dtype != torch.bfloat16 or not options.use_kernels(torch.empty(0, device=device)):
        raise ConfigError("--fp8 runs in the fused kernels under bfloat16 (--dtype bfloat16 or auto; not with "
                          "--kernels off)")


def _graphs(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device,
            dtype: torch.dtype, dp: DataParallel | None, console) -> MicroBatchGraphs | None:
    """The CUDA graphs --cuda-graphs asks for, or None (with a line saying why) where they cannot serve."""
    if not cfg.cuda_graphs:
        return None
    why = ("they need a CUDA GPU" if device.type != "cuda" else
           "not under data parallelism" if dp is not None else None)
    graphs = None
    if why is None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        # rows are padded up to max_seq_len at most, so no micro-batch is larger than this
        graphs = MicroBatchGraphs(model, params, autocast_dtype=dtype, device=device,
                                  max_tokens=cfg.batch_size * cfg.max_seq_len)
        why = graphs.reason
    if why is not None:
        console.print(f"--cuda-graphs is off for this run: {why}")
        return None
    if graphs.offloader is not None:
        decoder = model.model
        host = len(decoder.layers) * graphs.offloader.static_capacity * decoder.embed_tokens.weight.element_size()
        console.print(f"--cuda-graphs with offload: the layer inputs go to {host / 2**30:.2f} GiB of pinned host "
                      f"memory (layers x batch size x max sequence length x hidden)")
    return graphs


def _oom_message(step: int, batches: list[Batch], cfg: TrainConfig, out: Path) -> str:
    from trainer.resume import latest_checkpoint

    shapes = sorted({tuple(b.input_ids.shape) for b in batches}, reverse=True)
    shown = ", ".join(f"{n} x {t}" for n, t in shapes)
    helps = []
    if cfg.gradient_checkpointing != "offload":
        helps.append("--gradient-checkpointing offload")
    if cfg.batch_size > 1:
        helps.append(f"--batch-size {max(1, cfg.batch_size // 2)} --grad-accum {cfg.grad_accum * 2}")
    helps.append(f"--max-seq-len {max(1, cfg.max_seq_len // 2)}")
    latest = latest_checkpoint(out)
    kept = (f"; the last checkpoint {latest} is intact (trainer run --resume {out} continues from it)"
            if latest is not None else "")
    return (f"out of GPU memory at step {step} on micro-batches of {shown} tokens (sequences x sequence length, "
            f"max_seq_len {cfg.max_seq_len}); try {', or '.join(helps)}{kept}")


def _micro_batches(sequences: list[TrainSequence], step: list[list[int]], pad_id: int, batch_size: int,
                   dp: DataParallel | None, pad_up_to: int | None = None) -> list[Batch]:
    """Each micro-batch's rows, padded to its longest; with `pad_up_to` (max_seq_len), to the length
    trainer.graphs.padded_length gives (four lengths per doubling, up to pad_up_to)."""
    if dp is None:
        batches = []
        for mb in step:
            rows = [sequences[i] for i in mb]
            width = padded_length(max(len(s.input_ids) for s in rows), pad_up_to) if pad_up_to else None
            batches.append(collate(rows, pad_id, width))
        return batches
    mine = shard_step(step, dp.rank, dp.world_size, batch_size)
    if mine:
        return [collate([sequences[i] for i in mb], pad_id) for mb in mine]
    # fewer sequences than ranks: this rank still joins the gradient all-reduce, with nothing to learn
    first = sequences[step[0][0]]
    idle = TrainSequence(first.input_ids, [IGNORE_INDEX] * len(first.input_ids), first.position_ids, ())
    return [collate([idle], pad_id)]


def _rows(rows: list[int], limit: int = 20) -> str:
    rows = sorted(set(rows))
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return ", ".join(map(str, rows[:limit])) + more

