import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when trainer.kernels is first imported:
# set it before any test module of this directory imports it. CI has no GPU.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
