"""Command line: click groups only. Parse, call the library, render. No logic here."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from pathlib import Path

import click

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=False)


def _offline() -> None:
    """Work offline, as the toolkit promises, and say so to the libraries before any of them is imported.

    On a CPU with AVX512-BF16, `import bitsandbytes` asks the Hub (through the `kernels` package) for
    kernels-community/quantization-bitsandbytes; that lookup cannot succeed offline and printed "Failed to load
    CPU gemm_4bit_forward ... could not verify publisher trust status" on every CPU NF4 run. HF_HUB_OFFLINE
    (huggingface_hub reads it once, at its import) stops the lookup; bitsandbytes then falls back to its own
    CPU kernels, and the two loggers' notes about that fallback are not for our users. An HF_HUB_OFFLINE the
    user set stands.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("bitsandbytes.backends.cpu.ops", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _paths_print_as_given() -> None:
    """A path that is not UTF-8 (Linux allows any bytes in a name) prints as its own bytes, as `ls` shows it,
    instead of failing the whole report with a UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")


def friendly_errors(fn):
    """Turn the library's typed errors into one line on stderr and exit 2 (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from healer.errors import HealerError

        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except HealerError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USAGE)
        except OSError as e:  # the machine's side of bad input: a full or read-only disk, a vanished file
            if debug:
                raise
            where = f"{os.fsdecode(e.filename)}: " if e.filename is not None else ""
            click.echo(f"error: {where}{e.strerror or e}", err=True)
            sys.exit(EXIT_USAGE)

    return wrapper


# ----------------------------------------------------------------------------- healer


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def healer(debug: bool) -> None:
    """Diagnose and repair Hugging Face checkpoints before fine-tuning.

    Typical flow: `healer doctor MODEL` to see what is wrong, then `healer fix MODEL -o OUT`.
    """
    _offline()
    _paths_print_as_given()


@healer.command()
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("healer-demo"),
              show_default=True, help="Directory for everything the demo writes (an earlier demo there is replaced).")
@click.option("--steps", type=click.IntRange(min=1), help="Training steps [default: 100 small, 300 tiny].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to train.")
@click.option("--size", type=click.Choice(["small", "tiny"]), default="small", show_default=True,
              help="Model size: small (3.4M parameters) or tiny (0.2M, for a quick check).")
@friendly_errors
def demo(out: Path, steps: int | None, device: str, size: str) -> None:
    """Run the whole flow on a model built here (no download): doctor, fix, doctor, train, export.

    Builds a small Llama checkpoint with planted defects, repairs it, fine-tunes it with QLoRA on a
    generated chat dataset, exports merged safetensors and GGUF, and compares answers before and after.
    """
    from export.demo import run_demo

    run_demo(out, steps=steps, device=device, size=size, console=_console())


