"""What makes a record trainable, shared by the feedback importer (data/feedback.py, data/formats*.py) and the
trainers' loader (data.datasets.load_records / prepare_record): so what the importer keeps, the trainers load.

- Special-token text. A user asking "what does <|im_start|> mean?" is normal chat-log content, but the literal
  string would become a turn marker when tokenised. Such text is ESCAPED, not dropped: a zero-width space (U+200B)
  goes after "<|" ("<|im_start|>" -> "<|\\u200bim_start|>"), so it looks the same, tokenises as ordinary text, and
  the record stays trainable. Every `<|name|>` (Qwen2.5's <|fim_prefix|>, <|vision_start|>, ... too) is escaped, in
  message contents, tool calls, tool schemas and plain text. Escaping is idempotent.
- Messages. Roles system / user / assistant / tool; content a string (an assistant message with tool calls may have
  none: it becomes ""); tool calls canonical {"type": "function", "function": {"name", "arguments"}}, with
  `arguments` given as a JSON-object string (OpenAI's wire format) parsed into an object, as Qwen2.5's template
  expects. `weight` 0 / 1 is kept on assistant messages (0 = context, not learned).
- Replies. Preference and unpaired trainers take ONE assistant message per reply: several plain assistant messages
  are joined with a blank line ("\\n\\n"); a reply that holds tool results or several tool-calling turns cannot be
  one message and is dropped with the reason REPLY_SPANS_TURNS.
- A pair whose chosen and rejected replies are the same text is dropped with the reason IDENTICAL_REPLIES.
"""

from __future__ import annotations

import json
import math
from typing import Any

from data.chatml import SPECIAL_TEXT, assistant_body

ZWSP = "\u200b"
REPLY_SPANS_TURNS = "reply spans several turns (tool results or tool calls between messages)"
IDENTICAL_REPLIES = "chosen equals rejected"
ROLES = ("system", "user", "assistant", "tool")
MAX_DEPTH = 64  # nesting of tool arguments and schemas


class RecordError(ValueError):
    """A malformed record; the message says what is wrong (the caller adds file and line)."""


# ------------------------------------------------------------------------------------------ special-token text
def escape_special_text(text: str) -> str:
    """'<|im_start|>' -> '<|\\u200bim_start|>' for every control-token-shaped `<|name|>`; other text unchanged."""
    if "<|" not in text:
        return text
    return SPECIAL_TEXT.sub(lambda m: "<|" + ZWSP + m.group()[2:], text)


def escape_strings(obj: Any) -> Any:
    """`obj` with escape_special_text applied to every string inside it (values, not keys). Returns `obj` itself
    when nothing changes, so clean records are neither copied nor rebuilt."""
    return _escape(obj) if _has_special_text(obj) else obj


def _has_special_text(obj: Any) -> bool:
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if "<|" in x and SPECIAL_TEXT.search(x):
                return True
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return False


