"""Errors a user can cause while exporting; all are HealerErrors, so the CLI prints one line and exits 2."""

from healer.errors import HealerError


class ExportError(HealerError):
    """Base class for export errors."""


class AdapterMismatchError(ExportError):
    """The adapter was not trained on this base model (missing modules, other shapes or architecture)."""


class UnsupportedError(ExportError):
    """Something export does not handle: an architecture, a quant type, an adapter feature."""


class TokenizationWarning(UserWarning):
    """The GGUF will tokenize some text differently in llama.cpp than the model's tokenizer did in training."""
