"""Compare a fast tokenizer with sentencepiece (the ground truth), and fuzz strings to compare them on.

Both sides encode without special tokens added. The fast tokenizer is switched to
`encode_special_tokens = True` for the comparison (a property of `tokenizers.Tokenizer` since
0.19, present in 0.23): with it, text such as "<s>" or "[INST]" inside a string is tokenized as
plain text, which is what sentencepiece does with control pieces. Without it the fast side would
match special-token text as single ids and every string holding one would differ by design.

Decoding is compared as a round trip: sentencepiece's decode(encode(s)) against the fast
tokenizer's decode(encode(s)) with skip_special_tokens=False.

Text around special tokens (`compare_around_specials`) can be held to llama.cpp's rule: the text
is cut at the special tokens and each piece between them is encoded by sentencepiece on its
own, dummy prefix included. llama.cpp does this with a GGUF sentencepiece vocabulary (it
prefixes a space to text after every special token), as do Meta's Llama 2 tokenizer.json (a
`Prepend("▁")` normalizer runs on each piece) and mistral-common (it encodes each message
apart). transformers 5 builds `Metaspace(prepend_scheme="first")` instead, which prefixes only
the start of the whole text: a model trained on its "<|im_start|>user" ([im_start, "user"]) is
served [im_start, "▁user"] by llama.cpp.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import sentencepiece as spm
from tokenizers import Tokenizer


@dataclass(frozen=True)
class Mismatch:
    """One string the two tokenizers encode differently."""

    text: str
    sp_ids: list[int]
    fast_ids: list[int]
    first_diff: int  # index of the first differing id (the shorter length when one is a prefix)


@dataclass(frozen=True)
class DecodeMismatch:
    """One string whose decode(encode(s)) differs between the two tokenizers."""

    text: str
    sp_decoded: str
    fast_decoded: str


@dataclass(frozen=True)
class Comparison:
    """Outcome of comparing a fast tokenizer with sentencepiece on `n` strings."""

    n: int
    mismatches: list[Mismatch] = field(default_factory=list)
    decode_mismatches: list[DecodeMismatch] = field(default_factory=list)

    @property
    def encode_agreements(self) -> int:
        return self.n - len(self.mismatches)

    @property
    def decode_agreements(self) -> int:
        return self.n - len(self.decode_mismatches)

    @property
    def agrees(self) -> bool:
        """True when every string encodes to the same ids and round-trips to the same text."""
        return not self.mismatches and not self.decode_mismatches


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first position where `a` and `b` differ (len of the shorter if one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def fast_encode(fast: Tokenizer, texts: list[str], *, specials_as_text: bool) -> list[list[int]]:
    """`fast`'s ids for `texts` without added BOS/EOS; special-token text matched as ids unless
    `specials_as_text` (the tokenizer's own setting is restored afterwards)."""
    previous = fast.encode_special_tokens
    fast.encode_special_tokens = specials_as_text
    try:
        return [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
    finally:
        fast.encode_special_tokens = previous


def compare_encodings(sp: spm.SentencePieceProcessor, fast: Tokenizer, strings: Iterable[str]) -> Comparison:
    """Encode and round-trip `strings` with both tokenizers; list every disagreement."""
    texts = list(strings)
    if not texts:
        return Comparison(0)
    sp_ids = sp.encode(texts)
    fast_ids = fast_encode(fast, texts, specials_as_text=True)
    sp_text = sp.decode(sp_ids)
    fast_text = fast.decode_batch(fast_ids, skip_special_tokens=False)
    mismatches = [
        Mismatch(t, a, b, first_difference(a, b)) for t, a, b in zip(texts, sp_ids, fast_ids) if a != b
    ]
    decode_mismatches = [DecodeMismatch(t, a, b) for t, a, b in zip(texts, sp_text, fast_text) if a != b]
    return Comparison(len(texts), mismatches, decode_mismatches)


def encode_by_segments(sp: spm.SentencePieceProcessor, texts: Sequence[str], specials: dict[str, int]
                       ) -> list[list[int]]:
    """sentencepiece's ids for `texts` with `specials` (content -> id) cut out and each piece
    between them encoded on its own (longest special first, leftmost match)."""
    if not specials:
        return sp.encode(list(texts))
    pattern = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=lambda s: (-len(s), s))) + ")")
    out = []
    for text in texts:
        ids: list[int] = []
        for part in pattern.split(text):
            if part in specials:
                ids.append(specials[part])
            elif part:
                ids += sp.encode(part)
        out.append(ids)
    return out