def _escape(obj: Any) -> Any:
    if isinstance(obj, str):
        return escape_special_text(obj)
    if isinstance(obj, list):
        return [_escape(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _escape(v) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------- messages from exports
def _type(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def normalize_tool_call(call: Any, where: str) -> dict:
    """{"type": "function", "function": {"name": str, "arguments": object}} from OpenAI / TRL / Qwen shapes."""
    if not isinstance(call, dict):
        raise RecordError(f"{where} must be an object, got {_type(call)}")
    fn = call.get("function", call)
    if not isinstance(fn, dict):
        raise RecordError(f"{where}.function must be an object, got {_type(fn)}")
    name, args = fn.get("name"), fn.get("arguments", fn.get("args", {}))
    if not isinstance(name, str) or not name:
        raise RecordError(f"{where} needs a function name (string), got {_type(name)}")
    if isinstance(args, str):  # OpenAI sends a JSON string; Qwen2.5's template expects the object
        try:
            parsed = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            parsed = None
        args = parsed if isinstance(parsed, dict) else args
    if not isinstance(args, (dict, str)):
        raise RecordError(f"{where}.arguments must be an object or a JSON string, got {_type(args)}")
    _plain_json(args, f"{where}.arguments")
    return {"type": "function", "function": {"name": escape_special_text(name), "arguments": escape_strings(args)}}


def _plain_json(obj: Any, where: str) -> None:
    """RecordError unless `obj` is JSON that every writer and renderer can take: no NaN / Infinity (not JSON), and
    nested at most MAX_DEPTH deep (deeper values would hit recursion limits further on)."""
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RecordError(f"{where} is nested deeper than {MAX_DEPTH} levels")
        if isinstance(x, float) and not math.isfinite(x):
            raise RecordError(f"{where} holds NaN or Infinity, which is not JSON")
        if isinstance(x, dict):
            stack += [(v, depth + 1) for v in x.values()]
        elif isinstance(x, list):
            stack += [(v, depth + 1) for v in x]


def normalize_message(m: Any, where: str, roles: tuple[str, ...] = ROLES) -> dict:
    """A canonical, escaped message from an export's message object; RecordError names what is wrong."""
    if not isinstance(m, dict):
        raise RecordError(f"{where} must be a message object, got {_type(m)}")
    role, content, calls = m.get("role"), m.get("content"), m.get("tool_calls")
    if role not in roles:
        raise RecordError(f"{where}.role must be one of {'/'.join(roles)}, got {role!r:.40}")
    if calls is not None and not isinstance(calls, list):
        raise RecordError(f"{where}.tool_calls must be a list, got {_type(calls)}")
    if calls and role != "assistant":
        raise RecordError(f"{where} has tool_calls but role {role!r} (only assistant messages call tools)")
    if content is None and calls:
        content = ""
    if not isinstance(content, str):
        raise RecordError(f"{where}.content must be a string, got {_type(content)}")
    out = {"role": role, "content": escape_special_text(content)}
    if calls:
        out["tool_calls"] = [normalize_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    if role == "assistant" and "weight" in m:
        if m["weight"] not in (0, 1) or not isinstance(m["weight"], int):
            raise RecordError(f"{where}.weight must be 0 or 1, got {m['weight']!r:.20}")
        out["weight"] = int(m["weight"])
    return out


def normalize_messages(value: Any, where: str, roles: tuple[str, ...] = ROLES) -> list[dict]:
    """A non-empty list of canonical messages."""
    if not isinstance(value, list) or not value:
        raise RecordError(f"field {where!r} must be a non-empty list of messages, got {_type(value)}"
                          + (" (empty)" if isinstance(value, list) else ""))
    return [normalize_message(m, f"{where}[{i}]", roles) for i, m in enumerate(value)]


def normalize_tools(value: Any) -> list[dict]:
    """A record's tool schemas: a list of objects (rendered with tojson into the system turn)."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RecordError(f"field 'tools' must be a list of tool schema objects, got {_type(value)}")
    _plain_json(value, "field 'tools'")
    return escape_strings(value)


# -------------------------------------------------------------------------------------------------- replies
def join_reply(msgs: list[dict]) -> tuple[dict | None, str | None]:
    """(one assistant message, None) for a reply given as a message list, or (None, REPLY_SPANS_TURNS).

    Several plain assistant messages are joined with "\\n\\n"; one tool-calling message may come last (its content
    is joined with the text before it)."""
    if len(msgs) == 1 and msgs[0].get("role") == "assistant":
        return msgs[0], None
    if any(m.get("role") != "assistant" for m in msgs) or any(m.get("tool_calls") for m in msgs[:-1]):
        return None, REPLY_SPANS_TURNS
    text = "\n\n".join(m["content"] for m in msgs if m["content"])
    joined = {**msgs[-1], "content": text}
    weights = {m.get("weight", 1) for m in msgs}
    if len(weights) > 1:
        return None, REPLY_SPANS_TURNS  # part learned, part context: not one message
    return joined, None


def replies_identical(chosen: dict, rejected: dict) -> bool:
    """True when the two replies render to the same text (content and tool calls)."""
    return assistant_body(chosen) == assistant_body(rejected)
