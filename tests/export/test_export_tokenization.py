"""GGUF export warns when llama.cpp will tokenize text after special tokens differently from training.

llama.cpp prefixes "▁" to every piece of text after a special token of a sentencepiece vocabulary
(tests/export/test_export_llama_cpp.py shows it on llama.cpp itself); transformers' sentencepiece
tokenizers prefix only the start of the text. `healer fix --chatml` builds a tokenizer that follows
llama.cpp's rule, so its export is silent.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
from export_helpers import chatml_llama, healed_chatml_llama

import export


def test_export_warns_when_text_after_a_special_token_would_be_prefixed_by_llama_cpp(tmp_path):
    base = chatml_llama(tmp_path / "base")
    with pytest.warns(export.TokenizationWarning, match=r"'<\|im_end\|>user' is \[32001, 1792\]"):
        export.to_gguf(base, tmp_path / "model.gguf", "f16")
    assert (tmp_path / "model.gguf").is_file()


def test_export_of_a_chatml_model_healed_by_fix_does_not_warn(tmp_path):
    from transformers import AutoTokenizer

    base = healed_chatml_llama(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(str(base))
    # what transformers gives in training is llama.cpp's rule: the text after the token is prefixed
    assert tok.tokenize("<|im_start|>user\n")[:2] == ["<|im_start|>", "\u2581user"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", export.TokenizationWarning)
        export.to_gguf(base, tmp_path / "model.gguf", "f16")


def test_trainer_export_prints_the_warning_on_one_line_and_still_writes(tmp_path):
    base = chatml_llama(tmp_path / "base")
    proc = subprocess.run([sys.executable, "-m", "trainer", "export", str(base), "-o", str(tmp_path / "m.gguf"),
                           "--format", "gguf"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(lines) == 1 and "llama.cpp will tokenize text after special tokens differently" in lines[0]
    assert (tmp_path / "m.gguf").is_file()
