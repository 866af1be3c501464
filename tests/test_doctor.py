"""Each doctor check fires on its planted defect and stays silent on healthy checkpoints.

Checkpoints are tiny transformers models around real tokenizers: Llama 2's sentencepiece
model and Llama 3's BPE tokenizer (llama.cpp's test vocabularies), Mistral's v1 model
(mistral-common) and official chat templates shipped with llama.cpp.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import builders
import pytest
import sentencepiece as spm
import testdata

import healer
from healer.model_dir import ModelDir
from healer.tokenizers.convert import convert_verified
from healer.tokenizers.corpus import builtin_corpus

LLAMA3_TEMPLATE = "meta-llama-Llama-3.1-8B-Instruct"


def diagnose(path: Path) -> healer.Report:
    return healer.diagnose(path)


def checks(report: healer.Report, severity: str | None = None) -> set[str]:
    return {f.check for f in report.findings if severity is None or f.severity == severity}


def copy(src: Path, tmp_path: Path, name: str = "model") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    obj = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            obj.pop(k, None)
        else:
            obj[k] = v
    path.write_text(json.dumps(obj, indent=2))


@pytest.fixture(scope="module")
def llama2(tmp_path_factory) -> Path:
    """Healthy: Llama 2's real sentencepiece tokenizer, slow only, adds BOS, separate pad-less config."""
    out = tmp_path_factory.mktemp("llama2") / "llama-2-tiny"
    return builders.sentencepiece_checkpoint(out, testdata.sentencepiece_model("llama-spm"))


@pytest.fixture(scope="module")
def llama3_instruct(tmp_path_factory) -> Path:
    """Healthy instruct model: Llama 3's real BPE tokenizer and the official Llama 3.1 template."""
    out = tmp_path_factory.mktemp("llama3") / "llama-3-tiny-instruct"
    builders.fast_checkpoint(
        out, testdata.fast_tokenizer_json("llama-bpe"), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|reserved_special_token_0|>", chat_template=testdata.template(LLAMA3_TEMPLATE),
        add_bos=True,
    )
    edit_json(out / "generation_config.json", eos_token_id=[128001, 128008, 128009])
    return out


def test_slow_only_sentencepiece_checkpoint_has_one_error_the_loaders_conversion(llama2):
    report = diagnose(llama2)
    # transformers builds the fast tokenizer on the fly, and its conversion differs from sentencepiece
    assert checks(report, "error") == {"tokenizer.missing_fast"}
    assert checks(report, "warning") == set()
    assert checks(report) == {"tokenizer.missing_fast", "tokenizer.pad_missing", "template.missing"}


def test_healthy_llama3_instruct_checkpoint_has_no_errors(llama3_instruct):
    report = diagnose(llama3_instruct)
    assert checks(report, "error") == set(), report.to_json()
    # the official template writes <|begin_of_text|> and encode() adds it too: not a defect, since rendered
    # templates are tokenized without special tokens (apply_chat_template, TRL, trainer run)
    assert checks(report, "warning") == set()


def test_mistral_v1_tokenizer_json_from_transformers_is_a_fast_mismatch(tmp_path):
    sp_model = testdata.mistral_model("v1")
    converted = builders.converted_tokenizer_json(sp_model, tmp_path / "conv")
    ckpt = builders.sentencepiece_checkpoint(tmp_path / "mistral", sp_model, family="mistral",
                                             tokenizer_json=converted)
    (finding,) = diagnose(ckpt).by_check("tokenizer.fast_mismatch")
    assert finding.severity == "error"
    assert finding.details["differing"] > 0
    first = finding.details["first"][0]
    assert first["sentencepiece"] != first["fast"]
    mism = {d["text"]: d for d in finding.details["first"]}
    if " " in mism:  # the documented case: " " -> sentencepiece [259], fast [28705]
        assert mism[" "]["sentencepiece"] == [259] and mism[" "]["fast"] == [28705]


