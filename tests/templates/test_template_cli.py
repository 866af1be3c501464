"""`healer template list|show|render`, run as a user runs it (subprocess of the installed script)."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import testdata
from template_refs import CONVERSATIONS, hf_render

from healer.templates import get, names

HEALER = str(Path(sys.executable).parent / "healer")


def healer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HEALER, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    """A model dir holding Phi-3's real tokenizer (no weights: `render` reads only the tokenizer)."""
    out = tmp_path_factory.mktemp("phi3")
    shutil.copyfile(testdata.fast_tokenizer_json("phi-3"), out / "tokenizer.json")
    (out / "config.json").write_text(json.dumps({"model_type": "phi3"}), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|endoftext|>"}),
        encoding="utf-8")
    return out


@pytest.fixture
def messages_file(tmp_path):
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(CONVERSATIONS["system_three_turns"]), encoding="utf-8")
    return path


def test_list_names_every_entry():
    result = healer("template", "list")
    assert result.returncode == 0, result.stderr
    for name in names():
        assert name in result.stdout


def test_show_prints_the_source_written_into_checkpoints():
    result = healer("template", "show", "llama-3.1")
    assert result.returncode == 0
    assert result.stdout == get("llama-3.1").source + "\n"


def test_render_matches_the_official_template(messages_file):
    result = healer("template", "render", "qwen2.5", "--messages", str(messages_file), "--generation-prompt")
    assert result.returncode == 0, result.stderr
    official = testdata.template("Qwen-Qwen2.5-7B-Instruct")
    assert result.stdout == hf_render(official, CONVERSATIONS["system_three_turns"], True)


def test_mask_piped_brackets_exactly_the_assistant_turns_of_the_official_rendering(messages_file, phi3_dir):
    result = healer("template", "render", "phi-3", "--messages", str(messages_file), "--tokenizer", str(phi3_dir),
                    "--mask")
    assert result.returncode == 0, result.stderr
    conv = CONVERSATIONS["system_three_turns"]
    official = hf_render(testdata.template("microsoft-Phi-3.5-mini-instruct"), conv, False,
                         eos_token="<|endoftext|>")
    assert result.stdout.replace("[[", "").replace("]]", "") == official
    assert re.findall(r"\[\[(.*?)\]\]", result.stdout, re.S) == [
        x["content"] + "<|end|>" for x in conv if x["role"] == "assistant"]
    assert "trained" in result.stderr


def test_mask_in_a_terminal_uses_colour_not_brackets(messages_file, phi3_dir):
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "200"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([HEALER, "template", "render", "phi-3", "--messages", str(messages_file),
                             "--tokenizer", str(phi3_dir), "--mask"], stdout=follower, stderr=subprocess.PIPE,
                            env=env)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    text = out.decode("utf-8")
    assert "\x1b[" in text and "[[" not in text
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text).replace("\r\n", "\n")
    assert "<|assistant|>\nB<|end|>" in plain


@pytest.mark.parametrize("args,message", [
    (["render", "mistral", "--messages", "MSG"], "error: unknown chat template 'mistral'"),
    (["render", "gemma", "--messages", "MSG"], "error: chat template 'gemma' cannot render this conversation: "
                                               "System role not supported"),
    (["render", "chatml", "--messages", "BAD"], "error: BAD: invalid JSON at line 1 column 2"),
    (["render", "chatml", "--messages", "SHAPE"], "error: SHAPE: unknown record shape (keys: prompt)"),
    (["show", "nope"], "error: unknown chat template 'nope'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, messages_file, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops", encoding="utf-8")
    shape = tmp_path / "shape.json"
    shape.write_text('{"prompt": "x"}', encoding="utf-8")
    paths = {"MSG": str(messages_file), "BAD": str(bad), "SHAPE": str(shape)}
    result = healer("template", *[paths.get(a, a) for a in args])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    for key, value in paths.items():
        message = message.replace(key, value)
    assert result.stderr.startswith(message), result.stderr


def test_mask_without_tokenizer_is_a_usage_error(messages_file):
    result = healer("template", "render", "chatml", "--messages", str(messages_file), "--mask")
    assert result.returncode == 2 and "--mask needs --tokenizer" in result.stderr
