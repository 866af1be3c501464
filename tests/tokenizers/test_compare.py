"""compare_encodings against a plain per-string loop over sentencepiece, and fuzz_strings' coverage."""

import pytest
import spm_models
from tokenizers import Tokenizer, decoders, pre_tokenizers

from healer.tokenizers.compare import compare_encodings, first_difference, fuzz_strings
from healer.tokenizers.convert import added_token_list, finish, load_model, spm_pipeline
from healer.tokenizers.corpus import builtin_corpus


@pytest.fixture(scope="module")
def mistral_v1() -> Tokenizer:
    _, proto = load_model(spm_models.model_bytes("mistral-v1"))
    tok = spm_pipeline(proto)
    finish(tok, proto, added_token_list(proto, {}), add_bos=True, add_eos=False)
    return Tokenizer.from_str(tok.to_str())


def with_transformers_prefix(tok: Tokenizer) -> Tokenizer:
    """The same tokenizer with transformers' dummy prefix (skipped when the text starts with a space)."""
    broken = Tokenizer.from_str(tok.to_str())
    broken.normalizer = None
    broken.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    return broken


def test_compare_encodings_lists_exactly_the_strings_a_per_string_loop_finds(mistral_v1):
    sp = spm_models.processor("mistral-v1")
    fast = with_transformers_prefix(mistral_v1)
    strings = list(builtin_corpus())[:600]
    result = compare_encodings(sp, fast, strings)
    fast.encode_special_tokens = True
    expected = [(s, sp.encode(s), fast.encode(s, add_special_tokens=False).ids) for s in strings]
    expected = [(s, a, b) for s, a, b in expected if a != b]
    assert expected  # the leading-space strings
    assert [(m.text, m.sp_ids, m.fast_ids) for m in result.mismatches] == expected
    assert all(m.first_diff == first_difference(m.sp_ids, m.fast_ids) for m in result.mismatches)
    assert result.n == 600 and result.encode_agreements == 600 - len(expected)


def test_special_token_text_is_compared_as_plain_text_and_the_setting_is_restored(mistral_v1):
    sp = spm_models.processor("mistral-v1")
    assert mistral_v1.encode("<s>", add_special_tokens=False).ids == [sp.bos_id()]  # matched as a special token
    result = compare_encodings(sp, mistral_v1, ["<s>", "Hello </s> world", "[INST]"])
    assert result.agrees
    assert mistral_v1.encode_special_tokens is False


def test_decode_round_trip_differences_are_reported_separately(mistral_v1):
    sp = spm_models.processor("mistral-v1")
    fast = Tokenizer.from_str(mistral_v1.to_str())
    fast.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    result = compare_encodings(sp, fast, ["Hello world", " x"])
    assert result.mismatches == []
    assert [(d.text, d.sp_decoded, d.fast_decoded) for d in result.decode_mismatches] == [
        ("Hello world", sp.decode(sp.encode("Hello world")), " Hello world"),
        (" x", sp.decode(sp.encode(" x")), "  x"),
    ]
    assert not result.agrees


def test_empty_input_compares_nothing(mistral_v1):
    result = compare_encodings(spm_models.processor("mistral-v1"), mistral_v1, [])
    assert result.n == 0 and result.agrees


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert first_difference([], [4]) == 0


def test_fuzz_strings_are_deterministic_per_seed():
    assert fuzz_strings(500, seed=7) == fuzz_strings(500, seed=7)
    assert fuzz_strings(500, seed=7) != fuzz_strings(500, seed=8)
    assert len(fuzz_strings(123, seed=0)) == 123


def test_fuzz_strings_cover_every_plane_whitespace_runs_and_special_text():
    strings = fuzz_strings(10_000, seed=0, special_texts=["[REFERENCE_DOC_7]"])
    chars = {ord(c) for s in strings for c in s}
    assert not any(0xD800 <= c <= 0xDFFF for c in chars)
    planes = {c >> 16 for c in chars}
    assert planes == set(range(17))
    assert any(s and not s.strip() for s in strings)  # whitespace only
    assert any("   " in s for s in strings) and any("\t" in s for s in strings)
    assert any("[REFERENCE_DOC_7]" in s for s in strings) and any("<|im_start|>" in s for s in strings)
    assert any(s == s.strip() and "<s>" in s and len(s) > 3 for s in strings)  # special text inside text
