"""export: LoRA merge to 16-bit safetensors and GGUF files for llama.cpp."""

from export.errors import AdapterMismatchError, ExportError, TokenizationWarning, UnsupportedError
from export.gguf import QUANTS, to_gguf
from export.merge import merge

__all__ = ["QUANTS", "AdapterMismatchError", "ExportError", "TokenizationWarning", "UnsupportedError", "merge",
           "to_gguf"]
