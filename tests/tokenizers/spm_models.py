"""Sentencepiece models for the conversion tests: the real ones we have, and small ones trained here.

Trained models stand in for vocabularies we cannot fetch (Gemma, T5-style Unigram): a few
hundred pieces, trained in memory in well under a second on the built-in corpus plus generated
words, deterministic for a given sentencepiece version.
"""

from __future__ import annotations

import io
import random
from functools import cache

import sentencepiece as spm
import testdata
from sentencepiece import sentencepiece_model_pb2 as pb

from healer.tokenizers.compare import fuzz_strings
from healer.tokenizers.corpus import builtin_corpus

REAL = {
    "mistral-v1": lambda: testdata.mistral_model("v1"),
    "mistral-v2": lambda: testdata.mistral_model("v2"),
    "mistral-v3": lambda: testdata.mistral_model("v3"),
    "mistral-v7": lambda: testdata.mistral_model("v7"),
    "llama-2": lambda: testdata.sentencepiece_model("llama-spm"),
    "phi-3": lambda: testdata.sentencepiece_model("phi-3"),
}
# llama.cpp's test strings for the vocabulary family of each real model
LLAMA_CPP_VOCAB = {"phi-3": "phi-3"}

TRAINED = {
    # Gemma's layout: BPE, byte fallback, no dummy prefix, identity normalization, digits split,
    # whitespace-only pieces, user-defined turn markers and whitespace runs
    "gemma-style-bpe": dict(
        model_type="bpe", vocab_size=800, byte_fallback=True, split_digits=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\n\n", "  "],
    ),
    # sentencepiece's defaults: nmt_nfkc charsmap, whitespace removal, dummy prefix, no byte fallback
    "default-bpe": dict(model_type="bpe", vocab_size=800),
    "default-unigram": dict(model_type="unigram", vocab_size=800),
    # Unigram with a charsmap, byte fallback and user-defined pieces
    "nfkc-unigram": dict(
        model_type="unigram", vocab_size=800, byte_fallback=True,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "<mask>"],
    ),
    # not expressible: the dummy "▁" goes at the end of the text
    "suffix-bpe": dict(model_type="bpe", vocab_size=400, treat_whitespace_as_suffix=True),
}


def training_text() -> list[str]:
    rng = random.Random(0)
    words = ("the quick brown fox jumps over lazy dog tokenizer model training data 2024 3.14 hello world "
             "naïve café Straße 東京 привет").split()
    text = list(builtin_corpus()) + [s for s, _ in testdata.vocab_cases("llama-spm")]
    text += [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]
    return [t.replace("\n", " ") for t in text if t.strip()]


@cache
def model_bytes(name: str) -> bytes:
    """Serialized ModelProto of a real (REAL) or trained (TRAINED) model."""
    if name in REAL:
        return REAL[name]().read_bytes()
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()), model_writer=out, character_coverage=0.995,
        hard_vocab_limit=False, minloglevel=2, num_threads=1, **TRAINED[name],
    )
    return out.getvalue()


def proto(name: str) -> pb.ModelProto:
    m = pb.ModelProto()
    m.ParseFromString(model_bytes(name))
    return m


def processor(name: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=model_bytes(name))


def special_texts(name: str) -> list[str]:
    """Texts of the model's control, unknown and user-defined pieces."""
    return [p.piece for p in proto(name).pieces if p.type in (p.CONTROL, p.UNKNOWN, p.USER_DEFINED)]


def llama_cpp_strings(name: str) -> list[str]:
    return [s for s, _ in testdata.vocab_cases(LLAMA_CPP_VOCAB.get(name, "llama-spm"))]


def verification_sets(name: str) -> dict[str, list[str]]:
    """The string sets the 100% goal is stated on: corpus, llama.cpp's strings, 10,000 fuzz strings."""
    return {
        "corpus": list(builtin_corpus()),
        "llama.cpp": llama_cpp_strings(name),
        "fuzz": fuzz_strings(10_000, seed=1234, special_texts=special_texts(name)),
    }
