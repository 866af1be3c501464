import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import testdata  # noqa: E402


@pytest.fixture(scope="session")
def llama_cpp_models() -> Path:
    return testdata.llama_cpp_models()
