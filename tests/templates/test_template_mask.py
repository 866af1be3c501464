"""Assistant-only masks are exact: checked against spans found without the template's generation tags.

Reference spans come from rendering: the start of assistant turn i is where the rendering first
changes when a marker character is put in front of that turn's content, the end of its content
where it first changes when the marker is put after it; the end-of-turn string must follow (only
spaces between). Token character ranges come from the tokenizer's own offset mapping, token ids
from transformers' apply_chat_template.
"""

from __future__ import annotations

from functools import cache

import pytest
import testdata
from template_refs import CONVERSATIONS, m, mistral_fast_tokenizer, outcome, spans_after_prompt

from healer.templates import IGNORE_INDEX, ChatMasker, TemplateError, get, highlight, names, render_with_mask
from healer.templates.mask import labels_for, token_in_spans

MARK = "\x00"


@cache
def fast(name: str, bos: str | None, eos: str, extra: tuple[str, ...] = ()):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(testdata.fast_tokenizer_json(name)), bos_token=bos,
                                  eos_token=eos)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    return tok


@cache
def real(name: str):
    """An official repo's tokenizer (testdata.real_tokenizer), loaded as transformers loads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(testdata.real_tokenizer(name)))


TOKENIZERS = {
    "llama-bpe": lambda: fast("llama-bpe", "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2": lambda: fast("qwen2", None, "<|im_end|>"),
    "phi-3": lambda: fast("phi-3", "<s>", "<|endoftext|>"),
    "llama-spm": lambda: fast("llama-spm", "<s>", "</s>"),
    # Gemma's and ChatML's markers are special tokens of their vocabularies; on Llama 2's vocabulary
    # they are added as special tokens (what `healer fix --chatml` does for ChatML)
    "llama-spm+gemma": lambda: fast("llama-spm", "<s>", "</s>", ("<start_of_turn>", "<end_of_turn>")),
    "llama-spm+chatml": lambda: fast("llama-spm", "<s>", "</s>", ("<|im_start|>", "<|im_end|>")),
    # Phi-4's vocabulary is GPT-4's byte-level BPE with ChatML specials and <|im_sep|>
    "qwen2+im_sep": lambda: fast("qwen2", None, "<|im_end|>", ("<|im_sep|>",)),
    "mistral-v1": lambda: mistral_fast_tokenizer("v1"),
    "mistral-v3": lambda: mistral_fast_tokenizer("v3"),
    # v7 has the [SYSTEM_PROMPT] control tokens of Mistral Small 3's tekken vocabulary
    "mistral-v7": lambda: mistral_fast_tokenizer("v7"),
    "qwen3-real": lambda: real("qwen3"),
    "gemma3-real": lambda: real("gemma3"),
}
PAIRS = [("llama-3", "llama-bpe"), ("llama-3.1", "llama-bpe"), ("llama-3.2", "llama-bpe"), ("qwen2.5", "qwen2"), ("chatml", "qwen2"),
         ("chatml", "llama-spm+chatml"), ("phi-3", "phi-3"), ("llama-2", "llama-spm"), ("zephyr", "llama-spm"),
         ("vicuna", "llama-spm"), ("alpaca", "llama-spm"), ("gemma", "llama-spm+gemma"),
         ("mistral-v1", "mistral-v1"), ("mistral-v3", "mistral-v3"), ("mistral-nemo", "mistral-v3"),
         ("qwen3", "qwen3-real"), ("gemma-3", "gemma3-real"), ("mistral-small-3", "mistral-v7"),
         ("phi-4", "qwen2+im_sep")]
# Entries whose trained part of a turn is everything the model writes after the generation prompt,
# which holds more than the content: Qwen3's turns after the last user message open with a think
# block made from the content's reasoning. Their reference spans come from the official template.
AFTER_PROMPT = {"qwen3": "Qwen-Qwen3-0.6B"}


def reference_spans(entry, conv, gen: bool, variables: dict) -> list[tuple[int, int]]:
    text = entry.render(conv, add_generation_prompt=gen, **variables)

    def first_difference(i: int, content: str) -> int:
        other = entry.render([*conv[:i], {**conv[i], "content": content}, *conv[i + 1:]],
                             add_generation_prompt=gen, **variables)
        return next(k for k, (a, b) in enumerate(zip(text, other, strict=False)) if a != b)

    spans = []
    for i, msg in enumerate(conv):
        if msg["role"] != "assistant":
            continue
        start = first_difference(i, MARK + msg["content"])
        content_end = first_difference(i, msg["content"] + MARK)
        eot = entry.end_of_turn(variables["eos_token"])
        at = text.index(eot, content_end)
        assert text[content_end:at].strip(" ") == ""
        spans.append((start, at + len(eot)))
    return spans


def template_variables(tok) -> dict:
    values = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    values.setdefault("bos_token", "")
    return values


@pytest.mark.parametrize("name,tokenizer", PAIRS)
def test_mask_trains_exactly_assistant_content_and_end_of_turn(name, tokenizer):
    entry, tok = get(name), TOKENIZERS[tokenizer]()
    masker = ChatMasker(entry, tok)
    variables = template_variables(tok)
    checked = 0
    for key, conv in CONVERSATIONS.items():
        for gen in (False, True):
            if outcome(entry.render, conv, add_generation_prompt=gen, **variables)[0] == "error":
                continue
            got = masker(conv, add_generation_prompt=gen)
            hf = tok.apply_chat_template(conv, chat_template=entry.source, add_generation_prompt=gen,
                                         tokenize=True, return_dict=True,
                                         tokenizer_kwargs={"return_offsets_mapping": True})
            assert got.input_ids == hf["input_ids"], (key, gen)
            if name in AFTER_PROMPT:
                spans = spans_after_prompt(testdata.template(AFTER_PROMPT[name]), conv, gen,
                                           entry.end_of_turn(variables["eos_token"]), **variables)
            else:
                spans = reference_spans(entry, conv, gen, variables)
            assert got.spans == spans, (key, gen)
            expected = [i if any(s < b and e > a for a, b in spans) else IGNORE_INDEX
                        for i, (s, e) in zip(hf["input_ids"], hf["offset_mapping"], strict=True)]
            assert got.labels == expected, (key, gen)
            checked += 1
    assert checked >= 14


@pytest.mark.parametrize("name,tokenizer", PAIRS)
def test_mask_agrees_with_transformers_assistant_mask(name, tokenizer):
    entry, tok = get(name), TOKENIZERS[tokenizer]()
    masker = ChatMasker(entry, tok)
    for key in ("one_turn", "system_three_turns", "unicode", "repeats_user", "marker_text", "multiline"):
        conv = CONVERSATIONS[key]
        if outcome(entry.render, conv, **template_variables(tok))[0] == "error":
            continue
        hf = tok.apply_chat_template(conv, chat_template=entry.tracked_source, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        got = masker(conv)
        assert [int(label != IGNORE_INDEX) for label in got.labels] == hf["assistant_masks"], key


def test_every_registry_entry_has_a_mask_test():
    assert {name for name, _ in PAIRS} == set(names())


def test_straddling_token_at_span_start_is_trained_bpe():
    # Qwen2's pre-tokenizer keeps "\n\n" together: one newline is ChatML's, one the answer's
    tok = TOKENIZERS["qwen2"]()
    got = render_with_mask("chatml", [m("user", "Hi"), m("assistant", "\nHello")], tok)
    (start, _), = got.spans
    straddling = [i for i, (s, e) in enumerate(got.offsets) if s < start < e]
    assert len(straddling) == 1
    (i,) = straddling
    assert got.text[slice(*got.offsets[i])] == "\n\n"
    assert got.labels[i] == got.input_ids[i]
    assert got.labels[i - 1] == IGNORE_INDEX  # "assistant" before it is not


def test_straddling_token_at_span_start_is_trained_sentencepiece():
    # Llama 2 writes "[/INST] " + answer: the space belongs to the template, "▁Sure" to both
    tok = TOKENIZERS["llama-spm"]()
    got = render_with_mask("llama-2", [m("user", "Hi"), m("assistant", "Sure thing")], tok)
    (start, end), = got.spans
    assert got.text[start:end] == "Sure thing </s>"
    first = next(i for i, label in enumerate(got.labels) if label != IGNORE_INDEX)
    s, e = got.offsets[first]
    assert s < start < e and tok.convert_ids_to_tokens(got.input_ids[first]) == "\u2581Sure"


def test_trimmed_offsets_do_not_hide_a_straddling_token():
    # GPT-2's hub tokenizer.json trims spaces from offsets in its ByteLevel post-processor. Vicuna
    # writes "ASSISTANT: " before an answer that starts with a space: the byte-level token "ĠĠ"
    # holds the template's space and the answer's. Trimmed, its offsets shrink to zero width past
    # the span start; the masker reads untrimmed offsets and trains it.
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(testdata.fast_tokenizer_json("qwen2")), eos_token="<|im_end|>")
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    conv = [m("user", "Hi"), m("assistant", "  hi")]
    got = render_with_mask("vicuna", conv, tok)
    trimmed = tok(got.text, add_special_tokens=False, return_offsets_mapping=True)
    assert got.input_ids == trimmed["input_ids"]
    (start, _), = got.spans
    i = got.input_ids.index(tok.convert_tokens_to_ids("\u0120\u0120"))
    assert got.offsets[i] == (start - 1, start + 1)
    assert trimmed["offset_mapping"][i] == (start + 1, start + 1)
    assert got.labels[i] == got.input_ids[i]


@pytest.mark.parametrize("offsets,spans,trained", [
    ((3, 8), [(5, 10)], True),   # starts before the span, ends inside: straddles the start
    ((8, 12), [(5, 10)], True),  # starts inside, ends after: straddles the end
    ((0, 5), [(5, 10)], False),  # ends exactly where the span starts: no shared character
    ((10, 11), [(5, 10)], False),
    ((6, 6), [(5, 10)], True),   # zero-width token inside a span
    ((5, 5), [(5, 10)], True),
    ((10, 10), [(5, 10)], False),
    ((2, 3), [(0, 1), (5, 9)], False),
])
def test_token_in_spans_rule(offsets, spans, trained):
    assert token_in_spans(*offsets, spans) is trained


def test_labels_for_keeps_ids_of_trained_tokens_only():
    assert labels_for([7, 8, 9], [(0, 2), (2, 4), (4, 6)], [(3, 4)]) == [IGNORE_INDEX, 8, IGNORE_INDEX]


def test_generation_prompt_adds_no_trained_tokens():
    tok = TOKENIZERS["llama-bpe"]()
    got = render_with_mask("llama-3", CONVERSATIONS["two_turns_open"], tok, add_generation_prompt=True)
    trained = [i for i, label in zip(got.input_ids, got.labels, strict=True) if label != IGNORE_INDEX]
    assert tok.decode(trained) == "Hello!<|eot_id|>"


def test_qwen3_mask_trains_each_answer_and_the_last_turns_reasoning():
    tok = TOKENIZERS["qwen3-real"]()
    got = render_with_mask("qwen3", CONVERSATIONS["reasoning"], tok)
    trained = [i for i, label in zip(got.input_ids, got.labels, strict=True) if label != IGNORE_INDEX]
    # the first answer's reasoning is not in the text (the official template drops it); the last one's is trained
    assert tok.decode(trained) == "A1.<|im_end|><think>\nsecond\nthought\n</think>\n\nA2.<|im_end|>"
    assert tok.decode(got.input_ids).count("<think>") == 1


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(TemplateError, match="fast tokenizer"):
        ChatMasker("chatml", Slow())


@pytest.mark.parametrize("markup,expected", [
    (False, "<u>[x]</u><a>[[Hi [b]\\]]</a>"),
    (True, "<u>\\[x]</u><a>[bold green]Hi \\[b]\\\\[/bold green]</a>"),
])
def test_highlight_marks_spans_and_escapes_markup(markup, expected):
    text = "<u>[x]</u><a>Hi [b]\\</a>"
    start = text.index("Hi")
    assert highlight(text, [(start, start + len("Hi [b]\\"))], markup=markup) == expected


def test_highlight_markup_renders_to_the_original_text():
    from rich.text import Text

    text = "user: [b]x[/b] \\ assistant: [i]y[/i]\\"
    start = text.index("[i]")
    assert Text.from_markup(highlight(text, [(start, len(text))], markup=True)).plain == text
