"""What every feedback-format parser shares: the Parsed result, typed field access, messages, ratings, trees.

Parsers never trust a field's type: every value is checked before use, and any unexpected shape raises RecordError,
which the parser turns into a malformed record (file:line or file[i], and the record's id). Nothing but a bug in our
code can raise out of a parser; tests/test_feedback_fuzz.py feeds them wrong types in every field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from data.validate import RecordError, normalize_messages, normalize_tools

Row = tuple[str, Any]  # (where, obj): where is "file:line" or "file[i]"
__all__ = ["RecordError", "Parsed", "Row"]


@dataclass
class Parsed:
    """One input record's outcome: its pairs and singles, the reasons a valid record yields nothing (ties, ...), or
    the error that makes it malformed. `key` is the reader's where (unique in a run); each row's `*_uses` lists the
    keys of OTHER records it was built from (a tree's context messages, the sibling's feedback), for the report."""
    where: str
    pairs: list[dict] = field(default_factory=list)
    singles: list[dict] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    error: str | None = None
    key: str = ""
    pair_uses: list[tuple[str, ...]] = field(default_factory=list)
    single_uses: list[tuple[str, ...]] = field(default_factory=list)

    def __post_init__(self):
        self.key = self.key or self.where

    def add(self, kind: str, rec: dict, uses: tuple[str, ...] = ()) -> None:
        """kind "pair" | "single" | "drop" (then `rec` is the reason)."""
        if kind == "pair":
            self.pairs.append(rec)
            self.pair_uses.append(tuple(uses))
        elif kind == "single":
            self.singles.append(rec)
            self.single_uses.append(tuple(uses))
        else:
            self.dropped.append(rec)

    def fail(self, error: str) -> None:
        """Malformed after all: forget what was collected."""
        self.pairs, self.singles, self.dropped, self.pair_uses, self.single_uses = [], [], [], [], []
        self.error = error


# ------------------------------------------------------------------------------------------- typed field access
def type_name(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def get_str(obj: dict, key: str, name: str | None = None) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise RecordError(f"field {name or key!r} must be a string, got {type_name(value)}")
    return value


def get_dict(obj: dict, key: str, name: str | None = None, required: bool = False) -> dict:
    """obj[key] as a dict; missing or null -> {} unless required."""
    value = obj.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise RecordError(f"field {name or key!r} must be an object, got {type_name(value)}")
    return value


def get_list(obj: dict, key: str, name: str | None = None, required: bool = False) -> list:
    value = obj.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise RecordError(f"field {name or key!r} must be a list, got {type_name(value)}")
    return value


def number(value: Any, name: str) -> float:
    """A finite int or float (not a bool, not NaN / Infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(f"{name} must be a finite number, got {value!r:.40}")
    return value


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def get_tools(obj: dict) -> list[dict] | None:
    """A record's "tools" (TRL's tool-calling format): a list of schema objects, or a JSON string of one."""
    value = obj.get("tools")
    if value is None or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise RecordError("field 'tools' is a string that is not JSON") from None
    return normalize_tools(value)


def with_tools(rec: dict, tools: list[dict] | None) -> dict:
    return {**rec, "tools": tools} if tools else rec


def as_prompt(value: Any, name: str = "prompt") -> list[dict]:
    """A TRL prompt: a string (standard format -> one user turn) or a message list (conversational)."""
    return [msg("user", value)] if isinstance(value, str) else normalize_messages(value, name)


def as_reply(value: Any, name: str) -> list[dict]:
    """A reply: a string, or a message list starting with an assistant message (several messages are joined or
    dropped later by the shared validation, data/validate.py)."""
    if isinstance(value, str):
        return [msg("assistant", value)]
    msgs = normalize_messages(value, name)
    if msgs[0]["role"] != "assistant":
        raise RecordError(f"field {name!r} must start with an assistant message when a prompt is given, got "
                          f"{msgs[0]['role']!r}")
    return msgs


def split_shared_prompt(a: list[dict], b: list[dict]) -> tuple[list[dict], dict, dict] | None:
    """(prompt, last_a, last_b) for two dialogues that share every turn but a final assistant reply, else None.

    Raises RecordError when a dialogue does not end with an assistant reply.
    """
    for name, conv in (("chosen", a), ("rejected", b)):
        if conv[-1]["role"] != "assistant":
            raise RecordError(f"{name} dialogue must end with an assistant reply, ends with {conv[-1]['role']!r}")
    if a[:-1] != b[:-1] or len(a) < 2:
        return None
    return a[:-1], a[-1], b[-1]


def pair(prompt: list[dict], chosen: dict | list[dict], rejected: dict | list[dict]) -> dict:
    wrap = lambda x: x if isinstance(x, list) else [x]  # noqa: E731
    return {"prompt": prompt, "chosen": wrap(chosen), "rejected": wrap(rejected)}


def single(prompt: list[dict], reply: dict | list[dict], label: bool) -> dict:
    return {"prompt": prompt, "completion": reply if isinstance(reply, list) else [reply], "label": label}


# ---------------------------------------------------------------------------------------------------- ratings
_UP = {"1", "+1", "up", "thumbs_up", "thumbsup", "thumbs-up", "good", "positive", "like", "true", "yes", "👍"}
_DOWN = {"-1", "0", "down", "thumbs_down", "thumbsdown", "thumbs-down", "bad", "negative", "dislike", "false", "no",
         "👎"}


def parse_thumb(value: Any) -> bool:
    """Thumbs rating -> bool: +1/-1, 1/0, true/false, "up"/"down", "thumbs_up", "thumbsUp", ... (case-insensitive)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (1, -1, 0):
        return value == 1
    if isinstance(value, str) and value.strip().lower() in _UP | _DOWN:
        return value.strip().lower() in _UP
    raise RecordError(f"rating {value!r:.40} is not a thumbs value (accepted: +1/-1, 1/0, true/false, up/down, "
                      f"thumbs_up/thumbs_down)")


# ------------------------------------------------------------------------------------------------------ trees
def tree_id(value: Any, name: str) -> str | None:
    """A message id or parent id: a string (numbers are taken as their text), or None for a parent."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise RecordError(f"{name} must be a string id, got {type_name(value)}")


def path_to_root(parent_of: dict[str, str | None], leaf: str) -> list[str]:
    """Message ids from the root down to `leaf`; errors name the message where the tree is broken."""
    path, seen, node = [], set(), leaf
    while node is not None:
        if node in seen:
            raise RecordError(f"cycle in the message tree at message {node!r}")
        if node not in parent_of:
            child = f"message {path[-1]!r} has parent {node!r}, which" if path else f"message {node!r}"
            raise RecordError(f"{child} is not in the input")
        seen.add(node)
        path.append(node)
        node = parent_of[node]
    return path[::-1]


def per_record(fn: Callable[[dict], list]) -> Callable[[list[Row]], list[Parsed]]:
    """Lift a one-record parser (dict -> [("pair"|"single"|"drop", value)]) to a rows parser."""
    def parse(rows: list[Row]) -> list[Parsed]:
        out = []
        for where, obj in rows:
            p = Parsed(where)
            try:
                if not isinstance(obj, dict):
                    raise RecordError(f"expected a JSON object, got {type_name(obj)}")
                for kind, value in fn(obj):
                    p.add(kind, value)
            except RecordError as e:
                p.fail(str(e))
            out.append(p)
        return out
    parse.__doc__ = fn.__doc__
    return parse
