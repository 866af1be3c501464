"""Verified slow -> fast conversion: agreement with sentencepiece and time, per model.

For each sentencepiece model: agreement (ids and decode round trip) of transformers' own
conversion and of ours on the built-in corpus, llama.cpp's test strings and 10,000 fuzz strings;
conversion time of both; verification time of ours over corpus + 10,000 fuzz strings (the
goal: under 5 s). CPU only; run from the repository root:

    python bench/tokenizer_agreement.py [MODEL ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# this file's name would shadow the `tokenizers` package when run as a script
sys.path = [str(ROOT / "tests"), str(ROOT / "tests" / "tokenizers")] + [
    p for p in sys.path if Path(p or ".").resolve() != HERE
]

import sentencepiece as spm  # noqa: E402
import spm_models  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from healer.tokenizers.compare import compare_encodings  # noqa: E402
from healer.tokenizers.convert import (  # noqa: E402
    added_token_list,
    finish,
    load_model,
    spm_pipeline,
    transformers_conversion,
)

MODELS = list(spm_models.REAL) + ["gemma-style-bpe", "default-bpe", "default-unigram", "nfkc-unigram"]


def build(name: str, ours: bool) -> tuple[Tokenizer, float]:
    data, proto = load_model(spm_models.model_bytes(name))
    start = time.perf_counter()
    tok = spm_pipeline(proto, compose_first=bool(proto.normalizer_spec.precompiled_charsmap)) if ours else (
        transformers_conversion(data, "LlamaTokenizer"))
    finish(tok, proto, added_token_list(proto, {}), add_bos=True, add_eos=False)
    tok = Tokenizer.from_str(tok.to_str())
    return tok, time.perf_counter() - start


def counts(sp: spm.SentencePieceProcessor, tok: Tokenizer, strings: list[str]) -> str:
    c = compare_encodings(sp, tok, strings)
    ok = c.n - len({m.text for m in c.mismatches} | {d.text for d in c.decode_mismatches})
    return f"{ok}/{c.n}"


def main(names: list[str]) -> None:
    table = Table(title="sentencepiece -> tokenizer.json: strings agreeing (ids and decode) / compared")
    for col in ("model", "set", "transformers", "ours", "convert transformers", "convert ours", "verify ours"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name in names:
        sp = spm_models.processor(name)
        sets = spm_models.verification_sets(name)
        theirs, t_theirs = build(name, ours=False)
        ours, t_ours = build(name, ours=True)
        start = time.perf_counter()
        verification = compare_encodings(sp, ours, sets["corpus"] + sets["fuzz"])
        t_verify = time.perf_counter() - start
        assert verification.n == len(sets["corpus"]) + len(sets["fuzz"])
        for i, (label, strings) in enumerate(sets.items()):
            timing = (f"{t_theirs:.2f} s", f"{t_ours:.2f} s", f"{t_verify:.2f} s") if i == 0 else ("", "", "")
            table.add_row(name if i == 0 else "", label, counts(sp, theirs, strings), counts(sp, ours, strings), *timing)
        table.add_section()
    Console(width=150).print(table)


if __name__ == "__main__":
    main(sys.argv[1:] or MODELS)
