"""Dataset records of the common shapes become OpenAI-style messages; bad input names where it is."""

from __future__ import annotations

import json

import pytest

from healer.errors import HealerError
from healer.templates import DatasetFormatError, get, load_examples, load_messages, normalize


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def test_sharegpt_roles_map_to_openai_roles():
    record = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                {"from": "gpt", "value": "Hello"}], "id": "x1"}
    ex = normalize(record)
    assert ex.format == "sharegpt" and ex.text is None
    assert ex.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}]


def test_alpaca_input_follows_instruction_after_a_blank_line():
    with_input = normalize({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"})
    assert with_input.messages == [{"role": "user", "content": "Translate.\n\nBonjour"},
                                   {"role": "assistant", "content": "Hello"}]
    without = normalize({"instruction": "Say hi.", "input": "", "output": "Hi"})
    assert without.messages[0] == {"role": "user", "content": "Say hi."}
    assert normalize({"instruction": "Say hi.", "output": "Hi"}).messages == without.messages


def test_alpaca_record_renders_in_the_stanford_alpaca_layout():
    ex = normalize({"instruction": "Name a colour.", "input": "", "output": "Blue."})
    text = get("alpaca").render(ex.messages, bos_token="", eos_token="</s>")
    assert text.endswith("### Instruction:\nName a colour.\n\n### Response:\nBlue.</s>")


def test_messages_and_text_records_pass_through():
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert normalize({"messages": msgs}).messages == msgs
    assert normalize({"text": "plain words"}).text == "plain words"
    assert normalize({"text": "plain words"}).messages is None


def test_unknown_shape_names_record_and_keys_found():
    with pytest.raises(DatasetFormatError, match=r"data.jsonl line 3: unknown record shape \(keys: answer, prompt\)"):
        normalize({"prompt": "x", "answer": "y"}, "data.jsonl line 3")
    assert issubclass(DatasetFormatError, HealerError)


@pytest.mark.parametrize("record,message", [
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\] has from='bot'"),
    ({"conversations": [{"role": "user", "content": "x"}]}, r"conversations\[0\] needs 'from' and 'value'"),
    ({"messages": [{"role": "user", "content": ["parts"]}]}, r"messages\[0\].content must be a string"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": "hi"}, "'messages' must be a list"),
    ({"instruction": 3, "output": "x"}, "instruction must be a string"),
    (["not", "an", "object"], "expected a JSON object, got list"),
])
def test_malformed_records_give_a_clear_error(record, message):
    with pytest.raises(DatasetFormatError, match=message):
        normalize(record, "rec 0")


def test_jsonl_loader_normalizes_mixed_shapes(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"conversations": [{"from": "human", "value": "Ciao 👋"}, {"from": "gpt", "value": "Ciao!"}]},
                       {"instruction": "I", "output": "O"}, {"text": "T"}])
    examples = load_examples(path)
    assert [e.format for e in examples] == ["sharegpt", "alpaca", "text"]
    assert examples[0].messages[0]["content"] == "Ciao 👋"


def test_jsonl_malformed_line_names_its_line_number(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"data.jsonl line 4: invalid JSON at column 10"):
        load_examples(path)


def test_jsonl_unknown_shape_names_its_line_number(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"text": "a"}, {"question": "q"}])
    with pytest.raises(DatasetFormatError, match=r"data.jsonl line 2: unknown record shape \(keys: question\)"):
        load_examples(path)


def test_json_array_errors_name_the_record_index(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"q": 1}]), encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"data.json record 2: unknown record shape \(keys: q\)"):
        load_examples(path)
    path.write_text('[{"text": "a"},\n {"text": }]', encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="data.json: invalid JSON at line 2 column 11"):
        load_examples(path)
    path.write_text('{"text": "a"}', encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="expected a JSON array of records"):
        load_examples(path)


def test_missing_and_non_utf8_files_are_typed_errors(tmp_path):
    with pytest.raises(DatasetFormatError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(DatasetFormatError, match="not UTF-8"):
        load_examples(bad)


def test_load_messages_accepts_a_message_list_or_one_record(tmp_path):
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    (tmp_path / "list.json").write_text(json.dumps(msgs), encoding="utf-8")
    (tmp_path / "sharegpt.json").write_text(json.dumps(
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}), encoding="utf-8")
    assert load_messages(tmp_path / "list.json") == msgs
    assert load_messages(tmp_path / "sharegpt.json") == msgs
    (tmp_path / "text.json").write_text(json.dumps({"text": "t"}), encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="plain text, not a conversation"):
        load_messages(tmp_path / "text.json")
