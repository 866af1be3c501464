"""The trainer's compact decoder: one implementation, per-family options, HF weight mapping.

`load_model(dir)` -> CausalLM; `ModelSpec.from_config(config)` holds the family switches;
`trainer.models.ops` holds the hot-path functions that Triton kernels replace.
"""

from trainer.models.decoder import CausalLM, CausalLMOutput
from trainer.models.load import load_model
from trainer.models.spec import SUPPORTED_FAMILIES, ModelSpec, RopeSpec, UnsupportedModelError

__all__ = ["CausalLM", "CausalLMOutput", "ModelSpec", "RopeSpec", "SUPPORTED_FAMILIES", "UnsupportedModelError",
           "load_model"]
