"""Training data: formats, template rendering against transformers, assistant-only labels, truncation, packing."""

from __future__ import annotations

import json
from pathlib import Path

import builders
import pytest
import testdata
import torch

from healer.errors import HealerError
from healer.model_dir import ModelDir
from trainer.data import (
    IGNORE_INDEX,
    DataError,
    as_sequences,
    collate,
    pack,
    prepare_data,
    resolve_template,
    step_plan,
)

CHATS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6, of course."}],
    [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue"}],
]


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama3") / "model"
    return builders.fast_checkpoint(out, testdata.fast_tokenizer_json("llama-bpe"), bos_token="<|begin_of_text|>",
                                    eos_token="<|eot_id|>",
                                    chat_template=testdata.template("meta-llama-Llama-3.1-8B-Instruct"))


@pytest.fixture(scope="module")
def tok(llama3):
    return ModelDir(llama3).hf_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def model_template(llama3):
    return resolve_template(None, ModelDir(llama3).chat_template, llama3, bos_token="<|begin_of_text|>",
                            eos_token="<|eot_id|>")


def test_messages_sharegpt_and_alpaca_rows_render_like_apply_chat_template(llama3, tok, tmp_path):
    rows = [
        {"messages": CHATS[0]},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
                           {"from": "gpt", "value": "4"}, {"from": "human", "value": "and 3+3?"},
                           {"from": "gpt", "value": "6, of course."}]},
        {"instruction": "Name a colour", "input": "", "output": "Blue"},
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
    ]
    expected_chats = [*CHATS[:3], [{"role": "user", "content": "Add\n\n1 and 2"},
                                   {"role": "assistant", "content": "3"}]]
    data = prepare_data(write_jsonl(tmp_path / "d.jsonl", rows), tok, model_template(llama3), max_seq_len=4096,
                        train_on_inputs=False)
    assert [ex.row for ex in data.examples] == [0, 1, 2, 3]
    for ex, chat in zip(data.examples, expected_chats, strict=True):
        assert ex.input_ids == list(tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])


# Not in the registry: masks come from rendering turn by turn
CUSTOM = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|start_header_id|>bot"
          "<|end_header_id|>\n{GEN}{{ m['content'] }}<|eot_id|>{END}{% else %}<|start_header_id|>{{ m['role'] }}"
          "<|end_header_id|>\n{{ m['content'] }}<|eot_id|>{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>bot<|end_header_id|>\n{% endif %}")


@pytest.mark.parametrize("template", [None, "llama-3.1", "custom.jinja"])
def test_assistant_only_labels_match_transformers_generation_mask(llama3, tok, tmp_path, template):
    """Reference: transformers' return_assistant_tokens_mask over a {% generation %}-tagged template."""
    from healer.templates import registry

    tagged = registry.get("llama-3.1").tracked_source
    if template == "custom.jinja":
        (tmp_path / template).write_text(CUSTOM.replace("{GEN}", "").replace("{END}", ""), encoding="utf-8")
        template = str(tmp_path / template)
        tagged = CUSTOM.replace("{GEN}", "{% generation %}").replace("{END}", "{% endgeneration %}")
    resolved = resolve_template(template, ModelDir(llama3).chat_template, llama3, bos_token="<|begin_of_text|>",
                                eos_token="<|eot_id|>")
    assert (resolved.entry is None) == template.endswith(".jinja") if template else resolved.entry.name == "llama-3.1"
    data = prepare_data(write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in CHATS]), tok,
                        resolved, max_seq_len=4096, train_on_inputs=False)
    for ex, chat in zip(data.examples, CHATS, strict=True):
        ref = tok.apply_chat_template(chat, chat_template=tagged, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert ex.input_ids == list(ref["input_ids"])
        expected = [t if m else IGNORE_INDEX for t, m in zip(ref["input_ids"], ref["assistant_masks"], strict=True)]
        assert ex.labels == expected
        assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]).endswith("<|eot_id|>")


def test_train_on_inputs_labels_every_token(llama3, tok, tmp_path):
    data = prepare_data(write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in CHATS]), tok,
                        model_template(llama3), max_seq_len=4096, train_on_inputs=True)
    assert all(ex.labels == ex.input_ids for ex in data.examples)


