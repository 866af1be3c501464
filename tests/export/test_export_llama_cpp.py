"""Our GGUF files run in llama.cpp itself (llama-cpp-python) with the same tokens and logits as HF + PEFT.

Needs `llama_cpp` importable: the test extra's llama-cpp-python==0.3.36 compiles llama.cpp from the
PyPI sdist once (about 11 minutes on a busy 2-core machine); skipped without it, failed under CI=true.
"""

from __future__ import annotations

import json
from pathlib import Path

import builders
import pytest
import testdata
import torch
from export_helpers import (  # noqa: F401 (llama_cpp_required: fixture)
    LlamaCppModel,
    chatml_llama,
    healed_chatml_llama,
    llama_cpp_required,
    logits,
    make_adapter,
    peft_model,
)

import export

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("llama_cpp_required")]

PROMPT = "Hello world! The quick brown fox jumps over the lazy dog, 12345 times."
CHATML_PROMPT = "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"
# random tiny models give logits of a few units only if the weights are larger than HF's 0.02 default
INIT = {"initializer_range": 0.2}
# f16 weights and llama.cpp's f16 activations each round at 2**-11 relative; over two layers the
# logits may move by several such steps of their largest magnitude: allow 16
F16_TOLERANCE = 2**-7


def spm(path: Path, family: str, **kw) -> Path:
    extra = {"query_pre_attn_scalar": 16} if family == "gemma2" else {}
    return builders.sentencepiece_checkpoint(path, testdata.sentencepiece_model("llama-spm"), family=family,
                                             **INIT, **extra, **kw)


def phi3(path: Path) -> Path:
    return builders.sentencepiece_checkpoint(path, testdata.sentencepiece_model("phi-3"), family="phi3",
                                             vocab_size=32064, tokenizer_json=testdata.fast_tokenizer_json("phi-3"),
                                             **INIT)


def qwen2(path: Path) -> Path:
    return builders.fast_checkpoint(path, testdata.fast_tokenizer_json("qwen2"), family="qwen2", bos_token=None,
                                    eos_token="<|endoftext|>", **INIT)


def llama3(path: Path) -> Path:
    """Llama 3 as Meta ships it: the BPE tokenizer.json adds <|begin_of_text|> itself."""
    src = json.loads(testdata.fast_tokenizer_json("llama-bpe").read_text(encoding="utf-8"))
    bos = "<|begin_of_text|>"
    bos_id = next(t["id"] for t in src["added_tokens"] if t["content"] == bos)
    src["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    path.mkdir(parents=True)
    (path / "_tok").mkdir()
    (path / "_tok" / "tokenizer.json").write_text(json.dumps(src), encoding="utf-8")
    return builders.fast_checkpoint(path, path / "_tok" / "tokenizer.json", family="llama", bos_token=bos,
                                    eos_token="<|end_of_text|>", **INIT)


CASES = {
    "llama": lambda p: spm(p, "llama"),
    # Mistral ships tokenizer.json; without it transformers 5 builds one that drops the "▁" prefix
    "mistral": lambda p: spm(p, "mistral", tokenizer_json=testdata.fast_tokenizer_json("llama-spm")),
    "gemma": lambda p: spm(p, "gemma"),
    "gemma2": lambda p: spm(p, "gemma2"),
    "phi3": phi3,
    "qwen2": qwen2,
    "llama3-bpe": llama3,
    "llama-chatml-healed": lambda p: healed_chatml_llama(p, **INIT),
    # Qwen3 around its official tokenizer files (tied head, q/k norms, head_dim 32 != 64 / 4 heads)
    "qwen3-real-chatml": lambda p: builders.real_checkpoint(p, testdata.real_tokenizer("qwen3"), "qwen3", **INIT),
    # Gemma 3: q/k norms, sandwich norms, the middle of three layers global (llama.cpp's default pattern
    # would make all three slide), a local RoPE base other than llama.cpp's default, linear scaling of the
    # global layers' RoPE (the 4B+ configs)
    "gemma3_text": lambda p: spm(p, "gemma3_text", num_hidden_layers=3,
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                 rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 8.0}),
}


def llama_cpp_run(path: Path, ids: list[int], text: str) -> tuple[list[int], torch.Tensor]:
    """llama.cpp's tokenization of `text` (its own BOS rule, special tokens parsed) and its logits for `ids`."""
    with LlamaCppModel(path, n_ctx=128) as llm:
        return llm.tokenize(text, add_special=True, parse_special=True), llm.logits(ids)


@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_tokenizes_like_hf_and_its_f16_logits_match_peft(tmp_path, case):
    from transformers import AutoTokenizer

    base = CASES[case](tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter")
    path = export.to_gguf(adapter, tmp_path / "model.gguf", "f16")
    tok = AutoTokenizer.from_pretrained(str(base))
    text = CHATML_PROMPT if "chatml" in case else PROMPT
    ids = tok(text).input_ids
    tokens, got = llama_cpp_run(path, ids, text)

    assert tokens == ids
    if tok.bos_token_id is not None and ids[0] == tok.bos_token_id:
        assert tokens.count(tok.bos_token_id) == 1
    if case == "llama3-bpe":
        assert tokens[0] == tok.bos_token_id

    want = logits(peft_model(base, adapter), torch.tensor([ids]))
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= F16_TOLERANCE * scale
    top2 = want.topk(2, dim=-1).values
    # where HF's best two tokens are closer than f16 noise, which one wins is a coin flip
    decided = (top2[:, 0] - top2[:, 1]) > 2**-9 * scale
    assert int(decided.sum()) >= 0.8 * len(ids)
    assert torch.equal(got.argmax(-1)[decided], want.argmax(-1)[decided])


def test_llama_cpp_prefixes_text_after_special_tokens_which_transformers_does_not(tmp_path):
    """Why export warns for such tokenizers (test_export_tokenization.py): transformers' non-legacy
    sentencepiece tokenizer gives [<|im_start|>, "user"], llama.cpp [<|im_start|>, "▁user"]."""
    from transformers import AutoTokenizer

    base = chatml_llama(tmp_path / "base", **INIT)
    with pytest.warns(export.TokenizationWarning):
        path = export.to_gguf(base, tmp_path / "model.gguf", "f16")
    tok = AutoTokenizer.from_pretrained(str(base))
    ids = tok(CHATML_PROMPT).input_ids
    tokens, _ = llama_cpp_run(path, ids, CHATML_PROMPT)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[1:3] == [im_start, tok.convert_tokens_to_ids("user")]
    assert tokens[1:3] == [im_start, tok.convert_tokens_to_ids("\u2581user")]
