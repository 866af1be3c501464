"""The BOS rule: which sequences start with BOS, and how a training example gets exactly one.

One rule for every path that turns text into training or serving ids (the trainer's data,
doctor's `tokenizer.bos_missing` / `tokenizer.double_bos`, the GGUF's add_bos flag):

- a model "starts with BOS" when tokenizer_config.json sets `add_bos_token: true` or its
  family was pretrained with BOS first (Llama, Mistral, Gemma); Qwen, Phi-3 do not;
- raw text goes through `encode()` (the tokenizer's post-processor adds BOS);
- a rendered chat template is tokenized without special tokens (as `apply_chat_template` and
  TRL do), and if the template did not write BOS itself, BOS is added once in front.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Families whose pretraining put BOS at the start of every sequence: encoding without it
# shifts every position the model was trained on.
BOS_FAMILIES = frozenset({"llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "gemma3_text"})
IGNORE_INDEX = -100


def starts_with_bos(model_type: str | None, tokenizer_config: Mapping[str, Any]) -> bool:
    """Whether this model's sequences start with BOS: configured, or the family is trained with it."""
    return tokenizer_config.get("add_bos_token") is True or model_type in BOS_FAMILIES


def with_one_bos(ids: list[int], labels: list[int] | None, bos_id: int | None) -> tuple[list[int], list[int] | None]:
    """`ids` (and `labels`) with BOS in front unless the template already wrote it; BOS is never trained."""
    if bos_id is None or ids[:1] == [bos_id]:
        return ids, labels
    return [bos_id, *ids], None if labels is None else [IGNORE_INDEX, *labels]
