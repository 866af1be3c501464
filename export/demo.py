"""`healer demo`: the whole flow on a model built here, with no download.

A flawed checkpoint (healer.example) -> doctor -> fix --chatml -> doctor -> QLoRA training on
a generated chat dataset (reverse the order of three words) -> export to merged safetensors and
GGUF q8_0 -> the answers of the model before and after training to questions held out of the
dataset. Each step calls the public function its command wraps and prints that command, so the
output doubles as a walk through the CLI. `run_demo` returns what it made and measured, and
writes the same as JSON into OUT/healer-demo.json.

It lives in export, the package on top (export imports trainer and healer): the demo uses all three,
and healer, the shared core, imports neither trainer nor export.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from healer.errors import HealerError, OutputError
from healer.outputs import write_atomic

MARKER = "healer-demo.json"
GGUF_QUANT = "q8_0"
N_ROWS, N_HELD_OUT = 3000, 20
MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class DemoSize:
    """A model size for the demo and the training steps that make learning visible at that size."""

    hidden_size: int
    num_layers: int
    steps: int


# Steps chosen on CPU: by these counts the loss has fallen below 1% of its first value and all 20 held-out
# questions come back reversed (the run's figures: bench/README.md, demo).
SIZES = {"tiny": DemoSize(64, 2, 300), "small": DemoSize(256, 4, 100)}

# The base is random (std 0.02) and the final RMSNorm fixes the hidden scale, so a frozen lm_head
# caps the logits near 1 and LoRA alone stalls near the uniform loss; training lm_head too (32k values at
# hidden 64) gets the loss moving in the same steps.
TRAIN_SETTINGS: dict[str, Any] = {
    "batch_size": 16, "grad_accum": 1, "lr": 5e-3, "lora_r": 16, "lora_alpha": 16.0, "warmup_steps": 10,
    "max_seq_len": 64, "modules_to_save": ["lm_head"],
}


@dataclass
class DemoResult:
    """Where the demo wrote everything, what doctor and training reported, and how long each step took."""

    out: Path
    flawed: Path
    fixed: Path
    data: Path
    run_dir: Path
    loss_plot: Path
    merged: Path
    gguf: Path
    parameters: int
    errors_before: int
    errors_after: int
    changes: int
    steps: int
    first_loss: float
    final_loss: float
    question: str
    expected: str
    answer_before: str
    answer_after: str
    held_out: int
    correct_before: int
    correct_after: int
    gguf_tensors: int
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


class _Steps:
    """Numbered step headers with the equivalent command, a spinner while a step runs, and its time."""

    def __init__(self, console, total: int):
        self.console, self.total, self.done = console, total, 0
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, key: str, title: str, command: str | None = None, *, spinner: bool = True) -> Iterator[None]:
        from rich.markup import escape

        self.done += 1
        self.console.print()
        self.console.rule(f"[bold]{self.done}/{self.total}  {escape(title)}", align="left")
        if command:
            self.console.print(f"[bold]{escape(command)}[/]", highlight=False)
        start = time.perf_counter()
        if spinner:
            with self.console.status(f"{escape(title)}..."):
                yield
        else:
            yield
        self.timings[key] = round(time.perf_counter() - start, 2)
        self.console.print(f"[dim]({self.timings[key]:.1f} s)[/]", highlight=False)


def run_demo(out: str | Path = "healer-demo", *, steps: int | None = None, device: str = "auto",
             size: str = "small", console=None) -> DemoResult:
    """Build a flawed model in `out`, diagnose, repair, fine-tune and export it, printing each step."""
    from rich.console import Console

    if size not in SIZES:
        raise HealerError(f"demo size {size!r}: choose one of {', '.join(SIZES)}")
    if steps is not None and steps < 1:
        raise HealerError(f"--steps must be at least 1, got {steps}")
    if device not in ("auto", "cpu", "cuda"):
        raise HealerError(f"device {device!r}: choose auto, cpu or cuda")
    from trainer.loop import resolve_device

    resolve_device(device)  # no CUDA for --device cuda: say so before minutes of work, not after
    preset = SIZES[size]
    steps = steps or preset.steps
    console = console or Console()
    started = time.perf_counter()
    out = _prepare_out(Path(out))
    paths = {"flawed": out / "flawed-model", "fixed": out / "fixed-model", "data": out / "reverse-chat.jsonl",
             "run": out / "run", "merged": out / "merged", "gguf": out / f"model-{GGUF_QUANT}.gguf"}
    console.print("[bold]healer demo[/]: doctor -> fix -> train -> export on a model built here (no download); "
                  f"outputs in [bold]{out}[/]", highlight=False)
    s = _Steps(console, 7)
    with _quiet_transformers():
        outputs = _run_steps(s, console, paths, preset, steps, device)
    result = DemoResult(out=out, **outputs, timings={**s.timings, "total": round(time.perf_counter() - started, 2)})
    _write_json(out / MARKER, {"kind": "healer-demo", **result.to_dict()})
    render_summary(console, result)
    return result


def _run_steps(s: _Steps, console, paths: dict[str, Path], preset: DemoSize, steps: int,
               device: str) -> dict[str, Any]:
    import healer
    from healer.example import build_example, write_chat_dataset
    from healer.fix import repair
    from healer.model_dir import ModelDir

    with s.step("build", "Build a flawed checkpoint"):
        build_example(paths["flawed"], hidden_size=preset.hidden_size, num_layers=preset.num_layers)
        flawed = ModelDir(paths["flawed"])
        parameters = sum(math.prod(flawed.tensor_shape(n)) for n in flawed.tensor_names())
        console.print(f"Llama architecture, {parameters / 1e6:.1f}M parameters (hidden {preset.hidden_size}, "
                      f"{preset.num_layers} layers), a sentencepiece tokenizer trained just now on generated text.\n"
                      "Planted defects: slow tokenizer only, ChatML markers that are not tokens, BOS not added, "
                      "pad = eos, untrained embedding rows.", highlight=False)

    with s.step("doctor", "Diagnose it", f"$ healer doctor {_q(paths['flawed'])}"):
        before = healer.diagnose(paths["flawed"])
        before.render(console)

    with s.step("fix", "Repair it", f"$ healer fix {_q(paths['flawed'])} -o {_q(paths['fixed'])} --chatml"):
        fixed = repair(paths["flawed"], paths["fixed"], chatml=True)
        fixed.render(console, title="healer fix: changes")

    with s.step("doctor_after", "Diagnose the repaired checkpoint", f"$ healer doctor {_q(paths['fixed'])}"):
        after = healer.diagnose(paths["fixed"])
        after.render(console)

    from trainer import TrainConfig, train

    held_out = write_chat_dataset(paths["data"], N_ROWS, N_HELD_OUT)
    question, answer = held_out[0]
    config = TrainConfig(model=str(paths["fixed"]), data=str(paths["data"]), out=str(paths["run"]),
                         max_steps=steps, device=device, logging_steps=max(1, steps // 10), **TRAIN_SETTINGS)
    with s.step("train", "Fine-tune with QLoRA", "$ " + train_command(config), spinner=False):
        console.print(f"dataset: {N_ROWS} generated conversations (reverse the order of three words) in "
                      f"{paths['data'].name}; {len(held_out)} questions held out of it, e.g. {question!r} -> "
                      f"{answer!r}", highlight=False)
        run = train(config, console=console)
        console.print(f"loss {run.first_loss:.3f} -> {run.final_loss:.3f} ({run.final_loss / run.first_loss:.1%} of "
                      f"the first step) in {run.steps} steps; loss curve: [bold]{run.run_dir / 'loss.png'}[/]",
                      highlight=False)

    with s.step("export", "Export merged safetensors and GGUF",
                f"$ trainer export {_q(paths['run'])} -o {_q(paths['merged'])}\n"
                f"$ trainer export {_q(paths['run'])} -o {_q(paths['gguf'])} --format gguf --quant {GGUF_QUANT}"):
        import export

        export.merge(paths["run"], paths["merged"])
        export.to_gguf(paths["run"], paths["gguf"], GGUF_QUANT)
        tensors = gguf_tensor_count(paths["gguf"])
        console.print(f"merged safetensors: [bold]{paths['merged']}[/]\nGGUF {GGUF_QUANT}: [bold]{paths['gguf']}[/] "
                      f"({tensors} tensors, {paths['gguf'].stat().st_size / 2**20:.1f} MiB)", highlight=False)

    with s.step("answers", "Ask questions held out of training, before and after"):
        questions = [q for q, _ in held_out]
        answers_before = greedy_answers(paths["fixed"], questions)
        answers_after = greedy_answers(paths["merged"], questions)
        correct_before = sum(a == e for a, (_, e) in zip(answers_before, held_out))
        correct_after = sum(a == e for a, (_, e) in zip(answers_after, held_out))
        render_answers(console, question, answer, answers_before[0], answers_after[0],
                       (correct_before, correct_after, len(held_out)))

    return {
        "flawed": paths["flawed"], "fixed": paths["fixed"], "data": paths["data"], "run_dir": run.run_dir,
        "loss_plot": run.run_dir / "loss.png", "merged": paths["merged"], "gguf": paths["gguf"],
        "parameters": parameters, "errors_before": before.summary()["error"],
        "errors_after": after.summary()["error"], "changes": len(fixed.changes), "steps": run.steps,
        "first_loss": run.first_loss, "final_loss": run.final_loss, "question": question, "expected": answer,
        "answer_before": answers_before[0], "answer_after": answers_after[0], "held_out": len(held_out),
        "correct_before": correct_before, "correct_after": correct_after, "gguf_tensors": tensors,
    }


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' save/load progress bars (instant at this size) between the demo's own displays."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def train_command(config) -> str:
    """The `trainer run` command line equivalent to `config` (flags for the settings that differ from defaults)."""
    from trainer.config import TrainConfig, option_specs

    default = TrainConfig()
    parts = ["trainer run"]
    for spec in option_specs():
        value = getattr(config, spec.name)
        if value == getattr(default, spec.name):
            continue
        if spec.type is bool:
            on, _, off = spec.flag.partition("/")
            parts.append(on if value else off)
        else:
            parts.append(f"{spec.flag} {shlex.quote(','.join(value) if isinstance(value, list) else str(value))}")
    return " ".join(parts)


def greedy_answers(model_dir: str | Path, questions: list[str]) -> list[str]:
    """Greedy answers of the HF checkpoint at `model_dir` (loaded by transformers) to one-turn chats.

    Prompts follow the BOS rule training used (healer.tokenizers.bos), as llama.cpp serves them.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from healer.model_dir import ModelDir

    tokenizer = ModelDir(model_dir).hf_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers = []
    with torch.no_grad():
        for ids in prompt_ids(model_dir, questions):
            prompt = torch.tensor([ids])
            # generation_config.json (written by fix) stops at <|im_end|> as well as </s>
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            answers.append(tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip())
    return answers


