"""`healer fix` repairs what doctor finds, never touches its input, and verifies its output.

References: sentencepiece (the ground truth tokenizer), float64 means computed here, and
doctor re-run on the output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import builders
import pytest
import sentencepiece as spm
import testdata
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

import healer
from healer.example import build_example
from healer.fix import repair
from healer.tokenizers.compare import encode_by_segments
from healer.tokenizers.corpus import builtin_corpus

HEALER = [sys.executable, "-c", "import cli; cli.healer()"]
CHATML_SAMPLE = "<|im_start|>user\nhi<|im_end|>\n"


def snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


def trained_mean64(weight: torch.Tensor, untrained: list[int]) -> torch.Tensor:
    keep = torch.ones(weight.shape[0], dtype=torch.bool)
    keep[untrained] = False
    return weight.double()[keep].mean(0)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    return build_example(tmp_path_factory.mktemp("ex") / "example")


@pytest.fixture(scope="module")
def fixed_example(example, tmp_path_factory) -> tuple[Path, healer.Report, dict]:
    before = snapshot(example)
    out = tmp_path_factory.mktemp("out") / "fixed"
    report = repair(example, out, chatml=True)
    return out, report, before


def test_fix_leaves_no_errors_and_a_report(fixed_example):
    out, report, _ = fixed_example
    assert report.written and out.is_dir()
    after = healer.diagnose(out)
    assert not after.has_errors, after.to_json()
    saved = json.loads((out / "healer_report.json").read_text())
    claimed = {c["check"] for c in saved["changes"]}
    assert {"tokenizer.missing_fast", "tokenizer.bos_missing", "tokenizer.pad_is_eos", "embeddings.untrained",
            "template.tokens_not_single"} <= claimed
    for c in saved["changes"]:
        assert set(c) == {"check", "target", "description", "before", "after"}
    # the output is diagnosed in its staging dir before the rename; the saved report names where it is
    assert saved["after"]["model"] == str(out) and f".{out.name}.healer" not in json.dumps(saved), saved["after"]


def test_fix_never_modifies_its_input(example, fixed_example):
    _, _, before = fixed_example
    assert snapshot(example) == before


def test_chatml_markers_are_single_ids_in_sentencepiece_and_fast(fixed_example):
    out, _, _ = fixed_example
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    fast = Tokenizer.from_file(str(out / "tokenizer.json"))
    start, end = sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>")
    sp_ids = sp.encode(CHATML_SAMPLE)
    fast_ids = fast.encode(CHATML_SAMPLE, add_special_tokens=False).ids
    # the fast side follows llama.cpp's rule: each piece of text between markers is encoded by
    # sentencepiece on its own, dummy prefix included
    assert fast_ids == encode_by_segments(sp, [CHATML_SAMPLE], {"<|im_start|>": start, "<|im_end|>": end})[0]
    # sentencepiece's dummy prefix may put '▁' first; each marker is still exactly one id
    assert sp_ids.count(start) == 1 and sp_ids.count(end) == 1
    assert [i for i in sp_ids if i in (start, end)] == [start, end]
    gen = json.loads((out / "generation_config.json").read_text())
    assert end in gen["eos_token_id"] and 2 in gen["eos_token_id"]


def test_new_tokenizer_json_agrees_with_sentencepiece_on_the_corpus(fixed_example):
    out, _, _ = fixed_example
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    fast = Tokenizer.from_file(str(out / "tokenizer.json"))
    fast.encode_special_tokens = True
    texts = list(builtin_corpus())
    assert sp.encode(texts) == [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]


def test_bos_is_added_and_pad_is_not_eos(fixed_example):
    from transformers import AutoTokenizer

    out, _, _ = fixed_example
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.encode("What is 2 plus 2?")[0] == tok.bos_token_id == 1
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == tok.pad_token_id


def test_chatml_rows_get_the_unbiased_trained_mean(example, fixed_example):
    out, _, _ = fixed_example
    src, dst = load_file(example / "model.safetensors"), load_file(out / "model.safetensors")
    untrained = [3, 4, 5, 6]  # the example's four zero rows (reserved specials)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        expected = trained_mean64(src[name], untrained)
        for row in (3, 4):  # renamed to <|im_start|> / <|im_end|>
            assert torch.allclose(dst[name][row].double(), expected, atol=1e-6)
        biased = src[name].double().mean(0)
        assert not torch.allclose(dst[name][3].double(), biased, atol=1e-6)
        assert torch.equal(dst[name][5], src[name][5])  # unused reserved row left alone


def test_fix_on_its_own_output_changes_nothing(fixed_example, tmp_path):
    out, _, _ = fixed_example
    again = repair(out, tmp_path / "again", chatml=True)
    assert [c for c in again.changes if c.description != "ChatML chat template installed"] == []


def test_unchanged_shards_are_hard_linked(tmp_path):
    model = builders.sentencepiece_checkpoint(tmp_path / "m", testdata.sentencepiece_model("llama-spm"),
                                              max_shard_size="2MB", pad_token="<unk>")
    shards = sorted(model.glob("*.safetensors"))
    assert len(shards) > 1
    report = repair(model, tmp_path / "out")
    assert {c.check for c in report.changes} == {"tokenizer.missing_fast"}
    for s in shards:
        assert (tmp_path / "out" / s.name).stat().st_ino == s.stat().st_ino


def test_mistral_v1_bad_tokenizer_json_is_replaced_by_a_verified_one(tmp_path):
    sp_model = testdata.mistral_model("v1")
    converted = builders.converted_tokenizer_json(sp_model, tmp_path / "conv")
    model = builders.sentencepiece_checkpoint(tmp_path / "mistral", sp_model, family="mistral",
                                              tokenizer_json=converted, pad_token="<unk>")
    assert "tokenizer.fast_mismatch" in healer.diagnose(model).checks()
    report = repair(model, tmp_path / "out")
    assert "tokenizer.fast_mismatch" in report.claimed
    assert "tokenizer.fast_mismatch" not in healer.diagnose(tmp_path / "out").checks()
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    fast = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    for text, _ in testdata.vocab_cases("llama-spm"):  # llama.cpp's strings; Mistral's ids from sentencepiece
        assert fast.encode(text, add_special_tokens=False).ids == sp.encode(text)


def test_a_template_writing_bos_twice_loses_one(tmp_path):
    from transformers import AutoTokenizer

    template = "{{- bos_token }}" + testdata.template("meta-llama-Llama-3.1-8B-Instruct")
    model = builders.fast_checkpoint(
        tmp_path / "l3", testdata.fast_tokenizer_json("llama-bpe"), bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>", pad_token="<|reserved_special_token_0|>", add_bos=True, chat_template=template)
    assert "tokenizer.double_bos" in healer.diagnose(model).checks()
    repair(model, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)  # the chat path: the template's own BOS
    assert ids.count(128000) == 1 and ids[0] == 128000
    assert tok.encode("hi")[0] == 128000  # raw text keeps its BOS


def test_llama3_missing_bos_gets_a_post_processor(tmp_path):
    from transformers import AutoTokenizer

    model = builders.fast_checkpoint(tmp_path / "l3", testdata.fast_tokenizer_json("llama-bpe"),
                                     bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                     pad_token="<|reserved_special_token_0|>")
    assert "tokenizer.bos_missing" in healer.diagnose(model).checks()
    repair(model, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.encode("Hello world") == [128000, *tok.encode("Hello world", add_special_tokens=False)]


def test_pad_token_is_appended_when_nothing_reserved_exists(tmp_path):
    sp_model = testdata.sentencepiece_model("llama-spm")
    model = builders.sentencepiece_checkpoint(tmp_path / "l2", sp_model, pad_token="</s>")
    src = load_file(model / "model.safetensors")
    repair(model, tmp_path / "out")
    out = tmp_path / "out"
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.get_piece_size() == 32001 and sp.id_to_piece(32000) == "<|pad|>"
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 32001
    dst = load_file(out / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert dst[name].shape[0] == 32001
        assert torch.allclose(dst[name][32000].double(), trained_mean64(src[name], []), atol=1e-6)
        assert torch.equal(dst[name][:32000], src[name])


def test_dry_run_writes_nothing(example, tmp_path):
    report = repair(example, tmp_path / "out", chatml=True, dry_run=True)
    assert report.changes and not report.written
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == []


def test_existing_output_is_refused_without_force(example, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = subprocess.run([*HEALER, "fix", str(example), "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--force" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_sigterm_mid_fix_leaves_no_output_and_no_temp_dir(example, tmp_path):
    before = snapshot(example)
    proc = subprocess.Popen([*HEALER, "fix", str(example), "-o", str(tmp_path / "out"), "--chatml"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not any(p.name.startswith(".out.healer-") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    assert proc.poll() is None, "fix finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []
    assert snapshot(example) == before


def test_cli_json_report(example, tmp_path):
    result = subprocess.run([*HEALER, "fix", str(example), "-o", str(tmp_path / "o"), "--chatml", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["written"] and data["after"]["summary"]["error"] == 0
    shutil.rmtree(tmp_path / "o")


@pytest.fixture(scope="module")
def phi3_in_small_model(tmp_path_factory) -> Path:
    """Phi-3's tokenizer (added tokens 32000..32063) on a model with only 32000 embedding rows."""
    tmp = tmp_path_factory.mktemp("phi3")
    return builders.sentencepiece_checkpoint(tmp / "phi3", testdata.sentencepiece_model("phi-3"), vocab_size=32000,
                                             tokenizer_json=testdata.fast_tokenizer_json("phi-3"), pad_token="<unk>")


