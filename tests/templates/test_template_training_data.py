"""The trainer's data path with a model's own official template: its registry equivalent builds the masks.

Tiny models around the official repos' tokenizer files (testdata.real_tokenizer); trainer.data is
used as a library. Ids must be the official template's (transformers' apply_chat_template with the
model's own template); the trained tokens exactly the assistant parts found from the official
template (template_refs.spans_after_prompt).
"""

from __future__ import annotations

import json

import builders
import pytest
import testdata
from template_refs import CONVERSATIONS, spans_after_prompt

from healer.model_dir import ModelDir
from healer.templates import IGNORE_INDEX

KEYS = ["one_turn", "system_three_turns", "five_turns", "unicode", "multiline", "reasoning", "tool_response_text"]


@pytest.mark.parametrize("name,entry", [("qwen3", "qwen3"), ("gemma3", "gemma-3")])
def test_prepare_data_masks_with_the_models_own_template(tmp_path, name, entry):
    from trainer.data import prepare_data, resolve_template

    model = builders.real_checkpoint(tmp_path / "model", testdata.real_tokenizer(name), name)
    ckpt = ModelDir(model)
    tok = ckpt.hf_tokenizer()
    template = resolve_template(None, ckpt.chat_template, model, bos_token=tok.bos_token, eos_token=tok.eos_token)
    assert template.entry is not None and template.entry.name == entry
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": CONVERSATIONS[k]}) + "\n" for k in KEYS), encoding="utf-8")

    prepared = prepare_data(data, tok, template, max_seq_len=4096, train_on_inputs=False)

    assert [ex.row for ex in prepared.examples] == list(range(len(KEYS)))
    variables = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    for key, ex in zip(KEYS, prepared.examples, strict=True):
        conv = CONVERSATIONS[key]
        assert ex.input_ids == tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"], key
        text = tok.decode(ex.input_ids)
        spans = spans_after_prompt(ckpt.chat_template, conv, False, template.entry.end_of_turn(tok.eos_token),
                                   **variables)
        trained = [i for i, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE_INDEX]
        assert all(label in (i, IGNORE_INDEX) for i, label in zip(ex.input_ids, ex.labels, strict=True))
        assert tok.decode(trained) == "".join(text[a:b] for a, b in spans), key


def test_reasoning_content_of_a_dataset_row_is_rendered_and_trained_with_qwen3(tmp_path):
    """A `reasoning_content` field (how reasoning datasets ship Qwen3's thinking) reaches the template:
    the ids equal the official template's for the same messages, and the reasoning is trained."""
    from trainer.data import prepare_model_data

    model = builders.real_checkpoint(tmp_path / "model", testdata.real_tokenizer("qwen3"), "qwen3")
    conv = [{"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "4.", "reasoning_content": "Two plus two is four."}]
    data = tmp_path / "chats.jsonl"
    # a second row without the field: datasets then fills it with None in the first row's schema
    data.write_text(json.dumps({"messages": conv}) + "\n" + json.dumps({"messages": conv[:1] + [
        {"role": "assistant", "content": "Hi."}]}) + "\n", encoding="utf-8")
    ckpt = ModelDir(model)
    tok = ckpt.hf_tokenizer()
    _, prepared = prepare_model_data(ckpt, data, None, max_seq_len=4096, train_on_inputs=False)
    ex = prepared.examples[0]
    assert ex.input_ids == tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    trained = tok.decode([i for i, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE_INDEX])
    assert trained == "<think>\nTwo plus two is four.\n</think>\n\n4.<|im_end|>"