def test_missing_fast_is_an_error_when_transformers_converts_unlike_sentencepiece(llama2):
    from transformers import AutoTokenizer

    (finding,) = diagnose(llama2).by_check("tokenizer.missing_fast")
    assert finding.severity == "error"
    assert finding.fix.startswith("healer fix ")
    sp = spm.SentencePieceProcessor(model_file=str(llama2 / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(llama2))
    assert 0 < finding.details["differing"] < finding.details["compared"]
    for d in finding.details["first"]:
        assert d["sentencepiece"] == sp.encode(d["text"]) != d["transformers"]
        assert d["transformers"] == hf(d["text"], add_special_tokens=False, split_special_tokens=True).input_ids


def test_loader_mismatch_when_tokenizer_class_rebuilds_a_verified_tokenizer_json(tmp_path):
    sp_model = testdata.sentencepiece_model("llama-spm")
    verified = tmp_path / "verified" / "tokenizer.json"
    verified.parent.mkdir()
    verified.write_text(convert_verified(sp_model, builtin_corpus()).tokenizer_json)
    ckpt = builders.sentencepiece_checkpoint(tmp_path / "m", sp_model, tokenizer_json=verified)
    edit_json(ckpt / "tokenizer_config.json", tokenizer_class="LlamaTokenizer")
    report = diagnose(ckpt)
    assert "tokenizer.fast_mismatch" not in report.checks()
    (finding,) = report.by_check("tokenizer.loader_mismatch")
    assert finding.severity == "error" and finding.details["tokenizer_class"] == "LlamaTokenizer"
    assert {"text": " ", "sentencepiece": [259], "transformers": [29871]} in finding.details["first"]
    edit_json(ckpt / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")
    assert "tokenizer.loader_mismatch" not in diagnose(ckpt).checks()


def test_bos_missing_when_llama3_tokenizer_never_adds_bos(llama3_instruct, tmp_path):
    model = copy(llama3_instruct, tmp_path)
    tj = json.loads((model / "tokenizer.json").read_text())
    # what broken Llama 3 uploads shipped: a post-processor that never adds BOS
    tj["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                            "use_regex": True}
    (model / "tokenizer.json").write_text(json.dumps(tj))
    edit_json(model / "tokenizer_config.json", chat_template=None)
    (finding,) = diagnose(model).by_check("tokenizer.bos_missing")
    assert finding.severity == "error"
    assert finding.details["encoded"][0] != 128000


def test_bos_missing_when_add_bos_token_is_false_for_llama(llama2, tmp_path):
    model = copy(llama2, tmp_path)
    edit_json(model / "tokenizer_config.json", add_bos_token=False)
    assert "tokenizer.bos_missing" in checks(diagnose(model), "error")


def test_double_bos_when_the_template_writes_bos_twice(llama3_instruct, tmp_path):
    model = copy(llama3_instruct, tmp_path)
    edit_json(model / "tokenizer_config.json", chat_template="{{- bos_token }}" + testdata.template(LLAMA3_TEMPLATE))
    (finding,) = diagnose(model).by_check("tokenizer.double_bos")
    assert finding.details["encoded"][:2] == [128000, 128000]


def test_no_double_bos_when_template_and_tokenizer_both_write_bos(llama3_instruct):
    assert "tokenizer.double_bos" not in checks(diagnose(llama3_instruct))


def test_no_double_bos_when_template_does_not_write_bos(llama3_instruct, tmp_path):
    model = copy(llama3_instruct, tmp_path)
    template = testdata.template(LLAMA3_TEMPLATE).replace("{{- bos_token }}", "")
    assert template != testdata.template(LLAMA3_TEMPLATE)
    edit_json(model / "tokenizer_config.json", chat_template=template)
    assert "tokenizer.double_bos" not in checks(diagnose(model))


def test_pad_is_eos_warning(llama2, tmp_path):
    model = copy(llama2, tmp_path)
    edit_json(model / "tokenizer_config.json", pad_token="</s>")
    (finding,) = diagnose(model).by_check("tokenizer.pad_is_eos")
    assert finding.severity == "warning"


def test_pad_is_eos_from_config_ids(llama2, tmp_path):
    model = copy(llama2, tmp_path)
    edit_json(model / "config.json", pad_token_id=2)
    assert "tokenizer.pad_is_eos" in checks(diagnose(model))


def test_id_out_of_range_for_added_tokens_past_embedding(tmp_path):
    """Phi-3's tokenizer adds <|endoftext|>=32000.. <|user|>=32010; a 32000-row model cannot embed them."""
    sp_model = testdata.sentencepiece_model("phi-3")
    tj = testdata.fast_tokenizer_json("phi-3")
    model = builders.sentencepiece_checkpoint(tmp_path / "phi3", sp_model, family="llama", vocab_size=32000,
                                              tokenizer_json=tj)
    report = diagnose(model)
    (finding,) = report.by_check("tokenizer.id_out_of_range")
    assert finding.severity == "error"
    ids = [t["id"] for t in finding.details["tokens"]]
    assert min(ids) == 32000 and all(i >= 32000 for i in ids)
    assert any(t["token"] == "<|user|>" for t in finding.details["tokens"])
    assert "config.vocab_mismatch" in checks(report, "error")


def test_dangling_added_token_collision_is_error(llama2, tmp_path):
    model = copy(llama2, tmp_path)
    edit_json(model / "tokenizer_config.json", added_tokens_decoder={
        "0": {"content": "<unk>", "special": True}, "1": {"content": "<s>", "special": True},
        "2": {"content": "<|im_end|>", "special": True},  # tokenizer.model says id 2 is </s>
    })
    findings = diagnose(model).by_check("tokenizer.dangling_added_token")
    errors = [f for f in findings if f.severity == "error"]
    assert len(errors) == 1
    assert errors[0].details["collisions"][0]["id"] == 2


def test_dangling_added_token_missing_from_a_file_is_warning(llama3_instruct, tmp_path):
    model = copy(llama3_instruct, tmp_path)
    (model / "added_tokens.json").write_text(json.dumps({"<|extra_token|>": 128000 + 300}))
    findings = diagnose(model).by_check("tokenizer.dangling_added_token")
    assert [f.severity for f in findings] == ["warning"]
    assert findings[0].details["tokens"][0]["token"] == "<|extra_token|>"


def test_template_missing_is_warning_for_instruct_models(llama3_instruct, tmp_path):
    model = copy(llama3_instruct, tmp_path, name="Tiny-Instruct")
    edit_json(model / "tokenizer_config.json", chat_template=None)
    (finding,) = diagnose(model).by_check("template.missing")
    assert finding.severity == "warning"
    assert "<|eot_id|>" in finding.details["turn_tokens"]


def test_template_missing_is_info_for_base_models(llama2):
    (finding,) = diagnose(llama2).by_check("template.missing")
    assert finding.severity == "info"


def test_template_render_error_is_a_finding_not_a_crash(llama2, tmp_path):
    model = copy(llama2, tmp_path)
    (model / "chat_template.jinja").write_text("{% for message in messages %}{{ message['content'] }")
    report = diagnose(model)
    (finding,) = report.by_check("template.render_error")
    assert finding.severity == "error"
    assert "TemplateSyntaxError" in finding.message


def test_chatml_markers_not_single_tokens_in_llama2_vocab(llama2, tmp_path):
    model = copy(llama2, tmp_path)
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}")
    edit_json(model / "tokenizer_config.json", chat_template=chatml)
    (finding,) = diagnose(model).by_check("template.tokens_not_single")
    assert finding.severity == "error"
    assert set(finding.details["markers"]) == {"<|im_start|>", "<|im_end|>"}
    assert all(len(ids) > 1 for ids in finding.details["markers"].values())


def test_eos_mismatch_when_eot_is_not_a_stop_token(llama3_instruct, tmp_path):
    model = copy(llama3_instruct, tmp_path)
    edit_json(model / "tokenizer_config.json", eos_token="<|end_of_text|>")
    edit_json(model / "generation_config.json", eos_token_id=128001)
    (finding,) = diagnose(model).by_check("template.eos_mismatch")
    assert finding.details["end_of_turn"] == "<|eot_id|>"
    assert finding.details["end_of_turn_id"] == 128009


def test_no_eos_mismatch_when_generation_config_lists_eot(llama3_instruct, tmp_path):
    model = copy(llama3_instruct, tmp_path)
    edit_json(model / "tokenizer_config.json", eos_token="<|end_of_text|>")
    assert "template.eos_mismatch" not in checks(diagnose(model))


def test_vocab_mismatch_between_config_and_embedding(llama2, tmp_path):
    model = copy(llama2, tmp_path)
    edit_json(model / "config.json", vocab_size=32100)
    (finding,) = diagnose(model).by_check("config.vocab_mismatch")
    assert finding.severity == "error"
    assert finding.details["config.vocab_size"] == 32100 and finding.details["embedding rows"] == 32000


def test_padded_embedding_rows_are_info(tmp_path):
    model = builders.sentencepiece_checkpoint(tmp_path / "m", testdata.sentencepiece_model("llama-spm"),
                                              vocab_size=32064)
    (finding,) = diagnose(model).by_check("config.vocab_mismatch")
    assert finding.severity == "info"


def test_tied_mismatch_when_config_says_tied_but_head_is_stored(llama2, tmp_path):
    model = copy(llama2, tmp_path)
    assert ModelDir(model).lm_head_name == "lm_head.weight"
    edit_json(model / "config.json", tie_word_embeddings=True)
    (finding,) = diagnose(model).by_check("config.tied_mismatch")
    assert finding.severity == "warning"


def test_report_json_shape(llama2):
    data = json.loads(diagnose(llama2).to_json())
    assert set(data) == {"model", "findings", "summary"}
    assert set(data["summary"]) == {"error", "warning", "info"}
    for f in data["findings"]:
        assert set(f) == {"check", "severity", "message", "fix", "details"}
