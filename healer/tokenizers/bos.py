"""The BOS rule: which sequences start with BOS, and how a training example gets exactly one.

One rule for every path that turns text into training or serving ids (the trainer's data,
doctor's `tokenizer.bos_missing` / `tokenizer.double_bos`, the GGUF's add_bos flag):

- a model "starts with BOS" when tokenizer_config.json sets `add_bos_token: true` or its
  family was pretrained with BOS first (Llama, Mistral, Gemma); Qwen, Phi-3 do not;
- raw text goes through `encode()` (the tokenizer's post-processor adds BOS), and gets BOS in
  front if encode() did not add it;
- a rendered chat template loses a BOS it wrote at its very start, the rest is tokenized without
  special tokens (as `apply_chat_template` and TRL do) and BOS goes in front as an id. This is
  what llama.cpp does when it serves the GGUF (common/chat.cpp drops the template's BOS when the
  file's add_bos_token flag is set, and tokenization adds it back): the text after BOS is
  tokenized as the start of a sequence, so sentencepiece vocabularies give it their dummy "▁"
  prefix, as Llama 2 saw "▁[INST]" after <s> in pretraining. Byte-level vocabularies (Llama 3,
  Gemma 3) get the same ids either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from healer import families

IGNORE_INDEX = -100


def starts_with_bos(model_type: str | None, tokenizer_config: Mapping[str, Any]) -> bool:
    """Whether this model's sequences start with BOS: configured, or the family is trained with it
    (healer.families: Llama, Mistral, Gemma; not Qwen or Phi-3)."""
    return tokenizer_config.get("add_bos_token") is True or families.starts_with_bos(model_type)


def bos_first(ckpt: Any) -> int | None:
    """The BOS id every sequence of the model dir `ckpt` (a ModelDir) starts with; None if it uses none."""
    if not starts_with_bos(ckpt.model_type, ckpt.tokenizer_config):
        return None
    return ckpt.hf_tokenizer().bos_token_id


def drop_template_bos(text: str, bos_token: str | None) -> tuple[str, int]:
    """`text` without a BOS the template wrote at its start, and how many characters were dropped."""
    if bos_token and text.startswith(bos_token):
        return text[len(bos_token):], len(bos_token)
    return text, 0


def chat_ids(tokenizer: Any, rendered: str, bos_id: int | None) -> list[int]:
    """The ids a rendered chat is trained (and served) as; `bos_id` None for families without BOS."""
    if bos_id is None:
        return tokenizer.encode(rendered, add_special_tokens=False)
    text, _ = drop_template_bos(rendered, tokenizer.convert_ids_to_tokens(bos_id))
    return [bos_id, *tokenizer.encode(text, add_special_tokens=False)]


def with_one_bos(ids: list[int], labels: list[int] | None, bos_id: int | None) -> tuple[list[int], list[int] | None]:
    """`ids` (and `labels`) of encode()d text with BOS in front unless it is there; BOS is never trained."""
    if bos_id is None or ids[:1] == [bos_id]:
        return ids, labels
    return [bos_id, *ids], None if labels is None else [IGNORE_INDEX, *labels]
