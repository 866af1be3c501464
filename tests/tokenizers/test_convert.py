"""Slow -> fast conversion, verified against sentencepiece (the reference) on real and trained models."""

import json

import pytest
import spm_models
from tokenizers import AddedToken, Tokenizer

from healer.errors import CheckpointError
from healer.tokenizers.compare import compare_encodings
from healer.tokenizers.convert import (
    added_token_list,
    convert_verified,
    finish,
    load_model,
    probe_strings,
    spm_pipeline,
)
from healer.tokenizers.corpus import builtin_corpus


@pytest.fixture(scope="module")
def converted():
    cache: dict[str, Tokenizer] = {}

    def get(name: str) -> Tokenizer:
        if name not in cache:
            _, proto = load_model(spm_models.model_bytes(name))
            tok = spm_pipeline(proto)
            finish(tok, proto, added_token_list(proto, {}), add_bos=True, add_eos=False)
            cache[name] = Tokenizer.from_str(tok.to_str())
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(spm_models.REAL))
def test_spm_pipeline_agrees_with_sentencepiece_on_every_real_model(name, converted):
    sp = spm_models.processor(name)
    sets = spm_models.verification_sets(name)
    sets["probes"] = probe_strings(spm_models.proto(name))
    for label, strings in sets.items():
        c = compare_encodings(sp, converted(name), strings)
        assert c.n == len(strings)
        assert c.mismatches == [], (label, c.mismatches[:3])
        assert c.decode_mismatches == [], (label, c.decode_mismatches[:3])
    assert len(sets["fuzz"]) == 10_000 and len(sets["corpus"]) >= 2000


def test_convert_verified_skips_transformers_conversion_that_drops_the_dummy_prefix():
    llama_cpp = spm_models.llama_cpp_strings("mistral-v1")
    result = convert_verified(spm_models.model_bytes("mistral-v1"), list(builtin_corpus()) + llama_cpp)
    sp = spm_models.processor("mistral-v1")
    assert result.ok and result.candidate == "spm"
    assert [a.name for a in result.attempts] == ["transformers", "spm"]
    wrong = {m.text: m for m in result.attempts[0].comparison.mismatches}
    assert wrong[" "].sp_ids == sp.encode(" ") == [sp.piece_to_id("\u2581\u2581")]
    # transformers' Metaspace(prepend_scheme="first") skips the dummy "▁" when the text starts with a
    # space: every llama.cpp string it gets wrong starts with whitespace
    assert [t for t in llama_cpp if t in wrong] and all(t[:1].isspace() for t in llama_cpp if t in wrong)
    assert result.comparison.agrees and result.comparison.n >= len(builtin_corpus()) + len(llama_cpp)
    tok = Tokenizer.from_str(result.tokenizer_json)
    assert tok.encode("  Hello world").ids == [sp.bos_id()] + sp.encode("  Hello world")