@healer.command()
@click.argument("model_dir", type=click.Path(path_type=Path), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (nothing else).")
@click.option("--corpus", type=click.Path(path_type=Path, dir_okay=False),
              help="Extra text file (one string per line) to compare slow and fast tokenizers on.")
@click.option("--check-weights", is_flag=True, help="Also stream every tensor and look for NaN/Inf.")
@click.option("--example", is_flag=True, help="Build a small flawed checkpoint and diagnose it (no download).")
@friendly_errors
def doctor(model_dir: Path | None, as_json: bool, corpus: Path | None, check_weights: bool, example: bool) -> None:
    """Diagnose MODEL_DIR: tokenizer, chat template, embeddings and config.

    Exit status: 0 no errors found, 1 errors found, 2 unreadable input.
    """
    import healer as lib
    from healer.errors import HealerError

    if example == (model_dir is not None):
        raise click.UsageError("give either MODEL_DIR or --example")
    if example:
        from healer.example import build_example

        model_dir = build_example()
        if not as_json:
            _console(stderr=True).print(f"Built example checkpoint at {model_dir}")
    try:
        report = lib.diagnose(model_dir, corpus=corpus, check_weights=check_weights)
    except HealerError:
        raise
    if as_json:
        click.echo(report.to_json())
    else:
        report.render(_console())
    sys.exit(EXIT_FINDINGS if report.has_errors else EXIT_OK)


@healer.group()
def template() -> None:
    """Chat template registry: list entries, show one, render a conversation (with its loss mask)."""


@template.command("list")
def template_list() -> None:
    """List the registry's chat templates."""
    from rich.table import Table
    from rich.text import Text

    from healer.templates import TEMPLATES

    table = Table("name", "end of turn", "emits BOS", "description")
    for t in TEMPLATES.values():
        eot = "eos_token" if t.eot_token is None else t.eot_token
        table.add_row(t.name, Text(eot), "yes" if t.emits_bos else "no", Text(t.description))
    _console().print(table)


@template.command("show")
@click.argument("name")
@friendly_errors
def template_show(name: str) -> None:
    """Print NAME's Jinja source (as it would be written into a checkpoint)."""
    from healer.templates import get

    click.echo(get(name).source)


@template.command("render")
@click.argument("name")
@click.option("--messages", "messages_file", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="JSON file: a list of {role, content} messages, or one ShareGPT/Alpaca/messages record.")
@click.option("--tokenizer", "model_dir", type=click.Path(path_type=Path),
              help="Model dir whose tokenizer supplies bos/eos (and tokens for --mask).")
@click.option("--mask", is_flag=True, help="Highlight the trained (assistant) spans; needs --tokenizer.")
@click.option("--generation-prompt", is_flag=True, help="Append the assistant cue (add_generation_prompt).")
@friendly_errors
def template_render(name: str, messages_file: Path, model_dir: Path | None, mask: bool,
                    generation_prompt: bool) -> None:
    """Render the conversation in --messages with template NAME."""
    from healer.templates import get, highlight, load_messages, render_with_mask

    entry = get(name)
    messages = load_messages(messages_file)
    if mask and model_dir is None:
        raise click.UsageError("--mask needs --tokenizer MODEL_DIR")
    if model_dir is None:
        click.echo(entry.render(messages, add_generation_prompt=generation_prompt), nl=False)
        return
    from healer.model_dir import ModelDir

    masked = render_with_mask(entry, messages, ModelDir(model_dir).hf_tokenizer(),
                              add_generation_prompt=generation_prompt)
    if not mask:
        click.echo(masked.text, nl=False)
    elif sys.stdout.isatty():
        _console().print(highlight(masked.text, masked.spans, markup=True), end="")
    else:
        click.echo(highlight(masked.text, masked.spans, markup=False), nl=False)
    if mask:
        trained = sum(label != -100 for label in masked.labels)
        _console(stderr=True).print(f"{len(masked.input_ids)} tokens, {trained} trained")


@healer.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True,
              help="Where to write the repaired checkpoint (a new directory).")
@click.option("--chatml", is_flag=True, help="Make <|im_start|>/<|im_end|> single tokens and install ChatML.")
@click.option("--template", help="Install this registry chat template (see `healer template list`).")
@click.option("--corpus", type=click.Path(path_type=Path, dir_okay=False),
              help="Extra text file (one string per line) the new tokenizer.json must agree on.")
@click.option("--dataset", type=click.Path(path_type=Path, dir_okay=False),
              help="Training data: also repair untrained rows of tokens it uses.")
@click.option("--all-untrained", is_flag=True, help="Repair every untrained embedding row, used or not.")
@click.option("--grow-embeddings", "out_of_range", flag_value="grow",
              help="Token ids past the embedding: add mean-initialized rows (default for special tokens).")
@click.option("--drop-out-of-range", "out_of_range", flag_value="drop",
              help="Token ids past the embedding: remove those tokens (default for non-special ones).")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the fix report as JSON on stdout.")
