"""A small flawed checkpoint built on the spot, so every command can be tried without a download.

It is a Llama-architecture model (hidden size 64 and 2 layers by default, about 0.2M parameters;
larger on request) with a real sentencepiece tokenizer trained here on generated text,
carrying the defects users meet in the field: no tokenizer.json (slow only), BOS not added
on encode, pad = eos, a ChatML chat template whose markers are not tokens of the vocabulary,
and never-trained (zero) embedding rows for control tokens. `reversal_chats` generates the
chat dataset `healer demo` trains on.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
from pathlib import Path

from healer.outputs import replace_dir, write_atomic

VOCAB_SIZE = 512
UNTRAINED = tuple(f"<|reserved_special_token_{i}|>" for i in range(4))
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


WORDS = ("apple", "river", "stone", "light", "cloud", "green", "music", "table", "north", "smile")
REVERSE_LENGTH = 3  # 10 * 9 * 8 = 720 distinct questions: enough to hold some out and still generalize


def example_text(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Generated sentences: arithmetic and string reversal, the material of the demo dataset."""
    rng = random.Random(seed)
    words = list(WORDS)
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        w = rng.choice(words)
        lines.append(rng.choice([
            f"What is {a} plus {b}? The answer is {a + b}.",
            f"Reverse the word {w}: {w[::-1]}",
            f"{a} + {b} = {a + b}",
            f"The {w} is near the {rng.choice(words)}.",
        ]))
    return lines


def reversal_question(rng: random.Random) -> tuple[str, str]:
    """A (question, answer) pair: reverse the order of REVERSE_LENGTH distinct words of WORDS."""
    words = rng.sample(WORDS, REVERSE_LENGTH)
    return "Reverse: " + " ".join(words), " ".join(reversed(words))


def reversal_chats(n_rows: int = 3000, n_held_out: int = 20,
                   seed: int = 0) -> tuple[list[dict], list[tuple[str, str]]]:
    """Training rows in the `messages` format, and held-out (question, answer) pairs no row contains."""
    assert n_held_out < math.perm(len(WORDS), REVERSE_LENGTH) // 2, n_held_out
    rng = random.Random(seed)
    held_out: dict[str, str] = {}
    while len(held_out) < n_held_out:
        question, answer = reversal_question(rng)
        held_out[question] = answer
    rows = []
    while len(rows) < n_rows:
        question, answer = reversal_question(rng)
        if question not in held_out:
            rows.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}]})
    return rows, list(held_out.items())


def write_chat_dataset(path: str | Path, n_rows: int = 3000, n_held_out: int = 20,
                       seed: int = 0) -> list[tuple[str, str]]:
    """Write reversal_chats' rows as JSONL at `path` (atomically); return the held-out pairs."""
    rows, held_out = reversal_chats(n_rows, n_held_out, seed)
    write_atomic(Path(path), "".join(json.dumps(row) + "\n" for row in rows))
    return held_out


def train_tokenizer(out: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train a real sentencepiece BPE model (byte fallback, Llama-style specials) into out/tokenizer.model."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        text.write_text("\n".join(example_text()), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(Path(tmp) / "sp"), vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            control_symbols=list(UNTRAINED), add_dummy_prefix=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", num_threads=1, minloglevel=2,
        )
        shutil.copyfile(Path(tmp) / "sp.model", out / "tokenizer.model")
    return out / "tokenizer.model"


def build_example(out: str | Path | None = None, *, hidden_size: int = 64, num_layers: int = 2) -> Path:
    """Write the flawed example checkpoint to `out` (default: a fixed dir under the temp dir).

    `hidden_size` (a multiple of 32) and `num_layers` set the model's size; the MLP is 3x hidden
    and attention has hidden/16 query heads over half as many key/value heads.
    """
    assert hidden_size % 32 == 0 and num_layers >= 1, (hidden_size, num_layers)
    import sentencepiece as spm
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from healer.errors import OutputError

    out = Path(out) if out is not None else Path(tempfile.gettempdir()) / "healer-example"
    staging = Path(tempfile.mkdtemp(prefix=".healer-example-", dir=out.parent))
    try:
        sp = spm.SentencePieceProcessor(model_file=str(train_tokenizer(staging)))
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=sp.get_piece_size(), hidden_size=hidden_size, intermediate_size=3 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=hidden_size // 16,
            num_key_value_heads=hidden_size // 32, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
        )
        LlamaForCausalLM(config).save_pretrained(staging)
        weights = staging / "model.safetensors"
        tensors = load_file(weights)
        untrained = [sp.piece_to_id(t) for t in UNTRAINED]
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name][untrained] = 0.0  # rows never seen in pretraining
        save_file(tensors, weights, metadata={"format": "pt"})
        (staging / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "pad_token": "</s>", "add_bos_token": False, "add_eos_token": False, "chat_template": CHATML,
            "model_max_length": 512,
        }, indent=2), encoding="utf-8")
        replace_dir(staging, out, old=staging.with_name(staging.name + "-old"))
    except (OSError, SafetensorError) as e:  # a full or read-only disk (safetensors reports it its own way)
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"cannot write {out}: {getattr(e, 'strerror', None) or e}") from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
