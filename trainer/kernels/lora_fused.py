"""LoRA-fused projections and gated MLP with hand-written backward passes: the public names, from three modules.

    trainer.kernels.lora_workspace   the buffers and caches: dense_weight (a base's weight dequantized or cast
                                     into a workspace shared by every layer, clear_workspaces), fp8_weight and
                                     fp8_capable (the e4m3 weight with its cached row scales), and
                                     cached_factor_casts (each LoRA factor cast once per optimizer step)
    trainer.kernels.lora_projection  one projection, y = x W^T + b + s (x A^T) B^T over a frozen nn.Linear or
                                     NF4 Linear4bit (lora_linear, LoRALinearFunction), and several of one
                                     input, q, k and v, with their A's stacked (lora_projections,
                                     LoRAProjectionsFunction); the dtype plan that matches the plain path
    trainer.kernels.lora_mlp         the gated MLP, down(act(gate(x)) * up(x)), as one Function that keeps only
                                     x and the small LoRA products for its backward (lora_mlp,
                                     LoRAMLPFunction), with its Triton activation kernels
                                     (gated_lora_activation, gated_backward_in_place)

Each module's docstring explains its design; the trainer (trainer.lora, trainer.models.decoder, trainer.loop,
trainer.graphs) and bench/ import the public names from here.
"""

from trainer.kernels.lora_mlp import (
    GatedLoRA,
    LoRAMLPFunction,
    gated_backward_in_place,
    gated_lora_activation,
    lora_mlp,
)
from trainer.kernels.lora_projection import (
    LoRALinearFunction,
    LoRAProjectionsFunction,
    Projection,
    lora_linear,
    lora_projections,
)
from trainer.kernels.lora_workspace import (
    cached_factor_casts,
    clear_workspaces,
    dense_weight,
    fp8_capable,
    fp8_weight,
)

__all__ = [
    "GatedLoRA",
    "LoRALinearFunction",
    "LoRAMLPFunction",
    "LoRAProjectionsFunction",
    "Projection",
    "cached_factor_casts",
    "clear_workspaces",
    "dense_weight",
    "fp8_capable",
    "fp8_weight",
    "gated_backward_in_place",
    "gated_lora_activation",
    "lora_linear",
    "lora_mlp",
    "lora_projections",
]
