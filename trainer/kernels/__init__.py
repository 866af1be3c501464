"""Triton kernels, each a drop-in for the trainer.models.ops function of the same name and signature.

fused_linear_cross_entropy replaces lm_head + ops.causal_lm_loss together (it takes the hidden states
and the lm_head weight instead of the logits). apply_rope may rotate q and k in place (see rope.py).
"""

from trainer.kernels.fused_linear_ce import fused_linear_cross_entropy
from trainer.kernels.gated_act import gated_activation
from trainer.kernels.rms_norm import add_rms_norm, rms_norm
from trainer.kernels.rope import apply_rope

__all__ = ["add_rms_norm", "apply_rope", "fused_linear_cross_entropy", "gated_activation", "rms_norm"]
