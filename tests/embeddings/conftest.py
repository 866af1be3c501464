"""Session fixtures: tiny Llama 3 checkpoints (built by embedding_fixtures)."""

import pytest
from embedding_fixtures import Llama3Checkpoint, llama3_checkpoint


@pytest.fixture(scope="session")
def llama3_untrained(tmp_path_factory) -> Llama3Checkpoint:
    """Sharded (embedding, layers and lm_head in separate shards) with planted untrained rows."""
    return llama3_checkpoint(tmp_path_factory.mktemp("llama3") / "model", max_shard_size="8MB")


@pytest.fixture(scope="session")
def llama3_healthy(tmp_path_factory) -> Llama3Checkpoint:
    return llama3_checkpoint(tmp_path_factory.mktemp("llama3-healthy") / "model", plant=False)
