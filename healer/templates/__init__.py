"""Chat templates: registry, rendering, detection, assistant masks, dataset formats."""

from healer.templates.detect import detect, equivalent
from healer.templates.formats import DatasetFormatError, Example, load_examples, load_messages, normalize
from healer.templates.mask import IGNORE_INDEX, ChatMasker, MaskedChat, highlight, render_with_mask
from healer.templates.registry import TEMPLATES, ChatTemplate, get, names
from healer.templates.render import TemplateError, render_source

__all__ = [
    "IGNORE_INDEX", "TEMPLATES", "ChatMasker", "ChatTemplate", "DatasetFormatError", "Example", "MaskedChat",
    "TemplateError", "detect", "equivalent", "get", "highlight", "load_examples", "load_messages", "names",
    "normalize", "render_source", "render_with_mask",
]
