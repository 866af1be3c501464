"""Render chat templates the way transformers' apply_chat_template(tokenize=False) does.

We own a small Jinja environment instead of calling transformers' private compiler: it
uses the same settings (sandboxed, trim_blocks, lstrip_blocks, loopcontrols, a
`raise_exception` global, a non-escaping `tojson`, `strftime_now`) so a template renders
to the same string (tests compare both), and it adds one thing transformers also knows:
`{% generation %}...{% endgeneration %}` blocks, whose character spans we record for
assistant-only loss masks.

A template is code from the checkpoint's author, so each render runs on a budget: RENDER_SECONDS
of time, MAX_OUTPUT_CHARS of output, and no `*`/`+`/`**` or string method that would build a value
larger than that in one go. Over budget is a TemplateError (doctor: template.render_error), never
a hang or a 10 GB allocation.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from healer.errors import HealerError

Message = Mapping[str, Any]
Span = tuple[int, int]

RENDER_SECONDS = 1.0  # a real template renders a conversation in milliseconds
MAX_OUTPUT_CHARS = 10_000_000  # far above any training example, far below a memory problem


class TemplateError(HealerError):
    """A chat template is unknown, does not parse, or refuses to render a conversation."""


class TemplateBudgetError(TemplateError):
    """A chat template ran past the render budget: a template bug, whatever the conversation."""


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


class _OverBudget(jinja2.exceptions.SecurityError):
    """The template ran past the render budget (time, output size, or one operation's size)."""


class _Budget(threading.local):
    """This thread's current render: its deadline (None outside a render)."""

    deadline: float | None = None


_BUDGET = _Budget()


def _check_time() -> None:
    if _BUDGET.deadline is not None and time.monotonic() > _BUDGET.deadline:
        raise _OverBudget(f"rendering took longer than {RENDER_SECONDS:g} s (a loop too long for a chat template)")


def _trace_template(frame, event, arg):
    # Only the template's own compiled code (jinja compiles from_string sources as "<template>") is traced line
    # by line: its loops are where a render can spin for ever without calling anything we could intercept.
    if frame.f_code.co_filename != "<template>":
        return None

    def on_line(frame, event, arg):
        if event == "line":
            _check_time()
        return on_line

    return on_line


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else None


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus checks on the operations that can build a huge value in one step."""

    intercepted_binops = frozenset({"*", "+", "**"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                size = _size(seq)
                if size is not None and isinstance(n, int) and size * n > MAX_OUTPUT_CHARS:
                    raise _OverBudget(f"{type(seq).__name__} * {n} would hold {size * n:,} items "
                                      f"(at most {MAX_OUTPUT_CHARS:,})")
        elif operator == "+":
            a, b = _size(left), _size(right)
            if a is not None and b is not None and a + b > MAX_OUTPUT_CHARS:
                raise _OverBudget(f"a concatenation of {a + b:,} items (at most {MAX_OUTPUT_CHARS:,})")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                and right * max(abs(left).bit_length(), 1) > 64 * 1024:
            raise _OverBudget(f"{left} ** {right} is too large a number")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:
        _check_time()
        # str.center(10**10), "x".ljust(...), zfill: one call, one huge string
        if isinstance(getattr(__obj, "__self__", None), str) and any(
                isinstance(a, int) and a > MAX_OUTPUT_CHARS for a in (*args, *kwargs.values())):
            raise _OverBudget(f"{getattr(__obj, '__name__', 'a string method')}() with a size over "
                              f"{MAX_OUTPUT_CHARS:,}")
        return super().call(__context, __obj, *args, **kwargs)


class _Range(Sequence[int]):
    """range() for templates: the sandbox caps one at 100,000 items, but nested loops multiply, so iterating
    checks the clock every 1,024 items."""

    def __init__(self, *args: int):
        self._items = safe_range(*args)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]

    def __iter__(self) -> Iterator[int]:
        for n, i in enumerate(self._items):
            if not n & 1023:
                _check_time()
            yield i


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = _BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True,
                               extensions=[_GenerationBlocks, jinja2.ext.loopcontrols])
    env.globals["range"] = _Range
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
    outer, tracer = _BUDGET.deadline, sys.gettrace()
    _BUDGET.deadline = time.monotonic() + RENDER_SECONDS
    sys.settrace(_trace_template)
    try:
        emitted = 0
        for piece in template.generate(**context):
            tracker["emitted"].append(piece)
            emitted += len(piece)
            if emitted > MAX_OUTPUT_CHARS:
                raise _OverBudget(f"the output passed {MAX_OUTPUT_CHARS:,} characters")
    except _OverBudget as e:
        raise TemplateBudgetError(f"chat template {name!r} cannot render this conversation: {e.message}") from e
    except jinja2.TemplateError as e:  # raise_exception(), undefined variables, sandbox violations
        raise TemplateError(f"chat template {name!r} cannot render this conversation: {e.message}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError, OverflowError,
            MemoryError) as e:
        raise TemplateError(f"chat template {name!r} cannot render this conversation: "
                            f"{e or type(e).__name__}") from e
    finally:
        sys.settrace(tracer)
        _BUDGET.deadline = outer
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
