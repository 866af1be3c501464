"""How the decoder and its LoRA layers compute: one frozen object, given to each module when it is built.

Every switch that picks a code path lives here, is set once (trainer.loop builds it from TrainConfig;
tests and benchmarks build models with the options they want) and shows in `print(model)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing torch is kept out of trainer.config, which builds these options
    import torch

KERNEL_MODES = ("auto", "off", "interpret")
RECOMPUTE_MODES = ("off", "on", "offload")


@dataclass(frozen=True)
class ModelOptions:
    """kernels: "auto" runs the Triton kernels on CUDA tensors and plain PyTorch elsewhere; "off" runs plain
    PyTorch everywhere (the reference the kernels are measured and tested against); "interpret" runs the
    kernels on every device, the CPU included, which needs Triton's interpreter (TRITON_INTERPRET=1 before
    triton is first imported; the tests set it).

    flex_attention: FlexAttention for masked (packed, sliding-window) and softcapped attention on CUDA
    (bench/README.md, attention); never on the CPU, where it has no backward, nor with kernels "off".

    fp8: the NF4 base layers' forward products in e4m3 (trainer.kernels.fp8), where the fused LoRA paths run
    them under bfloat16; the backward stays in bfloat16.

    recompute: activation recompute (gradient checkpointing) of the decoder layers: "off"; "on" (recompute
    each layer in backward from its input); "offload" (also park each layer's input in host memory;
    trainer.recompute).
    """

    kernels: str = "auto"
    flex_attention: bool = True
    fp8: bool = False
    recompute: str = "off"

    def __post_init__(self) -> None:
        if self.kernels not in KERNEL_MODES:
            raise ValueError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {self.kernels!r}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {self.recompute!r}")
        if self.kernels == "interpret":
            from trainer.kernels.triton_math import INTERPRETED

            if not INTERPRETED:
                raise ValueError('kernels="interpret" needs TRITON_INTERPRET=1 set before triton is imported')

    def use_kernels(self, t: torch.Tensor) -> bool:
        """Whether the Triton kernels replace the plain paths for tensor t."""
        return self.kernels == "interpret" or (self.kernels == "auto" and t.is_cuda)

    def use_flex_attention(self, t: torch.Tensor) -> bool:
        """Whether attention over masks and softcaps runs as FlexAttention for tensor t."""
        return self.flex_attention and self.kernels != "off" and t.is_cuda


DEFAULT_OPTIONS = ModelOptions()  # kernels on CUDA, FlexAttention, no FP8, no recompute
