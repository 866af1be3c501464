"""A tiny Llama with the real Llama 3 tokenizer and Llama 3's untrained rows: doctor, repair, training step."""

import hashlib
import json

import pytest
import torch
from embedding_fixtures import EMBED, LM_HEAD, assert_within_one_bf16_ulp, copy_non_weights
from safetensors.torch import load_file

from healer.doctor import Context
from healer.embeddings import (
    checkpoint_untrained_rows,
    load_vocab,
    plan_repair,
    protected_ids,
    repair_untrained,
    select_rows,
    token_use,
    write_weights,
)
from healer.embeddings.checks import check_untrained
from healer.embeddings.rows import EMBED_AND_HEAD_ZERO, EMBED_ZERO_HEAD_SHARED
from healer.embeddings.usage import dataset_token_counts, template_token_ids
from healer.model_dir import ModelDir

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."},
     {"role": "assistant", "content": "Apple."}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."},
     {"role": "user", "content": "Louder!"}],
]


def _weights(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hf_ids(tok, messages, add_generation_prompt=False) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def hf_tok(llama3_untrained):
    """The tokenizer transformers gives a user of the checkpoint: the reference renderer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama3_untrained.path))


@pytest.fixture(scope="module")
def ckpt(llama3_untrained):
    return ModelDir(llama3_untrained.path)


def _reference_mean(matrix: torch.Tensor, untrained) -> torch.Tensor:
    a = matrix.to(torch.float64)
    keep = torch.ones(len(a), dtype=torch.bool)
    keep[list(untrained)] = False
    return a[keep].mean(0)


@pytest.fixture(scope="module")
def repaired(ckpt, tmp_path_factory):
    """The default repair (rows that matter), written the way `healer fix` writes it."""
    plan = plan_repair(ckpt)
    out = tmp_path_factory.mktemp("repaired") / "model"
    copy_non_weights(ckpt.path, out)
    written = write_weights(ckpt, plan.updates(ckpt), out)
    return out, plan.rows, plan.untrained, written


def test_doctor_finds_exactly_the_zeroed_llama3_rows(ckpt, llama3_untrained):
    (finding,) = check_untrained(ckpt, Context())
    assert finding.check == "embeddings.untrained" and finding.severity == "error"
    d = finding.details
    assert d["count"] == len(llama3_untrained.zeroed) == 254
    untrained = checkpoint_untrained_rows(ckpt, protected_ids(ckpt, load_vocab(ckpt)))
    assert sorted(untrained) == llama3_untrained.zeroed
    assert {r: untrained[r] for r in llama3_untrained.template} == \
        dict.fromkeys(llama3_untrained.template, EMBED_ZERO_HEAD_SHARED)
    assert set(untrained[r] for r in llama3_untrained.reserved) == {EMBED_AND_HEAD_ZERO}
    assert {t["token"] for t in d["template"]} == {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}
    assert d["unused_count"] == 251
    assert [t["id"] for t in d["first"]] == llama3_untrained.zeroed[:20]
    assert d["first"][0]["token"] == "<|reserved_special_token_0|>"
    assert finding.fix == f"healer fix {ckpt.path} -o OUT"


def test_doctor_is_silent_on_the_healthy_llama3_checkpoint(llama3_healthy):
    assert check_untrained(ModelDir(llama3_healthy.path), Context()) == []


def test_template_tokens_are_the_special_tokens_transformers_renders(ckpt, hf_tok):
    vocab = load_vocab(ckpt)
    rendered = set()
    for messages in CONVERSATIONS:
        rendered |= set(_hf_ids(hf_tok, messages, add_generation_prompt=messages[-1]["role"] == "user"))
    specials = set(vocab.special_added)
    ours = template_token_ids(ckpt, vocab)
    assert set(ours) & specials == rendered & specials == {128000, 128006, 128007, 128009}
    # the contents of the sample conversations are not template tokens
    assert vocab.token_to_id("alpha") not in ours and vocab.token_to_id("xray") not in ours


def test_default_repair_selects_the_chat_template_rows(repaired, llama3_untrained):
    _, rows, _, _ = repaired
    assert rows == llama3_untrained.template


def test_repair_writes_the_unbiased_trained_mean_into_embed_and_lm_head(repaired, llama3_untrained):
    out, rows, untrained, _ = repaired
    before, after = _weights(llama3_untrained.path), _weights(out)
    for name in (EMBED, LM_HEAD):
        ref = _reference_mean(before[name], untrained)
        assert after[name].dtype == torch.bfloat16
        for r in rows:
            assert_within_one_bf16_ulp(after[name][r], ref)
        untouched = [i for i in range(len(before[name])) if i not in rows]
        assert torch.equal(after[name][untouched], before[name][untouched]), name
    assert not torch.equal(_reference_mean(before[EMBED], untrained), _reference_mean(before[LM_HEAD], untrained))


def test_only_the_embedding_and_lm_head_shards_are_rewritten(repaired, llama3_untrained):
    out, _, _, written = repaired
    src = llama3_untrained.path
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    changed = {index[EMBED], index[LM_HEAD]}
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) == 3 and len(changed) == 2
    for name in shards:
        same = _sha(src / name) == _sha(out / name)
        assert same == (name not in changed), name
        assert written[name] == ("rewritten" if name in changed else "linked")
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert new_index["weight_map"] == index
    tensors = _weights(out)
    assert new_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_doctor_after_repair_only_warns_about_unused_reserved_rows(repaired, llama3_untrained):
    out, _, _, _ = repaired
    (finding,) = check_untrained(ModelDir(out), Context())
    assert finding.severity == "warning"
    assert finding.details["count"] == len(llama3_untrained.reserved)
    assert finding.fix.endswith("--all-untrained")


def test_repair_all_untrained_leaves_nothing_for_doctor(ckpt, llama3_untrained, tmp_path):
    untrained = checkpoint_untrained_rows(ckpt, protected_ids(ckpt, load_vocab(ckpt)))
    rows = select_rows(untrained, token_use(ckpt), all_untrained=True)
    assert rows == llama3_untrained.zeroed
    out = tmp_path / "model"
    copy_non_weights(ckpt.path, out)
    write_weights(ckpt, repair_untrained(ckpt, rows, untrained), out)
    assert check_untrained(ModelDir(out), Context()) == []


def test_dataset_tokens_are_counted_after_the_template_and_selected(ckpt, hf_tok, tmp_path):
    data = tmp_path / "train.jsonl"
    records = [{"messages": m} for m in CONVERSATIONS] + [{"text": "tool call <|reserved_special_token_5|> ok"}]
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    vocab = load_vocab(ckpt)
    counts = dataset_token_counts(ckpt, vocab, data)
    reference = []
    for m in CONVERSATIONS:
        reference += _hf_ids(hf_tok, m)
    reserved5 = vocab.token_to_id("<|reserved_special_token_5|>")
    for i in (128006, 128007, 128009):
        assert counts[i] == reference.count(i) > 0
    assert counts[reserved5] == 1
    untrained = checkpoint_untrained_rows(ckpt, protected_ids(ckpt, vocab))
    assert reserved5 in select_rows(untrained, token_use(ckpt, vocab, dataset=data))
    assert reserved5 not in select_rows(untrained, token_use(ckpt, vocab))
    summary = plan_repair(ckpt, dataset=data).summary()
    assert summary["repaired_count"] == 4 and summary["left_untrained_count"] == 250
    top = summary["dataset_top"]
    assert [d["count"] for d in top] == sorted((counts[i] for i in (128006, 128007, 128009, reserved5)), reverse=True)
    assert {d["token"] for d in top} == {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                          "<|reserved_special_token_5|>"}


def _train_step(path, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    x = torch.tensor([ids])
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_training_step_through_the_template_is_finite_and_tame_after_repair(repaired, llama3_untrained, hf_tok):
    """What is seen before the repair, on this tiny model in float32: loss and gradients are finite
    (a zero row does not produce NaN by itself here), but RMSNorm divides an all-zero input by
    sqrt(eps) instead of its own scale, so the gradients reaching the template tokens' rows are
    far larger than any trained row's. After the repair they are in the trained rows' range."""
    out, rows, _, _ = repaired
    ids = _hf_ids(hf_tok, CONVERSATIONS[0])
    loss_before, grads_before = _train_step(llama3_untrained.path, ids)
    loss_after, grads_after = _train_step(out, ids)
    trained = sorted(set(ids) - set(rows))

    def row_norms(grads):
        g = grads["model.embed_tokens.weight"]
        return g[rows].norm(dim=1), g[trained].norm(dim=1)

    assert torch.isfinite(loss_before) and all(torch.isfinite(g).all() for g in grads_before.values())
    untrained_before, trained_before = row_norms(grads_before)
    assert untrained_before.min() > 5 * trained_before.median()

    assert torch.isfinite(loss_after) and all(torch.isfinite(g).all() for g in grads_after.values())
    untrained_after, trained_after = row_norms(grads_after)
    assert untrained_after.max() <= 2 * trained_after.max()
    assert (untrained_before > 4 * untrained_after).all()
