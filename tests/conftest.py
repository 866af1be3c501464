import os
import sys
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when trainer.kernels is first imported
# (by any test package: kernels, trainer, export): set it here, before any test module is collected.
# CI has no GPU, so the kernels run as Python there.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).parent))

import testdata  # noqa: E402


@pytest.fixture(scope="session")
def llama_cpp_models() -> Path:
    return testdata.llama_cpp_models()
