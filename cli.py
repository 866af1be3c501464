"""Command line: click groups only. Parse, call the library, render. No logic here."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=False)


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

    return wrapper


# ----------------------------------------------------------------------------- healer


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def healer(debug: bool) -> None:
    """Diagnose and repair Hugging Face checkpoints before fine-tuning.

    Typical flow: `healer doctor MODEL` to see what is wrong, then `healer fix MODEL -o OUT`.
    """


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


# ----------------------------------------------------------------------------- trainer


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def trainer(debug: bool) -> None:
    """Fine-tune a checkpoint with QLoRA and export the result (GGUF or merged safetensors)."""


if __name__ == "__main__":
    healer()
