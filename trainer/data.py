"""Training data: local files -> conversations -> token ids with assistant-only labels -> batches.

Flow: `load_rows` (datasets library, local files only) -> healer.templates.formats.normalize
(messages / ShareGPT / Alpaca rows become {role, content} lists; `text` rows stay plain text) ->
`ExampleRenderer` (chat template -> ids and labels through healer.templates' masks; labels are
IGNORE_INDEX outside assistant turns unless train_on_inputs) -> truncation -> optional `pack`
-> `step_plan` + `collate` in the loop.

Sequences carry position_ids that restart at 0 for every example, so a packed row holds
several documents; the decoder derives document boundaries from those restarts and never
attends (or predicts) across them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from healer.errors import HealerError

IGNORE_INDEX = -100
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(HealerError):
    """The dataset file cannot be read, has a malformed row, or leaves nothing to train on."""


# ----------------------------------------------------------------------------- loading


def load_rows(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a local JSON/JSONL/Parquet/CSV file (through `datasets`) and a location label per row."""
    from healer.templates.formats import read_records

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: dataset file not found")
    kind = FORMATS.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"{p}: unsupported dataset file type {p.suffix!r} (use {', '.join(FORMATS)})")
    # datasets' JSON errors carry no line numbers: read_records names the malformed line first, and a
    # record that is no object (pyarrow would say "Column() changed from object to ...") is named here
    where = None
    if kind == "json":
        where = []
        for w, record in read_records(p):
            if not isinstance(record, dict):
                raise DataError(f"{w}: expected a JSON object (a chat, Alpaca or text record), "
                                f"got {type(record).__name__}")
            where.append(w)
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    except Exception as e:  # datasets wraps parser errors of pandas/pyarrow in its own exceptions
        raise DataError(f"{p}: cannot read as {p.suffix[1:]} ({_root_cause(e)})") from None
    # one schema for all rows: keys a row lacks come back as None
    rows = [{k: v for k, v in r.items() if v is not None} for r in ds.to_list()]
    if where is None or len(where) != len(rows):
        where = [f"{p} row {i + 1}" for i in range(len(rows))]
    return rows, where


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ----------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    """A chat template to train with; `entry` is the registry template it is (or is equivalent to)."""

    name: str
    source: str
    entry: Any = None  # healer.templates.registry.ChatTemplate


def resolve_template(name: str | None, model_template: str | None, model_dir: str | Path, *,
                     bos_token: str | None = None, eos_token: str | None = None) -> Template:
    """--template NAME (registry) or FILE.jinja, or the model's own template when unset.

    A template equivalent to a registry entry (decided by rendering) uses that entry's
    `{% generation %}` blocks for assistant masks.
    """
    from healer.templates import registry
    from healer.templates.detect import detect

    if name is None:
        if model_template is None:
            raise DataError(f"{model_dir}: the model has no chat template; give --template "
                            f"(one of {', '.join(registry.names())}) or a .jinja file")
        label, source = "model", model_template
    elif name.endswith(".jinja") or Path(name).is_file():
        p = Path(name)
        if not p.is_file():
            raise DataError(f"{p}: template file not found")
        label, source = p.name, p.read_text(encoding="utf-8")
    else:
        try:
            entry = registry.get(name)
        except HealerError as e:
            raise DataError(str(e)) from None
        return Template(entry.name, entry.source, entry)
    found = detect(source, bos_token=bos_token, eos_token=eos_token)
    return Template(label, source, registry.get(found) if found else None)