def prompt_ids(model_dir: str | Path, questions: list[str]) -> list[list[int]]:
    """The served prompt of each one-turn chat: template with the generation prompt, BOS by the rule."""
    from healer.model_dir import ModelDir
    from healer.tokenizers.bos import bos_first, chat_ids

    ckpt = ModelDir(model_dir)
    tokenizer = ckpt.hf_tokenizer()
    bos = bos_first(ckpt)
    return [chat_ids(tokenizer, tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                              add_generation_prompt=True), bos)
            for q in questions]


def gguf_tensor_count(path: str | Path) -> int:
    """Number of tensors in the GGUF file at `path`, read back with gguf's reader."""
    import gguf

    return len(gguf.GGUFReader(path).tensors)


def render_answers(console, question: str, expected: str, before: str, after: str,
                   correct: tuple[int, int, int]) -> None:
    """One held-out question with the answers before and after training, and the held-out score."""
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    for label, text in (("question", question), ("expected", expected), ("before", before), ("after", after)):
        # json.dumps shows the control bytes an untrained model emits as escapes, not as terminal noise
        table.add_row(Text(label, style="bold"), Text(json.dumps(text, ensure_ascii=False)))
    console.print(table)
    console.print(f"held-out questions answered exactly: {correct[0]}/{correct[2]} before training, "
                  f"{correct[1]}/{correct[2]} after (greedy, transformers on the merged safetensors)",
                  highlight=False)


def render_summary(console, result: DemoResult) -> None:
    """Where everything is, and the time each step took."""
    from rich.table import Table

    console.print()
    table = Table(title="healer demo: outputs", title_justify="left", expand=False)
    table.add_column("what", no_wrap=True)
    table.add_column("path", overflow="fold")
    for what, path in (("flawed checkpoint", result.flawed), ("repaired checkpoint", result.fixed),
                       ("chat dataset", result.data), ("training run (adapter, metrics)", result.run_dir),
                       ("loss curve", result.loss_plot), ("merged safetensors", result.merged),
                       (f"GGUF {GGUF_QUANT}", result.gguf), ("this summary (JSON)", result.out / MARKER)):
        table.add_row(what, str(path))
    console.print(table)
    times = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items() if k != "total")
    console.print(f"done in {result.timings['total']:.1f} s ({times})", highlight=False)


def _prepare_out(out: Path) -> Path:
    """An empty `out`; a previous demo's output (it has MARKER) is replaced, anything else refused."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise OutputError(f"{out}: directory is not empty and holds no earlier demo; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / MARKER, {"kind": "healer-demo", "started": datetime.now(UTC).isoformat()})
    return out


def _q(path: Path) -> str:
    return shlex.quote(str(path))


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
