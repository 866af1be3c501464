"""`healer doctor` as a user runs it: real subprocesses, exit codes, one-line errors, JSON mode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from healer.example import build_example

HEALER = [sys.executable, "-c", "import cli; cli.healer()"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="120")
    return subprocess.run([*HEALER, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    return build_example(tmp_path_factory.mktemp("ex") / "example")


@pytest.fixture
def model(example, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(example, dst)
    return dst


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for n in needles:
        assert n in lines[0]


def test_json_mode_prints_only_the_report_and_exits_1_on_errors(example):
    result = run("doctor", str(example), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["model"] == str(example)
    found = {f["check"] for f in report["findings"]}
    assert {"tokenizer.missing_fast", "tokenizer.bos_missing", "tokenizer.pad_is_eos",
            "template.tokens_not_single"} <= found
    assert report["summary"]["error"] == sum(f["severity"] == "error" for f in report["findings"]) > 0


def test_table_mode_names_checks_and_fix_commands(example):
    result = run("doctor", str(example))
    assert result.returncode == 1
    assert "tokenizer.bos_missing" in result.stdout
    assert "healer fix" in result.stdout


def test_missing_directory(tmp_path):
    assert_one_line_error(run("doctor", str(tmp_path / "nope")), "no such directory")


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_one_line_error(run("doctor", str(tmp_path)), "no config.json")


def test_invalid_json_in_tokenizer_config(model):
    (model / "tokenizer_config.json").write_text('{"bos_token": "<s>",, }')
    assert_one_line_error(run("doctor", str(model)), "tokenizer_config.json", "invalid JSON", "line 1")


def test_invalid_json_in_config(model):
    (model / "config.json").write_text("{")
    assert_one_line_error(run("doctor", str(model)), "config.json", "invalid JSON")


def test_truncated_safetensors(model):
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run("doctor", str(model)), "model.safetensors", "truncated")


def test_corrupt_safetensors_header(model):
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    assert_one_line_error(run("doctor", str(model)), "model.safetensors", "corrupt")


def test_unparsable_sentencepiece_model(model):
    (model / "tokenizer.model").write_bytes(b"this is not a protobuf" * 10)
    assert_one_line_error(run("doctor", str(model)), "tokenizer.model", "sentencepiece")


def test_template_syntax_error_is_a_finding(model):
    (model / "chat_template.jinja").write_text("{% if messages %}{{ messages[0]['content'] }")
    result = run("doctor", str(model), "--json")
    assert result.returncode == 1
    found = {f["check"]: f for f in json.loads(result.stdout)["findings"]}
    assert "template.render_error" in found


def test_debug_flag_shows_the_traceback(tmp_path):
    result = run("--debug", "doctor", str(tmp_path / "nope"))
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "CheckpointError" in result.stderr


def test_missing_corpus_file_is_a_usage_error(example, tmp_path):
    assert_one_line_error(run("doctor", str(example), "--corpus", str(tmp_path / "none.txt")), "corpus")


def test_example_flag_builds_and_diagnoses_without_arguments():
    result = run("doctor", "--example", "--json")
    assert result.returncode == 1
    assert "tokenizer.bos_missing" in {f["check"] for f in json.loads(result.stdout)["findings"]}


def test_input_is_never_modified(example):
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in example.iterdir()}
    run("doctor", str(example), "--json", "--check-weights")
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in example.iterdir()}
    assert before == after
