"""Which tokens matter for training: special tokens, chat-template tokens, dataset tokens.

An untrained row only hurts when its token is fed to the model. These are the tokens that
will be, so their rows are the ones to repair by default:

- **special tokens**: the roles the tokenizer and configs name (bos, eos, pad, unk, the
  additional/extra special tokens of tokenizer_config.json or special_tokens_map.json, and
  the bos/eos/pad ids of config.json and generation_config.json). Reserved placeholders like
  Llama 3's `<|reserved_special_token_N|>` are flagged special in tokenizer.json but are
  not special tokens here: nothing feeds them to the model.
- **template tokens**, by two rules (a token caught by either counts):
  1. *rendered*: the chat template is rendered (transformers' variables: messages,
     add_generation_prompt, bos/eos/pad/unk_token) over two conversation shapes
     (system+user+assistant; user+assistant+user with a generation prompt), each twice with
     different one-word contents, and encoded without added specials; the ids present in
     both renderings of a shape are the template's own scaffolding, not the contents.
  2. *text*: an added token flagged special whose text occurs in the template source
     (catches branches the sample conversations do not take, such as tool calls).
- **dataset tokens**: ids of a training file after applying the template, with counts.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from healer.errors import CheckpointError, HealerError
from healer.model_dir import ModelDir

ROLE_TOKENS = ("bos", "eos", "pad", "unk")

# Two contents per shape; no word is shared, so only scaffolding survives the intersection
_CONTENTS = (("alpha", "bravo", "charlie"), ("xray", "yankee", "zulu"))
_SHAPES = ((("system", "user", "assistant"), False), (("user", "assistant", "user"), True))


@dataclass
class Vocab:
    """What the usage rules need from a tokenizer: encode text (no added specials) and name ids."""

    encode_batch: Callable[[list[str]], list[list[int]]]
    id_to_token: Callable[[int], str | None]
    token_to_id: Callable[[str], int | None]
    special_added: dict[int, str]  # added tokens flagged special: id -> text


_vocabs: weakref.WeakKeyDictionary[ModelDir, Vocab | None] = weakref.WeakKeyDictionary()


def load_vocab(ckpt: ModelDir) -> Vocab | None:
    """The checkpoint's tokenizer as a Vocab (tokenizer.json when present, else transformers'), or None.

    Loaded once per ModelDir object: a 128k-token tokenizer.json takes seconds to parse.
    """
    if ckpt not in _vocabs:
        _vocabs[ckpt] = _load_vocab(ckpt)
    return _vocabs[ckpt]


def _load_vocab(ckpt: ModelDir) -> Vocab | None:
    if ckpt.has_fast:
        tok = ckpt.fast_tokenizer()
        return Vocab(
            encode_batch=lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)],
            id_to_token=tok.id_to_token,
            token_to_id=tok.token_to_id,
            special_added={i: t.content for i, t in tok.get_added_tokens_decoder().items() if t.special},
        )
    if ckpt.has_sentencepiece:
        hf = ckpt.hf_tokenizer()
        vocab = hf.get_vocab()
        inverse = {i: t for t, i in vocab.items()}
        return Vocab(
            encode_batch=lambda texts: [hf.encode(t, add_special_tokens=False) for t in texts],
            id_to_token=inverse.get,
            token_to_id=vocab.get,
            special_added={i: t.content for i, t in hf.added_tokens_decoder.items() if t.special},
        )
    return None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _token_texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [value["content"]] if isinstance(value.get("content"), str) else \
            [t for v in value.values() for t in _token_texts(v)]
    if isinstance(value, list):
        return [t for v in value for t in _token_texts(v)]
    return []


def special_token_ids(ckpt: ModelDir, vocab: Vocab | None) -> dict[int, list[str]]:
    """id -> the roles naming it (`bos`, `eos`, ..., `additional`, `config.eos_token_id`, ...)."""
    out: dict[int, list[str]] = {}

    def add(i: int | None, role: str) -> None:
        if i is not None and role not in out.setdefault(i, []):
            out[i].append(role)

    if vocab is not None:
        for role in ROLE_TOKENS:
            text = ckpt.special_token(role)
            if text is not None:
                add(vocab.token_to_id(text), role)
        for source in (ckpt.tokenizer_config, ckpt.special_tokens_map):
            for key in ("additional_special_tokens", "extra_special_tokens"):
                for text in _token_texts(source.get(key)):
                    add(vocab.token_to_id(text), "additional")
    for name, cfg in (("config", ckpt.config), ("generation_config", ckpt.generation_config or {})):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            for i in _ids(cfg.get(key)):
                add(i, f"{name}.{key}")
    return out


def protected_ids(ckpt: ModelDir, vocab: Vocab | None) -> set[int]:
    """bos/eos/pad/unk of the tokenizer and config.json: never counted as untrained."""
    protected = {"bos", "eos", "pad", "unk", "config.bos_token_id", "config.eos_token_id", "config.pad_token_id"}
    return {i for i, roles in special_token_ids(ckpt, vocab).items() if protected.intersection(roles)}


def _template_variables(ckpt: ModelDir) -> dict[str, str]:
    return {f"{r}_token": t for r in ROLE_TOKENS if (t := ckpt.special_token(r)) is not None}


def template_token_ids(ckpt: ModelDir, vocab: Vocab | None) -> dict[int, str]:
    """id -> `rendered` or `text`: the tokens the chat template itself emits (see the module doc)."""
    from healer.templates.render import TemplateError, render_source

    source = ckpt.chat_template
    if source is None or vocab is None:
        return {}
    out: dict[int, str] = {}
    variables = _template_variables(ckpt)
    for roles, generation_prompt in _SHAPES:
        try:
            texts = [render_source(source, [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)],
                                   add_generation_prompt=generation_prompt, **variables)
                     for contents in _CONTENTS]
        except TemplateError:
            continue  # e.g. Gemma refuses a system message; the other shape still counts
        first, second = (set(ids) for ids in vocab.encode_batch(texts))
        for i in sorted(first & second):
            out.setdefault(i, "rendered")
    for i, text in vocab.special_added.items():
        if text and text in source:
            out.setdefault(i, "text")
    return out


def dataset_texts(ckpt: ModelDir, path: str | Path) -> list[str]:
    """The training texts of a dataset file (any record shape healer.templates.formats reads), templated.

    Chat records are rendered with the checkpoint's chat template; `text` records are used as is.
    """
    from healer.templates.formats import load_examples
    from healer.templates.render import TemplateError, render_source

    variables = _template_variables(ckpt)
    texts = []
    for n, example in enumerate(load_examples(path)):
        if example.messages is None:
            texts.append(example.text or "")
            continue
        if ckpt.chat_template is None:
            raise HealerError(f"{path} record {n}: chat messages need a chat template, and {ckpt.path} has none")
        try:
            texts.append(render_source(ckpt.chat_template, example.messages, **variables))
        except TemplateError as e:
            raise HealerError(f"{path} record {n}: {e}") from None
    return texts


def dataset_token_counts(ckpt: ModelDir, vocab: Vocab, path: str | Path, batch: int = 1024) -> Counter[int]:
    """How often each id occurs in the dataset's templated texts (encoded without added specials)."""
    texts = dataset_texts(ckpt, path)
    counts: Counter[int] = Counter()
    for start in range(0, len(texts), batch):
        for ids in vocab.encode_batch(texts[start:start + batch]):
            counts.update(ids)
    return counts