def test_out_of_range_special_tokens_grow_the_embeddings(phi3_in_small_model, tmp_path):
    src = load_file(phi3_in_small_model / "model.safetensors")
    repair(phi3_in_small_model, tmp_path / "out")
    after = healer.diagnose(tmp_path / "out")
    assert not {"tokenizer.id_out_of_range", "config.vocab_mismatch"} & checks_at(after, "error")
    dst = load_file(tmp_path / "out" / "model.safetensors")
    n = json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"]
    assert n == dst["model.embed_tokens.weight"].shape[0] == 32064
    assert torch.equal(dst["model.embed_tokens.weight"][:32000], src["model.embed_tokens.weight"])
    expected = trained_mean64(src["model.embed_tokens.weight"], [])
    assert torch.allclose(dst["model.embed_tokens.weight"][32010].double(), expected, atol=1e-6)


def test_out_of_range_tokens_can_be_dropped_instead(phi3_in_small_model, tmp_path):
    repair(phi3_in_small_model, tmp_path / "out", out_of_range="drop")
    tj = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert max(t["id"] for t in tj["added_tokens"]) < 32000
    assert "tokenizer.id_out_of_range" not in healer.diagnose(tmp_path / "out").checks()
    assert load_file(tmp_path / "out" / "model.safetensors")["model.embed_tokens.weight"].shape[0] == 32000