@pytest.mark.parametrize("name", ["mistral-v3", "phi-3"])
def test_transformers_loads_the_tokenizer_json_and_encodes_like_sentencepiece(name, converted, tmp_path):
    from transformers import PreTrainedTokenizerFast

    path = tmp_path / "tokenizer.json"
    path.write_text(converted(name).to_str())
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    sp = spm_models.processor(name)
    strings = list(builtin_corpus())
    ids = hf(strings, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ids == sp.encode(strings)
    assert hf("Hello")["input_ids"] == [sp.bos_id()] + sp.encode("Hello")
    assert len(hf) == sp.get_piece_size()
    assert hf.convert_ids_to_tokens(sp.bos_id()) == sp.id_to_piece(sp.bos_id())


@pytest.mark.parametrize("name", ["gemma-style-bpe", "default-bpe"])
def test_trained_bpe_models_agree_with_sentencepiece(name):
    strings = [s for group in spm_models.verification_sets(name).values() for s in group]
    result = convert_verified(spm_models.model_bytes(name), strings, candidates=("spm", "spm+nfc"))
    assert result.ok, [(a.name, a.error, a.comparison and a.comparison.mismatches[:2]) for a in result.attempts]
    assert result.comparison.n == len(strings) + len(probe_strings(spm_models.proto(name)))


@pytest.mark.parametrize("name", ["default-unigram", "nfkc-unigram"])
def test_trained_unigram_models_disagree_only_on_precompiled_normalization_or_exact_score_ties(name):
    sp = spm_models.processor(name)
    _, proto = load_model(spm_models.model_bytes(name))
    tok = spm_pipeline(proto, compose_first=True)
    sets = spm_models.verification_sets(name)
    for label in ("corpus", "llama.cpp"):
        assert compare_encodings(sp, tok, sets[label]).agrees, label
    fuzz = compare_encodings(sp, tok, sets["fuzz"])
    assert len(fuzz.mismatches) < 10
    unk = sp.unk_id()

    def score(ids):
        return sum(sp.get_score(i) for i in ids if i != unk), ids.count(unk)

    for m in fuzz.mismatches:
        normalizes_differently = sp.normalize(m.text) != tok.normalizer.normalize_str(m.text)
        tie = score(m.sp_ids)[1] == score(m.fast_ids)[1] and score(m.sp_ids)[0] == pytest.approx(score(m.fast_ids)[0])
        assert normalizes_differently or tie, m


def test_inexpressible_model_is_reported_unfixable_with_first_disagreements():
    result = convert_verified(spm_models.model_bytes("suffix-bpe"), builtin_corpus())
    assert not result.ok and result.tokenizer_json is None and result.candidate is None
    errors = {a.name: a.error for a in result.attempts}
    assert "treat_whitespace_as_suffix" in errors["spm"]
    first = result.first_disagreements(3)
    sp = spm_models.processor("suffix-bpe")
    assert first and all(m.sp_ids == sp.encode(m.text) and m.sp_ids != m.fast_ids for m in first)


def test_added_tokens_keep_their_ids_and_special_flags():
    proto = spm_models.proto("phi-3")
    n = len(proto.pieces)
    extra = {n: AddedToken("<|endoftext|>", special=True, normalized=False), n + 1: "<|assistant|>",
             n + 2: AddedToken("<|note|>", special=False, normalized=False)}
    result = convert_verified(spm_models.model_bytes("phi-3"), ["Hello"], extra, candidates=("spm",))
    added = {t["id"]: t for t in json.loads(result.tokenizer_json)["added_tokens"]}
    assert {i: (added[i]["content"], added[i]["special"]) for i in (0, 1, 2, n, n + 1, n + 2)} == {
        0: ("<unk>", True), 1: ("<s>", True), 2: ("</s>", True),
        n: ("<|endoftext|>", True), n + 1: ("<|assistant|>", True), n + 2: ("<|note|>", False),
    }
    tok = Tokenizer.from_str(result.tokenizer_json)
    assert tok.encode("<|assistant|>hi", add_special_tokens=False).ids[0] == n + 1


def test_added_tokens_that_contradict_the_model_are_refused():
    proto = spm_models.proto("phi-3")
    n = len(proto.pieces)
    with pytest.raises(CheckpointError, match="without gaps"):
        added_token_list(proto, {n + 1: "<|x|>"})
    with pytest.raises(CheckpointError, match="tokenizer.model has '<s>'"):
        added_token_list(proto, {1: "<bos>"})


@pytest.mark.parametrize("add_bos,add_eos", [(True, False), (False, False), (True, True), (False, True)])
def test_post_processor_follows_add_bos_and_add_eos(add_bos, add_eos):
    result = convert_verified(
        spm_models.model_bytes("mistral-v1"), ["Hello"], add_bos=add_bos, add_eos=add_eos, candidates=("spm",),
        probes=False,
    )
    sp = spm_models.processor("mistral-v1")
    tok = Tokenizer.from_str(result.tokenizer_json)
    def framed(text: str) -> list[int]:
        return [sp.bos_id()] * add_bos + sp.encode(text) + [sp.eos_id()] * add_eos

    assert tok.encode("Hello world").ids == framed("Hello world")
    assert tok.encode("Hello", "world").ids == framed("Hello") + framed("world")


CHATML = {32000: "<|im_start|>", 32001: "<|im_end|>"}
CHATML_TEXT = "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n I am  fine<|im_end|>"


def test_prefix_after_specials_encodes_each_piece_between_specials_like_sentencepiece_alone():
    import sentencepiece as spm

    model = spm_models.model_bytes("llama-2")
    result = convert_verified(model, builtin_corpus(), CHATML, prefix_after_specials=True)
    assert result.ok and result.candidate == "spm"
    # transformers' conversion prefixes only the start of the text: verification must reject it
    assert result.attempts[0].name == "transformers" and result.attempts[0].comparison.mismatches
    sp = spm.SentencePieceProcessor(model_proto=model)
    want = [32000] + sp.encode("user\nHow are you?") + [32001] + sp.encode("\n") + [32000] + \
        sp.encode("assistant\n I am  fine") + [32001]
    got = Tokenizer.from_str(result.tokenizer_json).encode(CHATML_TEXT, add_special_tokens=False)
    assert got.ids == want
    assert got.tokens[:2] == ["<|im_start|>", "\u2581user"]


def test_by_default_text_after_a_special_token_gets_no_prefix():
    result = convert_verified(spm_models.model_bytes("llama-2"), builtin_corpus(), CHATML)
    got = Tokenizer.from_str(result.tokenizer_json).encode(CHATML_TEXT, add_special_tokens=False)
    assert got.tokens[:3] == ["<|im_start|>", "user", "<0x0A>"]


def test_prefix_after_specials_gives_mistral_commons_ids_for_messages_between_control_tokens():
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    model = spm_models.REAL["mistral-v3"]()
    result = convert_verified(model.read_bytes(), builtin_corpus(), prefix_after_specials=True)
    assert result.ok
    reference = MistralTokenizer.from_file(str(model), mode=ValidationMode.agnostic)
    messages = [UserMessage(content="Hi there"), AssistantMessage(content="Hello! How can I help?"),
                UserMessage(content="Name three colours.")]
    want = reference.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    # mistral-common encodes each message on its own; joined without the spaces its pieces show
    text = "<s>[INST]Hi there[/INST]Hello! How can I help?</s>[INST]Name three colours.[/INST]"
    assert Tokenizer.from_str(result.tokenizer_json).encode(text, add_special_tokens=False).ids == want
