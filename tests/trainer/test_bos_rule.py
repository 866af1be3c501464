"""Train/serve consistency: every example starts with exactly one BOS where the family uses one.

The reference is transformers' own chat path (`apply_chat_template`, which tokenizes the rendered
template without special tokens) plus the one rule (BOS in front unless the template wrote it),
on the official tokenizer files of Llama 2, Llama 3, Llama 3.1, Gemma 3, Qwen3 and a Mistral v1
checkpoint patched with ChatML. `trainer run --preview` shows exactly those ids.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import builders
import pytest
import testdata
import tiny_runs

from healer.fix import repair
from healer.model_dir import ModelDir
from trainer.data import IGNORE_INDEX, prepare_model_data

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CHATS = [
    {"messages": [{"role": "user", "content": "What colour is item 3?"},
                  {"role": "assistant", "content": "Item 3 is blue."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                  {"role": "assistant", "content": "Bye."}]},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_runs.write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", CHATS)


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    """name -> the official files of that repo in a tiny model, after `healer fix` (what a user trains)."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            model = builders.real_checkpoint(root / "model", testdata.real_tokenizer(name), name)
            repair(model, root / "fixed")
            built[name] = root / "fixed"
        return built[name]

    return get


@pytest.fixture(scope="module")
def mistral_chatml(tmp_path_factory) -> Path:
    """Mistral v1's real sentencepiece model, ChatML-patched by `healer fix --chatml`."""
    root = tmp_path_factory.mktemp("mistral")
    model = builders.sentencepiece_checkpoint(root / "model", testdata.mistral_model("v1"), family="mistral")
    repair(model, root / "fixed", chatml=True)
    return root / "fixed"


def training_ids(model: Path, data: Path, template: str | None = None) -> list[list[int]]:
    _, prepared = prepare_model_data(ModelDir(model), data, template, max_seq_len=4096, train_on_inputs=False)
    return [ex.input_ids for ex in prepared.examples]


def transformers_ids(model: Path, bos_first: bool) -> list[list[int]]:
    """apply_chat_template's ids (no special tokens added); for BOS families the template's own BOS text
    dropped and BOS put in front as an id, as llama.cpp serves it (common/chat.cpp)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    out = []
    for row in CHATS:
        if not bos_first:
            out.append(list(tok.apply_chat_template(row["messages"], tokenize=True, return_dict=False)))
            continue
        text = tok.apply_chat_template(row["messages"], tokenize=False).removeprefix(tok.bos_token)
        out.append([tok.bos_token_id, *tok.encode(text, add_special_tokens=False)])
    return out


@pytest.mark.parametrize("name, bos", [("llama3", 128000), ("llama3_1", 128000), ("gemma3", 2), ("qwen3", None)])
def test_training_ids_equal_transformers_chat_path_with_one_bos(fixed, data, name, bos):
    model = fixed(name)
    ids = training_ids(model, data)
    assert ids == transformers_ids(model, bos is not None)
    for example in ids:
        if bos is None:
            assert 151643 not in example[:1]  # Qwen: nothing added in front
        else:
            assert example[0] == bos and example[1] != bos


def test_llama2_registry_template_writes_bos_itself_and_gets_no_second(fixed, data):
    ids = training_ids(fixed("llama2"), data, "llama-2")
    assert all(example[0] == 1 and example[1] != 1 for example in ids)


def test_chatml_on_mistral_gets_bos_from_the_trainer(mistral_chatml, data):
    """The ChatML template writes no BOS; Mistral was pretrained with <s> first: the trainer adds it once."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(mistral_chatml))
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    ids = training_ids(mistral_chatml, data)
    assert all(example[:2] == [1, im_start] for example in ids)
    assert ids == transformers_ids(mistral_chatml, True)
    # the served prompt starts the same way: encode() (llama.cpp's add_bos) gives <s> first too
    assert tok.encode("<|im_start|>user")[:2] == [1, im_start]


def test_plain_text_of_llama3_as_released_gets_bos_from_the_trainer(tmp_path):
    """Raw text goes through encode(); Llama 3's first tokenizer.json adds no BOS: the trainer adds one."""
    model = builders.real_checkpoint(tmp_path / "model", testdata.real_tokenizer("llama3"), "llama3")
    text = tiny_runs.write_jsonl(tmp_path / "text.jsonl", [{"text": "Hello world"}])
    (ids,) = training_ids(model, text)
    assert ids == [128000, 9906, 1917, 128001]


def test_bos_is_never_a_trained_label(fixed, data):
    _, prepared = prepare_model_data(ModelDir(fixed("llama3_1")), data, None, max_seq_len=4096,
                                     train_on_inputs=False)
    for ex in prepared.examples:
        assert ex.labels[0] == IGNORE_INDEX


# --------------------------------------------------------------------------- trainer run --preview


def run_preview(model: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainer", "run", "--model", str(model), "--data", str(data), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_preview_json_prints_the_training_ids_and_writes_nothing(mistral_chatml, data, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_preview(mistral_chatml, data, "--preview", "2", "--json", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["row"] for line in lines] == [0, 1]
    assert [line["input_ids"] for line in lines] == training_ids(mistral_chatml, data)
    _, prepared = prepare_model_data(ModelDir(mistral_chatml), data, None, max_seq_len=4096, train_on_inputs=False)
    assert [line["labels"] for line in lines] == [ex.labels for ex in prepared.examples]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run dir


def test_preview_text_marks_the_trained_spans(fixed, data):
    proc = run_preview(fixed("llama3_1"), data, "--preview", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("--- row 0:")
    assert "[[Item 3 is blue.<|eot_id|>]]" in proc.stdout
    assert "What colour is item 3?" in proc.stdout and "[[What colour" not in proc.stdout


def test_preview_json_without_preview_is_a_usage_error(fixed, data):
    proc = run_preview(fixed("llama3_1"), data, "--json")
    assert proc.returncode == 2 and "--preview" in proc.stderr and "Traceback" not in proc.stderr