def test_colliding_added_token_is_rewritten_to_the_vocabulary(tmp_path):
    model = builders.sentencepiece_checkpoint(tmp_path / "l2", testdata.sentencepiece_model("llama-spm"),
                                              pad_token="<unk>")
    tc = json.loads((model / "tokenizer_config.json").read_text())
    tc["added_tokens_decoder"] = {"0": {"content": "<unk>", "special": True},
                                  "1": {"content": "<s>", "special": True},
                                  "2": {"content": "<|im_end|>", "special": True}}
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    assert "tokenizer.dangling_added_token" in checks_at(healer.diagnose(model), "error")
    repair(model, tmp_path / "out")
    out_tc = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert out_tc["added_tokens_decoder"]["2"]["content"] == "</s>"
    assert "tokenizer.dangling_added_token" not in healer.diagnose(tmp_path / "out").checks()


def checks_at(report: healer.Report, severity: str) -> set[str]:
    return {f.check for f in report.findings if f.severity == severity}


def test_eos_mismatch_adds_the_end_of_turn_token_to_generation_eos(tmp_path):
    model = builders.fast_checkpoint(
        tmp_path / "l3", testdata.fast_tokenizer_json("llama-bpe"), bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>", pad_token="<|reserved_special_token_0|>", add_bos=True,
        chat_template=testdata.template("meta-llama-Llama-3.1-8B-Instruct"))
    assert "template.eos_mismatch" in healer.diagnose(model).checks()
    repair(model, tmp_path / "out")
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [128001, 128009]
    assert "template.eos_mismatch" not in healer.diagnose(tmp_path / "out").checks()


