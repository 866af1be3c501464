"""The built-in corpus used to compare tokenizers.

Deterministic (fixed seed, no files): the same 2,000+ strings on every machine. It aims at
the places where tokenizer pipelines disagree in practice:

- whitespace: leading/trailing spaces, runs of 1..16 spaces, tabs, newlines, CRLF,
  strings made only of whitespace (sentencepiece's dummy prefix and whitespace merging);
- code in several languages (indentation runs, punctuation clusters);
- numbers: digits runs, decimals, thousands separators, dates (digit splitting rules);
- many scripts: CJK, Japanese kana, Hangul, Cyrillic, Greek, Arabic, Hebrew, Devanagari,
  Thai, Vietnamese in precomposed and combining-mark (NFD) form;
- emoji: ZWJ sequences, skin tones, flags; rare and astral code points and private-use
  characters that need byte fallback;
- text of special tokens from common families (`<s>`, `<|im_start|>`, `[INST]`, ...)
  alone and inside sentences.
"""

from __future__ import annotations

import random
import unicodedata
from functools import lru_cache

WORDS = [
    "Hello", "world", "hello", "the", "The quick brown fox", "jumps over the lazy dog",
    "tokenizer", "fine-tuning", "don't", "I'm", "we'll", "U.S.A.", "e-mail", "naïve", "café",
    "résumé", "Straße", "Ångström", "coöperate", "São Paulo", "Zürich", "ﬁle", "x²", "½",
]
SCRIPTS = [
    "你好，世界", "我们今天去公园散步。", "機械学習はおもしろい", "こんにちは", "カタカナ", "ｶﾀｶﾅ",
    "안녕하세요 세계", "Привет, мир!", "Съешь же ещё этих мягких французских булок",
    "Γειά σου Κόσμε", "مرحبا بالعالم", "السلام عليكم ورحمة الله", "שלום עולם", "नमस्ते दुनिया",
    "हिन्दी भाषा", "สวัสดีชาวโลก", "Xin chào thế giới", "Tiếng Việt có dấu", "ქართული", "Հայերեն",
    "தமிழ்", "বাংলা", "ಕನ್ನಡ", "ᐃᓄᒃᑎᑐᑦ", "ትግርኛ", "မြန်မာ", "ລາວ", "ខ្មែរ", "Ελληνικά",
]
EMOJI = [
    "😀", "🤖", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "🇯🇵", "❤️", "✨", "🦙", "🧑🏿‍💻", "☕", "🫠",
]
RARE = [
    "\U0001d54f", "\U00010348", "\U0001f9ec", "\ue000", "\uf8ff", "\U000f0000", "\u200b", "\u00ad",
    "\u2028", "\ufeff", "\u0301", "\U00020000", "\U0002a6d6", "ꙮ", "𓀀", "𝄞", "\x07", "\x7f", "€", "™",
]
SPECIAL_TEXT = [
    "<s>", "</s>", "<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "[INST]", "[/INST]",
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>",
    "[control_8]", "<0x0A>", "▁", "▁▁", "<|reserved_special_token_0|>",
]
CODE = [
    "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "import numpy as np\nprint(np.arange(10))",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}',
    "<div class=\"row\">\n  <span>text</span>\n</div>",
    "SELECT * FROM users WHERE id = 42;",
    "if x == 1:\n        pass\n    else:\n        x += 1",
    "fn main() { println!(\"{}\", 1 + 1); }",
    "#!/bin/bash\nset -euo pipefail\necho \"$HOME\"",
    "    indented line\n        more indented\n",
    "a->b; c::d; e?.f ?? g; h => i; j !== k; l <<= 2;",
    "```python\nx = [i**2 for i in range(5)]\n```",
    "x_1 = y__2 + __init__ - CamelCase + snake_case_name",
]
NUMBERS = [
    "0", "7", "42", "123", "1234", "12345", "1234567890", "3.14159", "-0.5", "1e-10", "1,234,567",
    "2026-11-22", "12:34:56", "$9.99", "100%", "0x1F", "1/2", "v1.2.3", "ID-0042", "12345678901234567890",
]
WHITESPACE = [
    "", " ", "  ", "   ", "    ", "        ", " " * 16, "\t", "\t\t", "\n", "\n\n", "\n\n\n",
    " \n", "\n ", "\r\n", " \t ", "\t\n\t", "  \n  ", "\u3000", "\u00a0", "\u2003",
]
JOINERS = [" ", "", "  ", "\n", "\t", " \n ", "   ", "\n\n", ", ", ". "]


def _vietnamese_nfd() -> list[str]:
    return [unicodedata.normalize("NFD", s) for s in ("Tiếng Việt có dấu", "Xin chào thế giới", "Hà Nội")]


@lru_cache(maxsize=1)
def builtin_corpus() -> tuple[str, ...]:
    """Return the built-in corpus: at least 2,000 distinct strings, always the same ones."""
    atoms = WORDS + SCRIPTS + EMOJI + RARE + SPECIAL_TEXT + CODE + NUMBERS + _vietnamese_nfd()
    out: list[str] = []
    seen: set[str] = set()

    def add(s: str) -> None:
        if s not in seen:
            seen.add(s)
            out.append(s)

    for s in WHITESPACE + atoms:
        add(s)
    # whitespace around every atom: leading, trailing, both
    for a in atoms:
        for ws in (" ", "  ", "\n", "\t"):
            add(ws + a)
            add(a + ws)
        add(" " + a + " ")
    # special-token text inside sentences and glued to words
    for t in SPECIAL_TEXT:
        add(f"Hello {t} world")
        add(f"{t}Hello")
        add(f"user: {t}\nassistant:")
    rng = random.Random(20261122)
    pools = [WORDS, SCRIPTS, EMOJI, RARE, SPECIAL_TEXT, CODE, NUMBERS, WHITESPACE]
    while len(out) < 2200:
        parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(2, 6))]
        s = parts[0]
        for p in parts[1:]:
            s += rng.choice(JOINERS) + p
        if rng.random() < 0.2:
            s = " " * rng.randint(1, 5) + s
        if rng.random() < 0.2:
            s = s + " " * rng.randint(1, 5)
        add(s)
    return tuple(out)