@friendly_errors
def fix(model_dir: Path, out: Path, chatml: bool, template: str | None, corpus: Path | None,
        dataset: Path | None, all_untrained: bool, out_of_range: str | None, dry_run: bool, force: bool,
        as_json: bool) -> None:
    """Repair MODEL_DIR into OUT: tokenizer, template, pad/BOS, untrained embeddings.

    MODEL_DIR is never modified. OUT appears only when complete and when doctor no longer
    reports what was fixed (exit 1 otherwise). OUT/healer_report.json lists every change.
    """
    from healer.fix import FixError, repair

    try:
        report = repair(model_dir, out, chatml=chatml, template=template, corpus=corpus, dry_run=dry_run,
                        force=force, all_untrained=all_untrained, dataset=dataset,
                        out_of_range=out_of_range or "auto")
    except FixError as e:
        if as_json:
            click.echo(e.report.to_json())
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_FINDINGS)
    if as_json:
        click.echo(report.to_json())
    else:
        report.render(_console(), dry_run=dry_run)
    sys.exit(EXIT_FINDINGS if report.unfixable else EXIT_OK)


# ----------------------------------------------------------------------------- trainer


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def trainer(debug: bool) -> None:
    """Fine-tune a checkpoint with QLoRA and export the result (GGUF or merged safetensors)."""
    _offline()
    _paths_print_as_given()


def _train_config_options(fn):
    """One option per TrainConfig field; unset options stay None so the YAML file's value stands."""
    from trainer.config import option_specs

    for spec in reversed(option_specs()):
        if spec.type is bool:
            fn = click.option(spec.flag, spec.name, default=None, help=spec.help)(fn)
        else:
            kind = str if spec.type is list else spec.type
            fn = click.option(spec.flag, spec.name, type=kind, default=None, help=spec.help)(fn)
    return fn


@trainer.command("run")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="YAML file of settings (keys = the long option names with underscores); flags override it.")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path),
              help="Continue the run dir RUN_DIR from its latest checkpoint, with its saved settings.")
@click.option("--force", is_flag=True, help="Replace an earlier run (finished or failed) in --out.")
@click.option("--preview", type=click.IntRange(min=1), metavar="N",
              help="Print the first N examples exactly as they would be trained (trained tokens highlighted) "
                   "and exit: no weights are loaded, nothing is written, --out is not needed.")
@click.option("--json", "as_json", is_flag=True,
              help="With --preview: one JSON object per example and line, "
                   '{"row": i, "input_ids": [...], "labels": [...]} (labels -100 where no loss is taken).')
@_train_config_options
@friendly_errors
def trainer_run(config_file: Path | None, resume_dir: Path | None, force: bool, preview: int | None,
                as_json: bool, **settings) -> None:
    """Fine-tune --model on --data with LoRA / QLoRA; write the run dir --out.

    Exit status: 0 trained, 1 the NaN guard stopped the run, 2 bad input.
    """
    from trainer.config import resolve_config
    from trainer.loop import OutOfMemory, TrainingDiverged, train

    if as_json and preview is None:
        raise click.UsageError("--json goes with --preview N")
    if preview is not None:
        from trainer import PREVIEW_REQUIRED

        _preview(resolve_config(config_file, required=PREVIEW_REQUIRED, **settings), preview, as_json)
        return

    if resume_dir is not None:
        from trainer.resume import ResumeError, resume_config

        if config_file is not None:
            raise ResumeError("--resume uses the run's saved config.yaml; drop --config")
        config = resume_config(resume_dir, **settings)
    else:
        config = resolve_config(config_file, **settings)
    try:
        result = train(config, resume=resume_dir is not None, force=force, inputs=[config_file])
    except (TrainingDiverged, OutOfMemory) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_FINDINGS)
    _console().print(result.summary(), highlight=False)