def test_text_rows_train_on_everything_with_bos_and_eos(llama3, tok, tmp_path):
    data = prepare_data(write_jsonl(tmp_path / "d.jsonl", [{"text": "plain pretraining text"}]), tok,
                        model_template(llama3), max_seq_len=4096, train_on_inputs=False)
    (ex,) = data.examples
    expected = tok("plain pretraining text")["input_ids"] + [tok.convert_tokens_to_ids("<|eot_id|>")]
    assert ex.input_ids == expected and ex.labels == expected


def test_truncation_counts_examples_and_drops_those_left_without_targets(llama3, tok, tmp_path):
    def n_tokens(chat, **kw):
        return len(tok.apply_chat_template(chat, tokenize=True, return_dict=True, **kw)["input_ids"])

    lengths = [n_tokens(c) for c in CHATS]
    first_answer = [n_tokens(c[:next(i for i, m in enumerate(c) if m["role"] == "assistant")],
                             add_generation_prompt=True) for c in CHATS]
    limit = first_answer[2]  # chat 2 keeps its prompt only
    data = prepare_data(write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in CHATS]), tok,
                        model_template(llama3), max_seq_len=limit, train_on_inputs=False)
    kept = [i for i in range(3) if first_answer[i] < limit]
    assert data.truncated == sum(n > limit for n in lengths)
    assert data.dropped_no_targets == 3 - len(kept)
    assert [ex.row for ex in data.examples] == kept
    assert 0 < data.dropped_no_targets < data.truncated
    assert all(len(ex.input_ids) == min(limit, lengths[ex.row]) for ex in data.examples)


def test_malformed_jsonl_line_is_named_by_number(llama3, tok, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"messages": CHATS[0]}) + "\n\n" + '{"messages": [}\n', encoding="utf-8")
    with pytest.raises(HealerError, match=r"d\.jsonl line 3: invalid JSON"):
        prepare_data(p, tok, model_template(llama3), max_seq_len=64, train_on_inputs=False)


def test_malformed_json_array_is_named_by_line(llama3, tok, tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n {"text": "a"},\n {"text": "b",,}\n]\n', encoding="utf-8")
    with pytest.raises(HealerError, match=r"d\.json: invalid JSON at line 3"):
        prepare_data(p, tok, model_template(llama3), max_seq_len=64, train_on_inputs=False)


def test_unknown_row_format_names_the_line_and_keys(llama3, tok, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHATS[0]}, {"question": "q", "answer": "a"}])
    with pytest.raises(HealerError, match=r"d\.jsonl line 2: unknown record shape \(keys: answer, question\)"):
        prepare_data(p, tok, model_template(llama3), max_seq_len=64, train_on_inputs=False)


def test_empty_dataset_is_an_error(llama3, tok, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        prepare_data(p, tok, model_template(llama3), max_seq_len=64, train_on_inputs=False)


def test_parquet_and_csv_give_the_same_examples_as_jsonl(llama3, tok, tmp_path):
    import pandas as pd

    rows = [{"instruction": "Name a colour", "input": "", "output": "Blue"},
            {"instruction": "Add", "input": "1 and 2", "output": "3"}]
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    got = {}
    for name in ("d.jsonl", "d.parquet", "d.csv"):
        path = write_jsonl(tmp_path / name, rows) if name.endswith("jsonl") else tmp_path / name
        data = prepare_data(path, tok, model_template(llama3), max_seq_len=4096, train_on_inputs=False)
        got[name] = [(ex.input_ids, ex.labels) for ex in data.examples]
    assert got["d.jsonl"] == got["d.parquet"] == got["d.csv"]
    assert len(got["d.jsonl"]) == 2


def test_template_whose_markers_are_not_single_tokens_is_refused(llama3, tok, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHATS[0]}])
    with pytest.raises(DataError, match="'<|im_start|>' encodes as"):
        prepare_data(p, tok, resolve_template("chatml", None, llama3), max_seq_len=64, train_on_inputs=False)


