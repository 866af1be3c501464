"""Dataset records -> OpenAI-style messages (role/content), or plain text.

Accepted record shapes:
- OpenAI / TRL: {"messages": [{"role": ..., "content": ...}, ...]}; an assistant turn may carry
  "reasoning_content" (Qwen3's thinking), which the qwen3 template renders as its <think> block
- ShareGPT: {"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...]}
  ("user" and "assistant" are accepted as `from` values too)
- Alpaca: {"instruction": ..., "input": ... (optional), "output": ...}; a non-empty input
  follows the instruction after a blank line in the user turn
- plain text: {"text": ...} (trained as is, no chat template)

Files: a JSON array of records, or JSON Lines (one record per line). Errors name the file and
the line (JSONL) or record index (JSON array) and, for unknown shapes, the keys found.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from healer.errors import HealerError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DatasetFormatError(HealerError):
    """A dataset file or record cannot be read as chat messages or text."""


@dataclass(frozen=True)
class Example:
    """One normalized record: chat `messages`, or plain `text` (exactly one is set); `format` names the source shape."""

    format: str
    messages: list[dict[str, str]] | None = None
    text: str | None = None


def _string(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DatasetFormatError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def _turns(items: Any, key: str, role_key: str, text_key: str, roles: Mapping[str, str], where: str) -> list[dict]:
    if not isinstance(items, list):
        raise DatasetFormatError(f"{where}: {key!r} must be a list, got {type(items).__name__}")
    if not items:
        raise DatasetFormatError(f"{where}: {key!r} is empty")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or role_key not in item or text_key not in item:
            found = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise DatasetFormatError(f"{where}: {key}[{i}] needs {role_key!r} and {text_key!r} (found {found})")
        role = item[role_key]
        if role not in roles:
            raise DatasetFormatError(f"{where}: {key}[{i}] has {role_key}={role!r}; expected one of {', '.join(roles)}")
        turn = {"role": roles[role], "content": _string(item[text_key], f"{key}[{i}].{text_key}", where)}
        # Qwen3-style reasoning beside the answer; templates that know it (qwen3) render it, others ignore it.
        # datasets fills keys a row lacks with None, so None means absent.
        if turn["role"] == "assistant" and item.get("reasoning_content") is not None:
            turn["reasoning_content"] = _string(item["reasoning_content"], f"{key}[{i}].reasoning_content", where)
        out.append(turn)
    return out


def normalize(record: Any, where: str = "record") -> Example:
    """Normalize one record (see the module doc for shapes); `where` names it in errors, e.g. 'data.jsonl line 7'."""
    if not isinstance(record, Mapping):
        raise DatasetFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return Example("messages", messages=_turns(record["messages"], "messages", "role", "content",
                                                   {r: r for r in ROLES}, where))
    if "conversations" in record:
        return Example("sharegpt", messages=_turns(record["conversations"], "conversations", "from", "value",
                                                   SHAREGPT_ROLES, where))
    if "instruction" in record and "output" in record:
        instruction = _string(record["instruction"], "instruction", where)
        extra = _string(record.get("input") or "", "input", where)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return Example("alpaca", messages=[{"role": "user", "content": user},
                                           {"role": "assistant", "content": _string(record["output"], "output", where)}])
    if "text" in record:
        return Example("text", text=_string(record["text"], "text", where))
    raise DatasetFormatError(
        f"{where}: unknown record shape (keys: {', '.join(sorted(map(str, record))) or 'none'}); expected "
        "'messages', 'conversations' (ShareGPT), 'instruction'+'output' (Alpaca) or 'text'")


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for each record of a JSON array or JSONL file; malformed JSON names its line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetFormatError(f"{p}: no such file") from None
    except UnicodeDecodeError as e:
        raise DatasetFormatError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DatasetFormatError(f"{p}: cannot read ({e.strerror or e})") from None
    if text.lstrip().startswith("[") or p.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(records, list):
            raise DatasetFormatError(f"{p}: expected a JSON array of records (or JSON Lines), "
                                     f"got a {type(records).__name__}")
        for i, record in enumerate(records):
            yield f"{p} record {i}", record
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{p} line {n}: invalid JSON at column {e.colno}: {e.msg}") from None
        yield f"{p} line {n}", record


def load_examples(path: str | Path) -> list[Example]:
    """Every record of a JSON array / JSONL file, normalized."""
    return [normalize(record, where) for where, record in read_records(path)]


def load_messages(path: str | Path) -> list[dict[str, str]]:
    """One conversation from a JSON file: a list of messages, or one record in any accepted chat shape."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetFormatError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{p}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    example = normalize({"messages": data} if isinstance(data, list) else data, str(p))
    if example.messages is None:
        raise DatasetFormatError(f"{p}: holds plain text, not a conversation")
    return example.messages