def _preview(config, n: int, as_json: bool) -> None:
    import json

    import trainer
    from trainer.data import trained_runs

    examples, tokenizer = trainer.preview(config, n)
    if as_json:
        for ex in examples:
            click.echo(json.dumps({"row": ex.row, "input_ids": ex.input_ids, "labels": ex.labels}))
        return
    from rich.text import Text

    console = _console()
    for ex in examples:
        trained = sum(label != -100 for label in ex.labels)
        header = f"row {ex.row}: {len(ex.input_ids)} tokens, {trained} trained"
        runs = trained_runs(tokenizer, ex.input_ids, ex.labels)
        if console.is_terminal:
            console.rule(header, style="dim")
            console.print(Text.assemble(*((part, "bold green" if on else "dim") for part, on in runs)))
        else:  # piped: trained spans in [[...]], as `healer template render --mask` marks them
            click.echo(f"--- {header}")
            click.echo("".join(f"[[{part}]]" if on else part for part, on in runs))


@trainer.command("export")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True,
              help="Output: a directory (--format hf) or a .gguf file (--format gguf).")
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf"]), default="hf", show_default=True,
              help="hf: merged safetensors checkpoint dir; gguf: one file for llama.cpp.")
@click.option("--quant", default="f16", show_default=True,
              help="GGUF type: f16, bf16, q8_0, q4_0, or a k-quant mix as llama-quantize makes it: "
                   "q4_k_m, q4_k_s, q5_k_m, q5_k_s, q6_k, q3_k_m, q2_k.")
@click.option("--dtype", default="auto", show_default=True,
              help="hf weights dtype: auto (the base's), bfloat16, float16 or float32.")
@click.option("--base", type=click.Path(path_type=Path), help="Base model dir (default: the one the adapter records).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--verify", is_flag=True,
              help="Then run the GGUF in llama.cpp (needs llama-cpp-python) on the run's first examples against "
                   "the merged model in transformers: token ids, top-1 agreement, KL; writes OUT.verify.json beside it.")
@friendly_errors
def trainer_export(source: Path, out: Path, fmt: str, quant: str, dtype: str, base: Path | None, force: bool,
                   verify: bool) -> None:
    """Merge the LoRA adapter of SOURCE (run dir, adapter dir or model dir) into its base and write OUT."""
    import export

    if fmt == "hf" and quant != "f16":
        raise click.UsageError("--quant applies to --format gguf; use --dtype for hf output")
    if verify:
        from export.verify import require_llama_cpp

        if fmt != "gguf":
            raise export.UnsupportedError("--verify checks a GGUF file in llama.cpp; use it with --format gguf")
        require_llama_cpp()
    notes: list[str] = []
    with warnings.catch_warnings(record=True, action="always", category=export.TokenizationWarning) as caught:
        if fmt == "gguf":
            written = export.to_gguf(source, out, quant, base=base, force=force, notes=notes)
        else:
            written = export.merge(source, out, base=base, dtype=dtype, force=force)
    for w in caught:
        if issubclass(w.category, export.TokenizationWarning):
            click.echo(f"warning: {w.message}", err=True)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    _console().print(f"Wrote {written}", highlight=False)
    if verify:
        _verify_gguf(source, written, base, quant)


def _verify_gguf(source: Path, gguf_path: Path, base: Path | None, quant: str) -> None:
    from rich.table import Table

    from export.verify import result_path, verify_gguf

    result = verify_gguf(source, gguf_path, base=base)
    table = Table("example", "tokens", "ids equal", "top-1", "mean KL", title=f"{gguf_path.name} ({quant}) in "
                  "llama.cpp vs transformers")
    for e in result.examples:
        table.add_row(e.where, str(e.tokens), "yes" if e.ids_equal else f"no (from token {e.first_difference})",
                      f"{e.top1:.1%}", f"{e.kl:.5f}")
    table.add_row("all", str(sum(e.tokens for e in result.examples)), "yes" if result.ids_equal else "no",
                  f"{result.top1:.1%}", f"{result.kl:.5f}")
    _console().print(table)
    _console().print(f"Wrote {result_path(gguf_path)}", highlight=False, soft_wrap=True)
    if not result.ids_equal:
        click.echo("error: llama.cpp tokenizes the run's data differently from training (see the table): the "
                   "served model would see other tokens than it learned; check the chat template and tokenizer",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    healer()