@dataclass
class TokenUse:
    """The ids that reach the model: special tokens, template tokens, dataset counts."""

    special: dict[int, list[str]] = field(default_factory=dict)
    template: dict[int, str] = field(default_factory=dict)
    dataset: Counter[int] = field(default_factory=Counter)

    def reasons(self, i: int) -> list[str]:
        """Why id `i` matters: `special`, `template`, `dataset` (empty: unused)."""
        return [name for name, hit in (("special", i in self.special), ("template", i in self.template),
                                        ("dataset", self.dataset[i] > 0)) if hit]


def token_use(ckpt: ModelDir, vocab: Vocab | None = None, dataset: str | Path | None = None) -> TokenUse:
    """Collect special, template and (with `dataset`) dataset token ids of a checkpoint."""
    if vocab is None and ckpt.has_tokenizer:
        vocab = load_vocab(ckpt)
    if dataset is not None and vocab is None:
        raise CheckpointError(f"{ckpt.path}: no tokenizer to count the dataset's tokens with")
    return TokenUse(
        special=special_token_ids(ckpt, vocab),
        template=template_token_ids(ckpt, vocab),
        dataset=dataset_token_counts(ckpt, vocab, dataset) if dataset is not None else Counter(),
    )


def select_rows(untrained: Iterable[int], use: TokenUse, all_untrained: bool = False) -> list[int]:
    """The untrained rows to repair: those in use (special/template/dataset), or all of them."""
    return sorted(int(r) for r in untrained if all_untrained or use.reasons(int(r)))


def describe(ids: Sequence[int], vocab: Vocab | None) -> list[dict[str, Any]]:
    """[{id, token}] with the token's text (None when the tokenizer has no such id)."""
    return [{"id": int(i), "token": vocab.id_to_token(int(i)) if vocab is not None else None} for i in ids]