class ExampleRenderer:
    """Token ids and labels of examples for one tokenizer and template (build once: it caches the masker).

    `bos_id` is the BOS every example must start with (None for families without one, e.g. Qwen):
    plain text goes through encode(), chats are rendered and tokenized without special tokens, and
    either gets BOS once in front unless it already starts with it (healer.tokenizers.bos).
    """

    def __init__(self, tokenizer, template: Template, bos_id: int | None = None):
        from healer.templates.mask import ChatMasker

        self.tokenizer, self.template, self.bos_id = tokenizer, template, bos_id
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("training needs a fast tokenizer (tokenizer.json) for assistant masks")
        self.masker = ChatMasker(template.entry, tokenizer, bos_id) if template.entry is not None else None
        self.variables = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}

    def check_fits(self) -> None:
        """Every marker the template writes must be one token id, or the model never saw it as a marker."""
        markers = self.template.entry.control_tokens if self.template.entry is not None else ()
        for marker in markers:
            ids = self.tokenizer.encode(marker, add_special_tokens=False)
            if len(ids) != 1:
                raise DataError(f"template {self.template.name!r} does not fit this tokenizer: {marker!r} encodes "
                                f"as {len(ids)} tokens, not one (use the model's own template or one written "
                                "for its tokenizer)")

    def __call__(self, example: list[dict[str, str]] | str, *, train_on_inputs: bool) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one example; labels are IGNORE_INDEX where no loss is taken."""
        from healer.tokenizers.bos import with_one_bos

        if isinstance(example, str):
            ids = self.tokenizer(example, add_special_tokens=True)["input_ids"]
            if self.tokenizer.eos_token_id is not None:
                ids = [*ids, self.tokenizer.eos_token_id]
            return with_one_bos(ids, list(ids), self.bos_id)
        if self.masker is not None:
            chat = self.masker(example)
            ids, labels = chat.input_ids, chat.labels
        else:
            ids, labels = self._prefix_masked(example)
        return (ids, list(ids)) if train_on_inputs else (ids, labels)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        from healer.templates.render import render_source

        return render_source(self.template.source, messages, add_generation_prompt=add_generation_prompt,
                             name=self.template.name, **self.variables)

    def _prefix_masked(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """Masks for a template outside the registry: each assistant turn is what rendering
        messages[:i+1] adds to messages[:i] rendered with the generation prompt."""
        from healer.templates.mask import labels_for
        from healer.tokenizers.bos import drop_template_bos

        text = self._render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], True) if i else ""
            upto = self._render(messages[: i + 1], False)
            if not (upto.startswith(before) and text.startswith(upto)):
                raise DataError(f"template {self.template.name!r} does not render conversations turn by turn, so "
                                "assistant turns cannot be found; use a registry template (--template)")
            spans.append((len(before), len(upto)))
        if self.bos_id is None:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return enc["input_ids"], labels_for(enc["input_ids"], enc["offset_mapping"], spans)
        text, cut = drop_template_bos(text, self.tokenizer.convert_ids_to_tokens(self.bos_id))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = labels_for(enc["input_ids"], enc["offset_mapping"], [(a - cut, b - cut) for a, b in spans])
        return [self.bos_id, *enc["input_ids"]], [IGNORE_INDEX, *labels]


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
                 train_on_inputs: bool, bos_id: int | None = None, limit: int | None = None) -> PreparedData:
    """Load, render, label and truncate (the first `limit` rows only, if given); DataError if nothing
    is left to train on. `bos_id`: the BOS every example starts with (see ExampleRenderer)."""
    from healer.templates.formats import normalize
    from healer.templates.render import TemplateError

    rows, where = load_rows(path)
    if not rows:
        raise DataError(f"{path}: the dataset is empty")
    rows = rows[:limit] if limit is not None else rows
    render = ExampleRenderer(tokenizer, template, bos_id)
    render.check_fits()
    examples, truncated, dropped = [], 0, 0
    for i, row in enumerate(rows):
        example = normalize(row, where[i])
        try:
            ids, labels = render(example.messages if example.messages is not None else example.text,
                                 train_on_inputs=train_on_inputs)
        except TemplateError as e:
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


def prepare_model_data(ckpt, data: str | Path, template: str | None, *, max_seq_len: int, train_on_inputs: bool,
                       limit: int | None = None) -> tuple[Template, PreparedData]:
    """The template and the prepared examples of `data` for the model dir `ckpt` (a healer ModelDir):
    what `trainer run` trains on, and what `trainer run --preview` shows."""
    from healer.tokenizers.bos import bos_first

    tokenizer = ckpt.hf_tokenizer()
    resolved = resolve_template(template, ckpt.chat_template, ckpt.path, bos_token=tokenizer.bos_token,
                                eos_token=tokenizer.eos_token)
    prepared = prepare_data(data, tokenizer, resolved, max_seq_len=max_seq_len, train_on_inputs=train_on_inputs,
                            bos_id=bos_first(ckpt), limit=limit)
    return resolved, prepared


def trained_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The example as text in runs of (decoded text, trained?), for showing what is trained."""
    runs: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            runs.append((text, labels[start] != IGNORE_INDEX))
            start = i
    return runs


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
        device = torch.device(device)
        if device.type == "cuda":
            # From pinned memory, without blocking: a copy from pageable memory waits until the GPU has
            # run everything queued before it, so each micro-batch drained the queue and the GPU then
            # idled while the CPU queued the next forward (bench/profile_step.py finds such waits).
            def move(t: torch.Tensor) -> torch.Tensor:
                return t.pin_memory().to(device, non_blocking=True)
        else:
            def move(t: torch.Tensor) -> torch.Tensor:
                return t.to(device)
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids), self.rows, self.n_targets)

    @property
    def plain_positions(self) -> bool:
        """Every row's positions are 0, 1, 2, ...: one document per row, nothing for the model to derive."""
        n = self.position_ids.shape[-1]
        return torch.equal(self.position_ids, torch.arange(n, device=self.position_ids.device).expand_as(
            self.position_ids))


def collate(seqs: list[TrainSequence], pad_id: int, width: int | None = None) -> Batch:
    """Right-pad to the longest sequence (or to `width`, if longer); padding has no labels and continues the
    last positions.

    Causal attention keeps real tokens from seeing the padding after them, so no mask is needed.
    """
    width = max([len(s.input_ids) for s in seqs] + [width or 0])
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
