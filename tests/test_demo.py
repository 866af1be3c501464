"""`healer demo` end to end (the CLI in a subprocess, at the tiny size) and its pieces: dataset, command line, out dir."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from healer.example import REVERSE_LENGTH, VOCAB_SIZE, WORDS, reversal_chats

REPO = Path(__file__).resolve().parents[1]
DEMO_STEPS = 80
# measured at the tiny size: the loss is about 22% of its first value after 75 steps
MAX_LOSS_FRACTION = 0.4
PLANTED = {"tokenizer.missing_fast", "tokenizer.bos_missing", "tokenizer.pad_is_eos",
           "template.tokens_not_single", "embeddings.untrained"}


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "healer-demo"
    cmd = [sys.executable, "-m", "cli", "demo", "--out", str(out), "--size", "tiny", "--steps", str(DEMO_STEPS),
           "--device", "cpu"]
    # one intra-op thread: at hidden 64 more threads only contend with parallel test workers
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_demo_cli_plants_the_defects_and_its_fixed_checkpoint_has_no_errors(demo_out):
    import healer

    out, _ = demo_out
    flawed = healer.diagnose(out / "flawed-model")
    assert PLANTED <= flawed.checks()
    assert flawed.has_errors
    fixed = healer.diagnose(out / "fixed-model")
    assert not fixed.has_errors, [f.message for f in fixed.findings if f.severity == "error"]
    assert not fixed.checks() & (PLANTED - {"embeddings.untrained"})


@pytest.mark.slow
def test_demo_cli_training_loss_falls_from_the_uniform_loss(demo_out):
    out, _ = demo_out
    summary = json.loads((out / "healer-demo.json").read_text())
    # the base model is random: its first loss is that of a uniform guess over the vocabulary
    assert summary["first_loss"] == pytest.approx(math.log(VOCAB_SIZE), abs=0.3)
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == DEMO_STEPS
    assert metrics[-1]["loss"] < MAX_LOSS_FRACTION * summary["first_loss"]
    assert (out / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_cli_gguf_reads_back_with_the_merged_models_tensors_and_config(demo_out):
    import gguf
    from safetensors import safe_open

    out, stdout = demo_out
    reader = gguf.GGUFReader(out / "model-q8_0.gguf")
    config = json.loads((out / "merged" / "config.json").read_text())
    with safe_open(out / "merged" / "model.safetensors", "pt") as f:
        merged_tensors = len(list(f.keys()))
    assert len(reader.tensors) == merged_tensors
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    assert arch == "llama"
    assert reader.fields[gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)].contents() == config["num_hidden_layers"]
    assert reader.fields[gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)].contents() == config["hidden_size"]
    assert len(reader.fields[gguf.Keys.Tokenizer.LIST].contents()) == config["vocab_size"]
    assert reader.fields[gguf.Keys.General.FILE_TYPE].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    assert matrices and all(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in matrices)
    assert str(out / "model-q8_0.gguf") in stdout.replace("\n", "")


def test_reversal_chats_hold_out_questions_and_answer_with_the_words_reversed():
    rows, held_out = reversal_chats(n_rows=500, n_held_out=10, seed=3)
    assert len(rows) == 500 and len(held_out) == len({q for q, _ in held_out}) == 10
    trained = {row["messages"][0]["content"] for row in rows}
    assert not trained & {q for q, _ in held_out}
    for row in rows:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        words = user["content"].removeprefix("Reverse: ").split(" ")
        assert len(words) == REVERSE_LENGTH == len(set(words)) and set(words) <= set(WORDS)
        assert assistant["content"].split(" ") == words[::-1]


def test_demo_prints_a_trainer_run_command_that_parses_to_its_config():
    from export.demo import TRAIN_SETTINGS, train_command
    from trainer.config import TrainConfig, resolve_config

    config = TrainConfig(model="m", data="d.jsonl", out="r", max_steps=7, device="cpu", logging_steps=2,
                         load_in_4bit=False, **TRAIN_SETTINGS)
    argv = shlex.split(train_command(config))
    assert argv[:2] == ["trainer", "run"]
    ctx = cli.trainer_run.make_context("run", argv[2:])
    params = {k: v for k, v in ctx.params.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    assert resolve_config(None, **params) == config


def test_demo_refuses_a_non_empty_directory_it_did_not_write(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli.healer, ["demo", "--out", str(tmp_path), "--size", "tiny"])
    assert result.exit_code == 2
    assert "not empty" in result.output
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_demo_trains_with_one_bos_first(demo_out):
    from healer.model_dir import ModelDir
    from trainer.data import prepare_model_data

    out, _ = demo_out
    ckpt = ModelDir(out / "fixed-model")
    _, data = prepare_model_data(ckpt, out / "reverse-chat.jsonl", None, max_seq_len=256, train_on_inputs=False,
                                 limit=20)
    bos = ckpt.hf_tokenizer().bos_token_id
    assert bos is not None
    assert all(ex.input_ids[0] == bos and ex.input_ids[1] != bos for ex in data.examples)


@pytest.mark.slow
def test_demo_gguf_answers_in_llama_cpp_as_the_merged_model_does(demo_out):
    """llama.cpp, on the demo's q8_0 GGUF and its own tokenization of the served prompt (the GGUF's template,
    its add_bos flag), answers the held-out questions greedily as transformers does on the merged model."""
    from export.demo import N_HELD_OUT, N_ROWS, greedy_answers, prompt_ids

    _llama_cpp()
    from export.verify import LlamaCppFile

    out, _ = demo_out
    _, held_out = reversal_chats(N_ROWS, N_HELD_OUT)
    questions = [q for q, _ in held_out[:5]]
    want = greedy_answers(out / "merged", questions)
    from healer.model_dir import ModelDir

    tok = ModelDir(out / "merged").hf_tokenizer()
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    got = []
    with LlamaCppFile(out / "model-q8_0.gguf", n_ctx=128) as llm:
        for question, ids in zip(questions, prompt_ids(out / "merged", questions)):
            text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True).removeprefix(tok.bos_token)
            assert llm.tokenize(text, True, True) == ids  # llama.cpp serves the prompt training saw
            answer: list[int] = []
            while len(answer) < 16:
                token = int(llm.logits(ids + answer)[-1].argmax())
                if token in stops:
                    break
                answer.append(token)
            got.append(tok.decode(answer, skip_special_tokens=True).strip())
    assert got == want


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"llama_cpp cannot be imported ({e}); CI must run the llama.cpp tests", pytrace=False)
        pytest.skip("llama-cpp-python is not installed")
    return llama_cpp
