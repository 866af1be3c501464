"""Assistant-only loss masks: token ids plus labels that train only what the assistant says.

The trained parts are character spans of the rendered text (each assistant turn's content and
its end-of-turn token), recorded by the `{% generation %}` blocks of a registry template while
it renders. They are mapped to tokens through the fast tokenizer's character offsets, never by
looking for marker ids, so repeated text, marker text inside content and multi-turn chats
cannot shift them.

Straddling tokens: a token whose characters are partly inside a trained span and partly
outside (SentencePiece's "▁Hello" where the space is template text, or BPE's "\\n\\n" where
one newline is the template's and one the content's) is TRAINED. The model has to emit that
token to produce the assistant's text; leaving it out would leave part of the answer
untrained.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from healer.templates.registry import ChatTemplate, get
from healer.templates.render import Message, Span, TemplateError, render_spans

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MaskedChat:
    """A rendered conversation: text, token ids, labels (-100 = not trained) and the trained character spans."""

    text: str
    input_ids: list[int]
    labels: list[int]
    spans: list[Span]
    offsets: list[tuple[int, int]]


def token_in_spans(start: int, end: int, spans: Sequence[Span]) -> bool:
    """Whether a token covering characters [start, end) is trained: it shares a character with a span."""
    if start == end:  # zero-width token (a normalizer-inserted piece): trained if it sits inside a span
        return any(a <= start < b for a, b in spans)
    return any(start < b and end > a for a, b in spans)


def _trims_offsets(post_processor: Any) -> bool:
    if post_processor is None:
        return False

    def trims(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("trim_offsets") is True or any(trims(v) for v in node.values())
        return isinstance(node, list) and any(trims(v) for v in node)

    return trims(json.loads(post_processor.__getstate__()))


def labels_for(input_ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[int]:
    """Labels for causal-LM training: the id where the token is trained, IGNORE_INDEX elsewhere."""
    return [i if token_in_spans(s, e, spans) else IGNORE_INDEX for i, (s, e) in zip(input_ids, offsets, strict=True)]


class ChatMasker:
    """Renders conversations with a registry template and tokenizes them with masks (build once, call often)."""

    def __init__(self, template: ChatTemplate | str, tokenizer: Any, bos_id: int | None = None):
        """`bos_id`: the BOS every sequence starts with (healer.tokenizers.bos): a BOS the template writes is
        dropped from the text, the rest tokenized as a sequence start and the id put in front, untrained."""
        from tokenizers import Tokenizer

        self.bos_id = bos_id
        self.template = get(template) if isinstance(template, str) else template
        if not getattr(tokenizer, "is_fast", False):
            raise TemplateError("assistant masks need a fast tokenizer (tokenizer.json) for character offsets")
        self.tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        if _trims_offsets(self._backend.post_processor):
            # With add_special_tokens=False a post-processor only trims offsets (ByteLevel trim_offsets), and
            # trimmed offsets hide tokens that straddle a span boundary: use a copy without it. Copying a
            # 128k-token vocabulary costs seconds, so only when needed.
            self._backend = Tokenizer.from_str(self._backend.to_str())
            self._backend.post_processor = None
        # The same variables apply_chat_template passes: every special token the tokenizer names
        self._variables = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}

    def __call__(self, messages: Sequence[Message], *, add_generation_prompt: bool = False,
                 **variables: Any) -> MaskedChat:
        from healer.tokenizers.bos import drop_template_bos

        text, spans = render_spans(self.template.tracked_source, messages, add_generation_prompt=add_generation_prompt,
                                   name=self.template.name, **{**self._variables, **variables})
        if self.bos_id is None:
            enc = self._backend.encode(text, add_special_tokens=False)
            offsets = [tuple(o) for o in enc.offsets]
            return MaskedChat(text, list(enc.ids), labels_for(enc.ids, offsets, spans), spans, offsets)
        text, cut = drop_template_bos(text, self.tokenizer.convert_ids_to_tokens(self.bos_id))
        spans = [(max(a - cut, 0), b - cut) for a, b in spans if b > cut]
        enc = self._backend.encode(text, add_special_tokens=False)
        offsets = [(0, 0), *(tuple(o) for o in enc.offsets)]
        ids = [self.bos_id, *enc.ids]
        return MaskedChat(text, ids, [IGNORE_INDEX, *labels_for(enc.ids, offsets[1:], spans)], spans, offsets)


def render_with_mask(template: ChatTemplate | str, messages: Sequence[Message], tokenizer: Any, *,
                     add_generation_prompt: bool = False, **variables: Any) -> MaskedChat:
    """Render `messages` with a registry template and tokenize; labels train only assistant turns.

    Ids equal `tokenizer.apply_chat_template(messages, chat_template=template.source)`; labels are
    -100 except for each assistant turn's content and end-of-turn token. For many conversations
    build a `ChatMasker` once instead.
    """
    return ChatMasker(template, tokenizer)(messages, add_generation_prompt=add_generation_prompt, **variables)


def highlight(text: str, spans: Sequence[Span], *, markup: bool) -> str:
    """The text with trained spans marked: rich markup (markup=True) or [[...]] brackets."""
    from rich.markup import escape

    out, pos = [], 0
    for a, b in sorted(spans):
        before, inside = text[pos:a], text[a:b]
        if markup:
            out.append(escape(before) + "[bold green]" + escape(inside) + "[/bold green]")
        else:
            out.append(before + "[[" + inside + "]]")
        pos = b
    rest = text[pos:]
    out.append(escape(rest) if markup else rest)
    return "".join(out)
