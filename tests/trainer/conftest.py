"""Fixtures shared by the trainer's run-level tests (test_cli_run, test_ddp, test_resume)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_runs


@pytest.fixture(scope="session")
def llama2(tmp_path_factory) -> Path:
    """A tiny Llama with the real Llama-2 tokenizer; tests that edit it work on a copy (tiny_runs.copy_checkpoint)."""
    # initializer_range 0.2: with the default 0.02 a random tiny model's logits are too small for its loss
    # to move far from ln(32000) whatever LoRA learns (the final RMSNorm caps the hidden state's norm)
    return tiny_runs.llama2_checkpoint(tmp_path_factory.mktemp("l2") / "model", initializer_range=0.2)


@pytest.fixture(scope="module")
def chat_data(request, tmp_path_factory) -> Path:
    """A JSONL file of the requesting module's CHAT_ROWS synthetic chats (tiny_runs.chat_rows)."""
    rows = tiny_runs.chat_rows(request.module.CHAT_ROWS)
    return tiny_runs.write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", rows)