def test_model_without_template_needs_template_flag(llama3):
    with pytest.raises(DataError, match="no chat template; give --template"):
        resolve_template(None, None, llama3)


def test_packing_restarts_positions_and_never_splits_an_example(llama3, tok, tmp_path):
    data = prepare_data(write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in CHATS * 3]), tok,
                        model_template(llama3), max_seq_len=200, train_on_inputs=False)
    seqs = pack(data.examples, 200)
    assert sorted(r for s in seqs for r in s.rows) == list(range(9))
    for s in seqs:
        assert len(s.input_ids) <= 200
        starts = [i for i, p in enumerate(s.position_ids) if p == 0]
        assert len(starts) == len(s.rows)
        for start, row in zip(starts, s.rows, strict=True):
            ex = data.examples[row]
            assert s.input_ids[start:start + len(ex.input_ids)] == ex.input_ids
            assert s.labels[start] == IGNORE_INDEX
            assert s.labels[start + 1:start + len(ex.labels)] == ex.labels[1:]
    # greedy: a sequence is only closed when the next example would not fit
    for a, b in zip(seqs, seqs[1:], strict=False):
        assert len(a.input_ids) + len(data.examples[b.rows[0]].input_ids) > 200


def test_packed_batch_gives_the_same_per_example_losses_as_one_by_one(llama3, tok, tmp_path):
    from trainer.models import load_model

    model = load_model(llama3, dtype=torch.float32, device="cpu", load_in_4bit=False).eval()
    data = prepare_data(write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in CHATS]), tok,
                        model_template(llama3), max_seq_len=400, train_on_inputs=False)
    (seq,) = pack(data.examples, 400)
    batch = collate([seq], pad_id=0)
    with torch.no_grad():
        logits = model(batch.input_ids, position_ids=batch.position_ids).logits[0]
    starts = [i for i, p in enumerate(seq.position_ids) if p == 0] + [len(seq.input_ids)]
    for (a, b), ex in zip(zip(starts, starts[1:], strict=False), data.examples, strict=True):
        targets = torch.tensor(ex.labels[1:])
        packed = torch.nn.functional.cross_entropy(logits[a:b - 1], targets, ignore_index=IGNORE_INDEX)
        single = collate(as_sequences([ex]), pad_id=0)
        with torch.no_grad():
            alone = model(single.input_ids, labels=single.labels, position_ids=single.position_ids).loss
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_collate_pads_right_without_labels_and_counts_targets():
    seqs = as_sequences([type("E", (), {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "row": 4})(),
                         type("E", (), {"input_ids": [8], "labels": [8], "row": 9})()])
    batch = collate(seqs, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert batch.rows == [4, 9] and batch.n_targets == 2
    wide = collate(seqs, pad_id=0, width=5)  # padded further for CUDA graph replay (trainer.graphs.padded_length)
    assert wide.input_ids.tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0]]
    assert wide.labels.tolist() == [[-100, 6, 7, -100, -100], [8, -100, -100, -100, -100]]
    assert wide.position_ids.tolist() == [[0, 1, 2, 3, 4]] * 2 and wide.plain_positions
    assert wide.n_targets == batch.n_targets and collate(seqs, pad_id=0, width=2).input_ids.shape == (2, 3)


def test_step_plan_visits_every_sequence_once_per_epoch_in_a_seeded_order():
    plan = step_plan(10, batch_size=3, grad_accum=2, epochs=2, max_steps=None, seed=7)
    assert [len(step) for step in plan] == [2, 2, 2, 2]  # 4 micro-batches per epoch -> steps of 2
    epoch_1 = [i for step in plan[:2] for mb in step for i in mb]
    epoch_2 = [i for step in plan[2:] for mb in step for i in mb]
    assert sorted(epoch_1) == sorted(epoch_2) == list(range(10))
    assert epoch_1 != epoch_2
    assert plan == step_plan(10, batch_size=3, grad_accum=2, epochs=2, max_steps=None, seed=7)
    assert plan != step_plan(10, batch_size=3, grad_accum=2, epochs=2, max_steps=None, seed=8)
    assert len(step_plan(10, batch_size=3, grad_accum=2, epochs=1, max_steps=7, seed=7)) == 7