def test_fixes_run_after_every_fix_they_need():
    from healer.fix import FIXES, RUN_ORDER

    position = {f.name: i for i, f in enumerate(RUN_ORDER)}
    assert sorted(position) == sorted(f.name for f in FIXES)
    for fix in RUN_ORDER:
        for need in fix.needs:
            assert position[need] < position[fix.name], (fix.name, need)
    assert [f.phase for f in RUN_ORDER] == sorted(f.phase for f in RUN_ORDER)
    # the order fix has always run in (byte-identical outputs, changes listed in the same order)
    assert [f.name for f in RUN_ORDER] == [
        "tokenizer.dangling_added_tokens", "tokenizer.out_of_range", "template.chatml", "template.set",
        "template.generation_prompt", "tokenizer.fast_tokenizer", "tokenizer.bos_missing",
        "tokenizer.setting_ignored", "tokenizer.double_bos", "tokenizer.pad", "template.eos_mismatch",
        "embeddings.grow_rows", "embeddings.untrained"]


def test_the_fix_order_follows_needs_not_registration():
    from healer.draft import Fix
    from healer.fix import order

    def nop(draft, findings, opts):
        pass

    fixes = [Fix("c", nop, needs=("b",)), Fix("later", nop, phase=2), Fix("a", nop), Fix("b", nop, needs=("a",))]
    assert [f.name for f in order(fixes)] == ["a", "b", "c", "later"]


@pytest.mark.parametrize("fixes, refusal", [
    ([("a", ("nowhere",), 1)], "'a' needs 'nowhere', which is not a registered fix"),
    ([("a", ("b",), 1), ("b", ("c",), 1), ("c", ("a",), 1), ("d", (), 1)], "cycle"),
    ([("a", ("a",), 1)], "cycle"),
    ([("a", ("b",), 1), ("b", (), 2)], "runs later"),
    ([("a", (), 1), ("a", (), 1)], "two fixes are named 'a'"),
])
def test_the_fix_order_refuses_unknown_needs_and_cycles(fixes, refusal):
    from healer.draft import Fix
    from healer.fix import order

    def nop(draft, findings, opts):
        pass

    with pytest.raises(ValueError, match=refusal):
        order([Fix(name, nop, needs=needs, phase=phase) for name, needs, phase in fixes])


def test_a_fix_adding_ids_after_the_rows_were_grown_is_refused(example):
    from healer.draft import Draft, Options
    from healer.embeddings.fixes import grow_rows
    from healer.tokenizers.surgery import append_token

    draft = Draft(healer.ModelDir(example))
    grow_rows(draft, [], Options())
    with pytest.raises(AssertionError, match="needs"):
        append_token(draft, "<|late|>", user_defined=True)


def test_a_fix_whose_output_still_fails_says_why_in_one_line_and_writes_nothing(example, tmp_path):
    """--chatml patches ChatML's markers in and claims template.tokens_not_single; --template zephyr then installs a
    template whose markers are not tokens of this vocabulary: the output still fails the claimed check."""
    result = subprocess.run([*HEALER, "fix", str(example), "-o", str(tmp_path / "out"), "--chatml", "--template",
                             "zephyr"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "still fails it (" in line and "not single tokens, e.g. '<|" in line and "nothing was written" in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
