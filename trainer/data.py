"""Training data: local files -> conversations -> token ids with assistant-only labels -> batches.

Flow: `load_rows` (datasets library, local files only) -> `to_messages` (messages / ShareGPT /
Alpaca rows become a list of {role, content}; `text` rows stay plain text) -> `render_example`
(chat template -> ids and labels; labels are IGNORE_INDEX outside assistant turns unless
train_on_inputs) -> truncation -> optional `pack` -> `step_plan` + `collate` in the loop.

Sequences carry position_ids that restart at 0 for every example, so a packed row holds
several documents; the decoder derives document boundaries from those restarts and never
attends (or predicts) across them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from healer.errors import HealerError

IGNORE_INDEX = -100
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class DataError(HealerError):
    """The dataset file cannot be read, has a malformed row, or leaves nothing to train on."""


# ----------------------------------------------------------------------------- loading


def load_rows(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a local JSON/JSONL/Parquet/CSV file (through `datasets`) and a location label per row."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: dataset file not found")
    kind = FORMATS.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"{p}: unsupported dataset file type {p.suffix!r} (use {', '.join(FORMATS)})")
    where = _json_row_lines(p) if kind == "json" else None
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    except Exception as e:  # datasets wraps parser errors of pandas/pyarrow in its own exceptions
        raise DataError(f"{p}: cannot read as {p.suffix[1:]} ({_root_cause(e)})") from None
    rows = ds.to_list()
    if where is None or len(where) != len(rows):
        where = [f"{p.name} row {i + 1}" for i in range(len(rows))]
    return rows, where


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _json_row_lines(p: Path) -> list[str]:
    """Validate a .json/.jsonl file line by line (datasets' own errors lack line numbers)."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        if not all(isinstance(r, dict) for r in data):
            raise DataError(f"{p}: expected a JSON array of objects")
        return [f"{p.name} item {i + 1}" for i in range(len(data))]
    where = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{lineno}: malformed JSON line ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")
        where.append(f"{p.name}:{lineno}")
    return where


# ----------------------------------------------------------------------------- formats


def to_messages(row: Mapping[str, Any], where: str) -> list[dict[str, str]] | str:
    """A row as chat messages (messages / ShareGPT conversations / Alpaca), or its text for `text` rows."""
    if row.get("messages") is not None:
        return _messages(row["messages"], where, "role", "content", None)
    if row.get("conversations") is not None:
        return _messages(row["conversations"], where, "from", "value", SHAREGPT_ROLES)
    if row.get("instruction") is not None and row.get("output") is not None:
        prompt = str(row["instruction"])
        if row.get("input"):
            prompt += "\n\n" + str(row["input"])
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"])}]
    if isinstance(row.get("text"), str):
        return row["text"]
    keys = ", ".join(k for k, v in row.items() if v is not None) or "none"
    raise DataError(f"{where}: unknown row format (keys: {keys}); expected messages, conversations, "
                    "instruction+output, or text")


def _messages(turns: Any, where: str, role_key: str, content_key: str,
              roles: dict[str, str] | None) -> list[dict[str, str]]:
    if not isinstance(turns, Sequence) or isinstance(turns, str) or not turns:
        raise DataError(f"{where}: expected a non-empty list of turns")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, Mapping) or not isinstance(t.get(role_key), str) or not isinstance(t.get(content_key), str):
            raise DataError(f"{where}: turn {i + 1} needs string fields {role_key!r} and {content_key!r}")
        role = t[role_key] if roles is None else roles.get(t[role_key])
        if role is None:
            raise DataError(f"{where}: turn {i + 1} has unknown role {t[role_key]!r}")
        out.append({"role": role, "content": t[content_key]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: conversation has no assistant turn to train on")
    return out


# ----------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    """A chat template to train with: Jinja source (may carry generation tags) and the markers it writes."""

    name: str
    source: str
    control_tokens: tuple[str, ...] = ()
    variables: dict[str, Any] = field(default_factory=dict)


def resolve_template(name: str | None, model_template: str | None, model_dir: str | Path) -> Template:
    """--template NAME (registry) or FILE.jinja, or the model's own template when unset."""
    from healer.templates import registry

    if name is None:
        if model_template is None:
            raise DataError(f"{model_dir}: the model has no chat template; give --template "
                            f"(one of {', '.join(registry.names())}) or a .jinja file")
        return Template("model", model_template)
    if name.endswith(".jinja") or Path(name).is_file():
        p = Path(name)
        if not p.is_file():
            raise DataError(f"{p}: template file not found")
        return Template(p.name, p.read_text(encoding="utf-8"))
    try:
        entry = registry.get(name)
    except HealerError as e:
        raise DataError(str(e)) from None
    return Template(entry.name, entry.tracked_source, entry.control_tokens, dict(entry.variables))


def check_template_fits(template: Template, tokenizer) -> None:
    """Every marker the template writes must be one token id, or the model never saw it as a marker."""
    for marker in template.control_tokens:
        ids = tokenizer.encode(marker, add_special_tokens=False)
        if len(ids) != 1:
            raise DataError(f"template {template.name!r} does not fit this tokenizer: {marker!r} encodes as "
                            f"{len(ids)} tokens, not one (use the model's own template or one written for its tokenizer)")


def _render(template: Template, tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool):
    from healer.templates.render import render_spans

    specials = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return render_spans(template.source, messages, add_generation_prompt=add_generation_prompt,
                        name=template.name, **{**template.variables, **specials})


def assistant_spans(template: Template, tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the character spans of the trained assistant parts.

    A template with `{% generation %}` blocks marks them itself; otherwise each assistant turn
    is what rendering messages[:i+1] adds after rendering messages[:i] with the generation prompt.
    """
    text, spans = _render(template, tokenizer, messages, False)
    if spans:
        return text, spans
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(template, tokenizer, messages[:i], True)[0] if i else ""
        upto = _render(template, tokenizer, messages[: i + 1], False)[0]
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError(f"template {template.name!r} does not render conversations turn by turn, so "
                            "assistant turns cannot be found; use a template with {% generation %} blocks")
        spans.append((len(before), len(upto)))
    return text, spans


def render_example(tokenizer, template: Template, example: list[dict[str, str]] | str, *,
                   train_on_inputs: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example (labels = IGNORE_INDEX where no loss is taken)."""
    if isinstance(example, str):
        ids = tokenizer(example, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = [*ids, tokenizer.eos_token_id]
        return ids, list(ids)
    text, spans = assistant_spans(template, tokenizer, example)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on_inputs:
        return ids, list(ids)
    labels = [tok if any(s < end and e > start for start, end in spans) else IGNORE_INDEX
              for tok, (s, e) in zip(ids, enc["offset_mapping"], strict=True)]
    return ids, labels


# ----------------------------------------------------------------------------- examples


@dataclass
class Example:
    """One tokenized training example; `row` is its 0-based index in the dataset file."""

    input_ids: list[int]
    labels: list[int]
    row: int


@dataclass
class PreparedData:
    """Tokenized examples and what preparation did to the dataset."""

    examples: list[Example]
    rows: int
    truncated: int
    dropped_no_targets: int
    where: list[str]

    def token_ids(self) -> set[int]:
        """Every token id the training data feeds the model."""
        return {t for ex in self.examples for t in ex.input_ids}


def prepare_data(path: str | Path, tokenizer, template: Template, *, max_seq_len: int,
                 train_on_inputs: bool) -> PreparedData:
    """Load, render, label and truncate; DataError if nothing is left to train on."""
    rows, where = load_rows(path)
    if not rows:
        raise DataError(f"{path}: the dataset is empty")
    check_template_fits(template, tokenizer)
    examples, truncated, dropped = [], 0, 0
    for i, row in enumerate(rows):
        try:
            ids, labels = render_example(tokenizer, template, to_messages(row, where[i]),
                                         train_on_inputs=train_on_inputs)
        except DataError:
            raise
        except HealerError as e:
            raise DataError(f"{where[i]}: {e}") from None
        if len(ids) > max_seq_len:
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            truncated += 1
        # labels[0] is never a target (nothing precedes it), so an example needs one after it
        if all(lab == IGNORE_INDEX for lab in labels[1:]):
            dropped += 1
            continue
        examples.append(Example(ids, labels, i))
    if not examples:
        raise DataError(f"{path}: no example is left to train on ({len(rows)} rows, {dropped} without any "
                        f"trained token after truncation to {max_seq_len} tokens)")
    return PreparedData(examples, len(rows), truncated, dropped, where)


# ----------------------------------------------------------------------------- sequences and batches


@dataclass
class TrainSequence:
    """One row of a batch: one example, or several packed ones with positions restarting per example."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    rows: tuple[int, ...]


def as_sequences(examples: list[Example]) -> list[TrainSequence]:
    """One sequence per example."""
    return [TrainSequence(ex.input_ids, ex.labels, list(range(len(ex.input_ids))), (ex.row,)) for ex in examples]


def pack(examples: list[Example], max_seq_len: int) -> list[TrainSequence]:
    """Concatenate examples in order into sequences of at most max_seq_len tokens (none is split).

    The first token of each example gets no label, so a sequence never asks one example to
    predict the start of the next even where the model does not mask document boundaries.
    """
    out: list[TrainSequence] = []
    cur = TrainSequence([], [], [], ())
    for ex in examples:
        n = len(ex.input_ids)
        assert n <= max_seq_len
        if cur.input_ids and len(cur.input_ids) + n > max_seq_len:
            out.append(cur)
            cur = TrainSequence([], [], [], ())
        cur.input_ids += ex.input_ids
        cur.labels += [IGNORE_INDEX, *ex.labels[1:]]
        cur.position_ids += list(range(n))
        cur.rows += (ex.row,)
    if cur.input_ids:
        out.append(cur)
    return out


def step_plan(n_sequences: int, *, batch_size: int, grad_accum: int, epochs: int, max_steps: int | None,
              seed: int) -> list[list[list[int]]]:
    """Sequence indices per micro-batch per optimizer step: a fresh seeded shuffle each epoch.

    With max_steps the epochs repeat until that many steps exist; otherwise `epochs` passes,
    the last step of each pass possibly shorter. The plan is a pure function of its arguments,
    so a resumed run can skip to any step.
    """
    assert n_sequences > 0
    steps: list[list[list[int]]] = []
    epoch = 0
    while (max_steps is None and epoch < epochs) or (max_steps is not None and len(steps) < max_steps):
        order = list(range(n_sequences))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        micro = [order[i:i + batch_size] for i in range(0, n_sequences, batch_size)]
        steps += [micro[i:i + grad_accum] for i in range(0, len(micro), grad_accum)]
        epoch += 1
    return steps[:max_steps] if max_steps is not None else steps


@dataclass
class Batch:
    """Padded tensors of one micro-batch, the dataset rows it holds and its count of predicted tokens."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    rows: list[int]
    n_targets: int

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device), self.position_ids.to(device),
                     self.rows, self.n_targets)


def collate(seqs: list[TrainSequence], pad_id: int) -> Batch:
    """Right-pad to the longest sequence; padding has no labels and continues the last positions.

    Causal attention keeps real tokens from seeing the padding after them, so no mask is needed.
    """
    width = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        last = s.position_ids[-1]
        pos[i] = torch.tensor(s.position_ids + list(range(last + 1, last + 1 + width - n)))
    rows = [r for s in seqs for r in s.rows]
    return Batch(ids, labels, pos, rows, int((labels[:, 1:] != IGNORE_INDEX).sum()))
