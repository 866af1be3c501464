"""Which registry entry is a checkpoint's chat template equivalent to? Decided by rendering.

Two templates are equivalent here when, over a fixed set of probe conversations (system
prompt present and absent, one to three turns, unicode and padded content, empty content,
reasoning in <think> blocks, generation prompt on and off, once with enable_thinking=False),
they render the same strings and refuse the same conversations. Text comparison of template
sources would miss reformatted copies.
"""

from __future__ import annotations

from healer.templates.registry import TEMPLATES, ChatTemplate
from healer.templates.render import Message, TemplateError, compile_template, render_source

# Variables every probe render gets. No date_string on purpose: Llama 3.2's template writes today's
# date without one, 3.1's and 3.3's a fixed date, and the probes must tell them apart
PROBE_VARIABLES: dict[str, object] = {}


def _m(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


PROBES: list[list[Message]] = [
    [_m("user", "Hello")],
    [_m("system", "You are terse."), _m("user", "Hello")],
    [_m("user", "Hi"), _m("assistant", "Hello! How can I help?")],
    [_m("system", "You are terse."), _m("user", "Hi"), _m("assistant", "Hello.")],
    [_m("user", "One"), _m("assistant", "Two"), _m("user", "Three"), _m("assistant", "Four"), _m("user", "Five")],
    [_m("system", "Be kind."), _m("user", "A?"), _m("assistant", "B."), _m("user", "C?"), _m("assistant", "D.")],
    [_m("user", "  Grüße, 世界 👋\n"), _m("assistant", " Привет — ok \n")],
    [_m("system", ""), _m("user", ""), _m("assistant", "")],
    # Qwen3 drops the reasoning of turns before the last user message and keeps the last one's
    [_m("user", "Q?"), _m("assistant", "<think>\nhm\n</think>\n\nA."), _m("user", "R?"),
     _m("assistant", "<think>\nso\n</think>\n\nB.")],
]
# (probe, add_generation_prompt, extra variables): every probe with and without the generation
# prompt, and one prompt with thinking switched off (Qwen3 then writes an empty think block)
_CASES: list[tuple[list[Message], bool, dict]] = [
    *((messages, gen, PROBE_VARIABLES) for messages in PROBES for gen in (False, True)),
    (PROBES[0], True, {**PROBE_VARIABLES, "enable_thinking": False}),
]
_ERROR = object()


def _outcomes(source: str, bos_token: str, eos_token: str, name: str) -> list[object]:
    out: list[object] = []
    for messages, gen, variables in _CASES:
        try:
            out.append(render_source(source, messages, add_generation_prompt=gen, name=name,
                                     bos_token=bos_token, eos_token=eos_token, **variables))
        except TemplateError:
            out.append(_ERROR)
    return out


def equivalent(source: str, entry: ChatTemplate, *, bos_token: str | None = None,
               eos_token: str | None = None) -> bool:
    """Whether `source` renders like `entry` on every probe (bos/eos default to the entry's family tokens)."""
    key = (entry.bos_token if bos_token is None else bos_token, entry.eos_token if eos_token is None else eos_token)
    theirs = _outcomes(source, *key, "checkpoint template")
    return any(o is not _ERROR for o in theirs) and theirs == _outcomes(entry.source, *key, entry.name)


def detect(source: str, *, bos_token: str | None = None, eos_token: str | None = None) -> str | None:
    """Name of the registry entry `source` is equivalent to, or None. A template that does not parse raises TemplateError.

    Pass the checkpoint's bos/eos tokens when known: a template that hard-codes '<s>' then still
    matches an entry that writes bos_token.
    """
    compile_template(source, "checkpoint template")
    theirs: dict[tuple[str, str], list[object]] = {}
    for entry in TEMPLATES.values():
        key = (entry.bos_token if bos_token is None else bos_token, entry.eos_token if eos_token is None else eos_token)
        if key not in theirs:
            theirs[key] = _outcomes(source, *key, "checkpoint template")
        if any(o is not _ERROR for o in theirs[key]) and theirs[key] == _outcomes(entry.source, *key, entry.name):
            return entry.name
    return None
