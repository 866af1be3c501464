"""Render chat templates the way transformers' apply_chat_template(tokenize=False) does.

We own a small Jinja environment instead of calling transformers' private compiler: it
uses the same settings (sandboxed, trim_blocks, lstrip_blocks, loopcontrols, a
`raise_exception` global, a non-escaping `tojson`, `strftime_now`) so a template renders
to the same string (tests compare both), and it adds one thing transformers also knows:
`{% generation %}...{% endgeneration %}` blocks, whose character spans we record for
assistant-only loss masks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from healer.errors import HealerError

Message = Mapping[str, Any]
Span = tuple[int, int]


class TemplateError(HealerError):
    """A chat template is unknown, does not parse, or refuses to render a conversation."""


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}` blocks: record the character span each one occupies in the output."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_record", [jinja2.nodes.ContextReference()]),
                                      [], [], body).set_lineno(lineno)

    def _record(self, context: jinja2.runtime.Context, caller: jinja2.runtime.Macro) -> str:
        text = caller()
        tracker = context.get("__healer_tracker")
        if tracker is not None:
            start = sum(len(s) for s in tracker["emitted"])
            tracker["spans"].append((start, start + len(text)))
            tracker["texts"].append(text)
        return text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON (as in transformers)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=64)
def compile_template(source: str, name: str = "template") -> jinja2.Template:
    """Parse a Jinja chat template; a syntax error becomes a TemplateError naming `name` and the line."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template {name!r} does not parse: line {e.lineno}: {e.message}") from e


def _plain_messages(messages: Sequence[Message], name: str) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TemplateError(f"chat template {name!r}: messages must be a list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TemplateError(f"chat template {name!r}: message {i} is a {type(m).__name__}, not an object")
        # transformers drops None values (OpenAI-style content=None) before rendering; so do we
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def render_spans(source: str, messages: Sequence[Message], *, add_generation_prompt: bool = False,
                 name: str = "template", **variables: Any) -> tuple[str, list[Span]]:
    """Render `source` and return the text plus the character spans of its `{% generation %}` blocks."""
    template = compile_template(source, name)
    msgs = _plain_messages(messages, name)
    tracker: dict[str, list] = {"emitted": [], "spans": [], "texts": []}
    context = {"tools": None, "documents": None, **variables, "messages": msgs,
               "add_generation_prompt": add_generation_prompt, "__healer_tracker": tracker}
    try:
        for piece in template.generate(**context):
            tracker["emitted"].append(piece)
    except jinja2.TemplateError as e:  # raise_exception(), undefined variables, sandbox violations
        raise TemplateError(f"chat template {name!r} cannot render this conversation: {e.message}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise TemplateError(f"chat template {name!r} cannot render this conversation: {e}") from e
    text = "".join(tracker["emitted"])
    # Offsets count what was emitted before a block; output buffered by {% set %} blocks or macros is
    # emitted later, so a generation block inside one would get a wrong span
    if any(text[a:b] != t for (a, b), t in zip(tracker["spans"], tracker["texts"], strict=True)):
        raise TemplateError(f"chat template {name!r}: {{% generation %}} blocks inside macros or set blocks "
                            "are not supported")
    return text, tracker["spans"]


def render_source(source: str, messages: Sequence[Message], *, add_generation_prompt: bool = False,
                  name: str = "template", **variables: Any) -> str:
    """Render a Jinja chat template string (transformers conventions) to text."""
    return render_spans(source, messages, add_generation_prompt=add_generation_prompt, name=name, **variables)[0]
