"""Doctor checks embeddings.untrained / embeddings.nonfinite / weights.nonfinite on planted defects."""

import json
from pathlib import Path

import builders
import pytest
import sentencepiece as spm
import testdata
import torch
from safetensors.torch import load_file, save_file

from healer.doctor import Context
from healer.embeddings.checks import (
    CHECKS,
    check_embeddings_nonfinite,
    check_untrained,
    check_weights_nonfinite,
)
from healer.embeddings.usage import load_vocab, template_token_ids
from healer.model_dir import ModelDir
from healer.templates import registry

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
LAYER = "model.layers.1.mlp.down_proj.weight"


def _edit(path: Path, fn) -> dict[str, torch.Tensor]:
    (shard,) = path.glob("*.safetensors")
    tensors = load_file(str(shard))
    fn(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return tensors


@pytest.fixture(scope="module")
def spm_model() -> Path:
    return testdata.sentencepiece_model("llama-spm")


@pytest.fixture(scope="module")
def llama2(tmp_path_factory, spm_model) -> Path:
    """Llama 2 sentencepiece tokenizer (no tokenizer.json) with the Llama 2 chat template, untied head."""
    out = tmp_path_factory.mktemp("llama2") / "model"
    return builders.sentencepiece_checkpoint(out, spm_model, chat_template=registry.get("llama-2").source,
                                             tie_word_embeddings=False)


def test_nonfinite_embedding_and_lm_head_rows_are_an_error(tmp_path):
    builders.save_tiny_model(tmp_path, "llama", 300, tie_word_embeddings=False)

    def plant(t):
        t[EMBED][7, 3] = float("nan")
        t[EMBED][8, 0] = float("inf")
        t[LM_HEAD][9, 1:4] = float("-inf")
    tensors = _edit(tmp_path, plant)
    (finding,) = check_embeddings_nonfinite(ModelDir(tmp_path), Context())
    assert finding.check == "embeddings.nonfinite" and finding.severity == "error"
    for name in (EMBED, LM_HEAD):
        t = tensors[name]
        d = finding.details[name]
        assert d["rows_with_nan"] == int(torch.isnan(t).any(1).sum())
        assert d["rows_with_inf"] == int(torch.isinf(t).any(1).sum())
        assert [x["id"] for x in d["first"]] == torch.nonzero(~torch.isfinite(t).all(1)).reshape(-1).tolist()


def test_weights_nonfinite_streams_every_tensor_only_under_check_weights(tmp_path):
    builders.save_tiny_model(tmp_path, "llama", 300, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = tmp_path / index[LAYER]
    tensors = load_file(str(shard))
    tensors[LAYER][0, :5] = float("nan")
    tensors[LAYER][3, 2] = float("inf")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    ckpt = ModelDir(tmp_path)
    assert check_weights_nonfinite(ckpt, Context()) == []
    (finding,) = check_weights_nonfinite(ckpt, Context(check_weights=True))
    assert finding.severity == "error"
    assert finding.details["tensors"] == {LAYER: int((~torch.isfinite(tensors[LAYER])).sum())}
    assert check_embeddings_nonfinite(ckpt, Context()) == []


def test_checkpoint_without_weights_gets_no_embedding_findings(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    ckpt = ModelDir(tmp_path)
    assert [f for check in CHECKS for f in check(ckpt, Context(check_weights=True))] == []


def test_healthy_random_model_has_no_embedding_findings(tmp_path):
    builders.save_tiny_model(tmp_path, "llama", 300)
    ckpt = ModelDir(tmp_path)
    assert [f for check in CHECKS for f in check(ckpt, Context(check_weights=True))] == []


def test_untrained_rows_of_unused_tokens_are_a_warning(llama2, spm_model, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    unused = [sp.piece_to_id(p) for p in ("▁river", "▁quantum")]
    assert sp.unk_id() not in unused
    src = tmp_path / "model"
    src.mkdir()
    for f in llama2.iterdir():
        (src / f.name).write_bytes(f.read_bytes())

    def plant(t):
        for name in (EMBED, LM_HEAD):
            t[name][unused] = 0
            t[name][sp.unk_id()] = 0  # unk is protected: never counted, but shown
    _edit(src, plant)
    (finding,) = check_untrained(ModelDir(src), Context())
    assert finding.severity == "warning"
    assert finding.details["count"] == 2
    assert [(d["id"], d["token"]) for d in finding.details["first"]] == [(i, sp.id_to_piece(i)) for i in sorted(unused)]
    assert finding.details["protected_zero"] == [{"id": sp.unk_id(), "token": "<unk>"}]
    assert finding.fix.endswith("-o OUT --all-untrained")


def test_untrained_row_of_a_template_piece_is_an_error_on_a_sentencepiece_checkpoint(llama2, spm_model, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    inst = sp.piece_to_id("INST")  # Llama 2's "[INST]" is several pieces; "INST" is one of them
    src = tmp_path / "model"
    src.mkdir()
    for f in llama2.iterdir():
        (src / f.name).write_bytes(f.read_bytes())

    def plant(t):
        t[EMBED][inst] = 0
        t[LM_HEAD][inst] = 0
    _edit(src, plant)
    (finding,) = check_untrained(ModelDir(src), Context())
    assert finding.severity == "error"
    assert finding.details["template"] == [{"id": inst, "token": "INST"}]


def test_tied_embedding_rows_need_no_lm_head_confirmation(tmp_path):
    builders.save_tiny_model(tmp_path, "llama", 300, tie_word_embeddings=True)
    _edit(tmp_path, lambda t: t[EMBED].index_fill_(0, torch.tensor([11, 12]), 0))
    (finding,) = check_untrained(ModelDir(tmp_path), Context())
    assert finding.details["count"] == 2 and finding.details["rules"] == {"embed_zero": 2}


def test_template_tokens_skip_a_shape_the_template_refuses(llama2, spm_model, tmp_path):
    """Gemma's template raises on a system message: only the other conversation shape counts, and its
    template ids are exactly the ids transformers' rendering of both contents has in common."""
    from transformers import AutoTokenizer

    src = tmp_path / "model"
    src.mkdir()
    for f in llama2.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc["chat_template"] = registry.get("gemma").source
    (src / "tokenizer_config.json").write_text(json.dumps(tc))
    ckpt = ModelDir(src)
    hf = AutoTokenizer.from_pretrained(str(src))
    id_sets = []
    for words in (("alpha", "bravo", "charlie"), ("xray", "yankee", "zulu")):
        messages = [{"role": r, "content": w} for r, w in zip(("user", "assistant", "user"), words, strict=True)]
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        id_sets.append(set(hf.encode(text, add_special_tokens=False)))
    assert set(template_token_ids(ckpt, load_vocab(ckpt))) == id_sets[0] & id_sets[1]