def special_context_strings(specials: Iterable[str]) -> list[str]:
    """Strings putting text right after, before and between special tokens (a chat template's places)."""
    out = []
    for s in specials:
        out += [f"{s}user\n", f"{s}\n", f"{s} x", f"{s}  two", f"x{s}y", f"{s}{s}z", f"Hello{s}", f"{s}\tend",
                f"{s}assistant\nHi!{s}\n"]
    return out


def compare_around_specials(sp: spm.SentencePieceProcessor, fast: Tokenizer, specials: dict[str, int],
                            strings: Iterable[str]) -> Comparison:
    """Encode `strings` holding special tokens (content -> id) with the fast tokenizer (specials
    matched) and against `encode_by_segments`; decoding is not compared (specials have no surface)."""
    texts = list(strings)
    if not texts:
        return Comparison(0)
    want = encode_by_segments(sp, texts, specials)
    got = fast_encode(fast, texts, specials_as_text=False)
    return Comparison(len(texts), [Mismatch(t, a, b, first_difference(a, b))
                                   for t, a, b in zip(texts, want, got) if a != b])


WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\r", "\u3000", "\u00a0", "\u2003", "\u200b", "\u2581", "\x0b", "\x0c"]
SPECIAL_TEXT = [
    "<s>", "</s>", "<unk>", "<pad>", "<mask>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "[INST]",
    "[/INST]", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<0x0A>", "<0xFF>", "\u2581", "<|user|>",
]
WORDS = ["hello", "The", "world", "123", "4.5", "naïve", "東京", "😀", "def", "x=1;", "don't", "--", "##"]


def random_code_point(rng: random.Random) -> str:
    """A code point from any plane except surrogates, weighted towards the ranges text really uses."""
    r = rng.random()
    if r < 0.25:
        lo, hi = 0x00, 0x7F
    elif r < 0.55:
        lo, hi = 0x80, 0xFFFF
    elif r < 0.75:
        lo, hi = 0x10000, 0x2FFFF
    else:
        lo, hi = 0x00, 0x10FFFF
    while True:
        c = rng.randint(lo, hi)
        if not 0xD800 <= c <= 0xDFFF:
            return chr(c)


def fuzz_strings(n: int, seed: int, special_texts: Sequence[str] = ()) -> list[str]:
    """`n` random strings, the same for the same seed: random code points from all planes,
    whitespace runs, special-token text (`special_texts` plus common ones), and mixtures."""
    rng = random.Random(seed)
    specials = list(SPECIAL_TEXT) + [s for s in special_texts if s not in SPECIAL_TEXT]

    def code_points() -> str:
        return "".join(random_code_point(rng) for _ in range(rng.randint(1, 12)))

    def whitespace() -> str:
        return "".join(rng.choice(WHITESPACE) * rng.randint(1, 4) for _ in range(rng.randint(1, 4)))

    def special() -> str:
        return rng.choice(specials)

    def word() -> str:
        return rng.choice(WORDS)

    makers = [code_points, whitespace, special, word]
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.2:
            s = code_points()
        elif kind < 0.3:
            s = whitespace()
        elif kind < 0.4:
            s = special()
        else:
            s = "".join(rng.choice(makers)() for _ in range(rng.randint(2, 8)))
        out.append(s)
    return out
