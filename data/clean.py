"""Cleaning imported feedback: normalisation, CELLM's translated-data rules, decontamination, PII scrub, dedupe.

Pure functions on strings first, then `clean_records`, which applies them to the canonical records of one output
(sft / pairs / unpaired) and says which record was dropped for what reason.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tqdm import tqdm

from data.chatml import assistant_body
from data.dedupe import (  # noqa: F401  (re-exported: tests and callers import them from here)
    exact_duplicate_of,
    lsh_params,
    minhash,
    near_duplicate_of,
    normalize_key,
    shingle_hashes,
)

_PROGRESS_MIN = 5000  # records; below this a progress bar is noise

# ----------------------------------------------------------------------------------------------- normalisation
def tidy_text(text: str) -> str:
    """Lossless tidy-up for written text: NFC, CRLF -> LF, no trailing spaces, at most one blank line, stripped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\u3000]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ------------------------------------------------------------------------------- CELLM translated-data rules
# CELLM (Traditional Chinese data translated by an LLM) found outputs that start with the translator's own
# framing, are cut off, or are broken JSON; these rules strip the framing and drop the broken outputs.
_PREFIX = re.compile(
    r"^\s*(?:(?:sure|okay|ok|certainly)[,!.]?\s*)?"
    r"(?:here(?:'s| is) (?:the|my|your) translat(?:ion|ed text)(?: in [\w ]+?)?\s*[:：]"
    r"|translat(?:ion|ed text)\s*[:：]"
    r"|(?:以下是|這是|这是)?(?:翻译|翻譯|译文|譯文)(?:结果|結果)?(?:如下)?\s*[:：])\s*",
    re.IGNORECASE)


def strip_translation_prefix(text: str) -> str:
    """'Translation: x', '翻译：x', '譯文：x', 'Here is the translation: x' -> 'x'; other text unchanged."""
    return _PREFIX.sub("", text, count=1)


_CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)
_NOT_BRACKETS = re.compile(r"[:;]-?[()\[\]DPp]|(?m:^\s*(?:\d{1,3}|[A-Za-z])\))")  # emoticons, "1)" list markers
_PAIRS = ["()", "[]", "{}", "（）", "【】", "「」", "『』", "《》", "“”"]
_RULE = re.compile(r"(?:-{3,}|_{3,}|\*{3,}|={3,})$")  # a markdown horizontal rule
_CONTINUES = tuple(",，、:：;；-–—([{（【「『《“")


def incomplete_reason(text: str) -> str | None:
    """Why a reply looks cut off, or None. A reply that just ends without a full stop is NOT flagged: short answers
    ("7"), lists and code often do; only endings that cannot finish a sentence count as truncation."""
    if not text.strip():
        return "empty reply"
    if text.count("```") % 2:
        return "unclosed code block"
    prose = _NOT_BRACKETS.sub("", _CODE.sub("", text))
    if prose.count('"') % 2 or any(prose.count(o) != prose.count(c) for o, c in _PAIRS):
        return "unbalanced brackets or quotes"
    ending = _RULE.sub("", _NOT_BRACKETS.sub("", text).rstrip())  # ":-(" or a closing "-----" ends a reply fine
    if ending.rstrip().endswith(_CONTINUES):
        return "truncated sentence"
    return None


_JSON_FENCE = re.compile(r"```json[ \t]*\n(.*?)```", re.S | re.IGNORECASE)


def json_problem(prompt_text: str, reply: str) -> str | None:
    """'malformed JSON' when the reply claims JSON and does not parse: a ```json block, or a reply starting with
    { or [ to a prompt that asks for JSON."""
    blocks = _JSON_FENCE.findall(reply)
    if not blocks and re.search(r"\bjson\b", prompt_text, re.IGNORECASE) and reply.lstrip()[:1] in ("{", "["):
        blocks = [reply]
    for block in blocks:
        try:
            json.loads(block)
        except json.JSONDecodeError:
            return "malformed JSON"
    return None


# --------------------------------------------------------------------------------------------------- PII scrub
EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
PHONE = re.compile(
    r"(?<![A-Za-z0-9+])(?:"  # ASCII-only guard: a number right after a Chinese character still counts
    r"(?:\+?886[-\s]?|0)9\d{2}[-\s]?\d{3}[-\s]?\d{3}"          # Taiwan mobile 0912-345-678, +886 912 345 678
    r"|(?:\+?86[-\s]?)?1[3-9]\d[-\s]?\d{4}[-\s]?\d{4}"          # mainland China mobile 138 1234 5678
    r"|\(0\d{1,2}\)\s?\d{3,4}-?\d{4}|0\d{1,2}-\d{3,4}-\d{4}"    # Taiwan landline (02) 2345-6789, 02-2345-6789
    r"|(?:\+1[-\s.]?)?\(?\d{3}\)?[-\s.]\d{3}[-\s.]\d{4}"         # North America (555) 123-4567
    r"|\+\d{1,3}[-\s]?\d(?:[-\s]?\d){6,12}"                      # other international numbers
    r")(?!\d)")


def scrub_pii(text: str) -> str:
    """Replace e-mail addresses with <EMAIL> and phone numbers with <PHONE>."""
    return PHONE.sub("<PHONE>", EMAIL.sub("<EMAIL>", text))


# -------------------------------------------------------------------------------------------- decontamination
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def ngram_tokens(text: str) -> list[str]:
    """Decontamination tokens: one per CJK character (no word segmentation needed), one per Latin word."""
    return _TOKEN.findall(normalize_key(text))


def _gram_hashes(text: str, n: int) -> Iterator[int]:
    """Hashes of the token n-grams of `text`, streamed (a 3-million-character text needs no token list)."""
    # Python's hash of a tuple: fast, and stable within the one process that builds and queries the set
    window: deque[str] = deque(maxlen=n)
    for m in _TOKEN.finditer(normalize_key(text)):
        window.append(m.group())
        if len(window) == n:
            yield hash(tuple(window))


def ngram_set(text: str, n: int) -> set[int]:
    return set(_gram_hashes(text, n))


class Decontaminator:
    """Drops training text sharing any n-gram (13 by default, Qwen report sec. 2.1) with the evaluation texts."""

    def __init__(self, eval_texts: Iterable[str], n: int = 13):
        self.n, self.grams, self.too_short = n, set(), 0
        for text in eval_texts:
            grams = ngram_set(text, n)
            self.too_short += not grams  # shorter than n tokens: cannot be checked this way; reported
            self.grams |= grams

    def contaminated(self, text: str) -> bool:
        grams = self.grams
        return any(h in grams for h in _gram_hashes(text, self.n))


def strings_in(obj) -> Iterator[str]:
    """Every string value inside a JSON value (an eval record's question, choices, answer ...), in order."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            stack.extend(reversed(list(x.values())))
        elif isinstance(x, list):
            stack.extend(reversed(x))


def map_strings(obj, fn):
    """`obj` with `fn` applied to every string inside it (tool-call arguments)."""
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_strings(v, fn) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------- records pipeline
@dataclass
class CleanConfig:
    dedupe: bool = True
    """Drop exact duplicates (after normalize_key) and near duplicates."""
    near_dup_threshold: float = 0.9
    """MinHash Jaccard at or above which a record is a near duplicate of an earlier one (> 1 disables)."""
    decontaminator: Decontaminator | None = None
    """Drop records sharing an n-gram with these evaluation texts."""
    scrub_pii: bool = False
    """Replace e-mail addresses and phone numbers with placeholders."""


def _replies(kind: str, rec: dict) -> list[tuple[dict, bool]]:
    """(assistant message, is_positive) for the replies a record trains on; positives get the strict rules."""
    if kind == "pairs":
        return [(m, True) for m in rec["chosen"]] + [(m, False) for m in rec["rejected"]]
    if kind == "unpaired":
        return [(m, bool(rec["label"])) for m in rec["completion"] if m["role"] == "assistant"]
    return [(m, True) for m in rec["messages"] if m["role"] == "assistant" and m.get("weight", 1) != 0]


def _messages_of(kind: str, rec: dict) -> list[dict]:
    keys = {"pairs": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion"), "sft": ("messages",)}
    return [m for key in keys[kind] for m in rec[key]]


def _text(m: dict) -> str:
    """What a message renders to: the content, and an assistant message's tool calls."""
    return assistant_body(m) if m["role"] == "assistant" else m["content"]


def _fields(kind: str, rec: dict) -> list[str]:
    """Text fields compared for near duplicates; the unpaired label is part of the completion field, the tool
    schemas part of the prompt."""
    join = lambda msgs: "\n".join(f"{m['role']}: {_text(m)}" for m in msgs)  # noqa: E731
    tools = "\n" + json.dumps(rec["tools"], ensure_ascii=False) if rec.get("tools") else ""
    if kind == "pairs":
        return [join(rec["prompt"]) + tools, join(rec["chosen"]), join(rec["rejected"])]
    if kind == "unpaired":
        return [join(rec["prompt"]) + tools, join(rec["completion"]) + f"\nlabel: {rec['label']}"]
    return [join(rec["messages"]) + tools]


def rule_problem(kind: str, rec: dict, cfg: CleanConfig) -> str | None:
    """Why one (already tidied) record is dropped by the CELLM rules or decontamination, or None."""
    prompt_text = "\n".join(m["content"] for m in rec.get("prompt", rec.get("messages", [])[:-1]))
    for msg, positive in _replies(kind, rec):
        text = msg["content"]
        if msg.get("tool_calls") and not text.strip():
            continue  # a tool call with no text is a complete reply
        # incomplete or broken replies are bad targets; as rejected / thumbs-down they are honest negatives
        reason = incomplete_reason(text) if positive else ("empty reply" if not text.strip() else None)
        reason = reason or (json_problem(prompt_text, text) if positive else None)
        if reason:
            return reason
    if cfg.decontaminator and any(cfg.decontaminator.contaminated(_text(m)) for m in _messages_of(kind, rec)):
        return f"contaminated ({cfg.decontaminator.n}-gram overlap with eval data)"
    return None


def _scrub(m: dict) -> None:
    m["content"] = scrub_pii(m["content"])
    for call in m.get("tool_calls", ()):
        call["function"]["arguments"] = map_strings(call["function"]["arguments"], scrub_pii)


def clean_records(kind: str, records: list[dict], cfg: CleanConfig) -> tuple[list[tuple[int, dict]],
                                                                             list[tuple[int, str]]]:
    """Clean the records of one output kind ("sft" | "pairs" | "unpaired").

    Returns (kept [(index, cleaned record)], dropped [(index, reason)]), indices into `records`.
    Order: tidy + strip translation prefixes -> rules -> decontamination -> PII scrub -> exact -> near dedupe.
    """
    kept, dropped = [], []
    bar = tqdm(records, desc=f"clean {kind}", disable=len(records) < _PROGRESS_MIN, file=sys.stderr)
    for i, rec in enumerate(bar):
        rec = json.loads(json.dumps(rec))  # deep copy: never edit the caller's records
        for m in _messages_of(kind, rec):
            m["content"] = tidy_text(m["content"])
            if m["role"] == "assistant":
                m["content"] = strip_translation_prefix(m["content"])
        reason = rule_problem(kind, rec, cfg)
        if reason:
            dropped.append((i, reason))
            continue
        if cfg.scrub_pii:
            for m in _messages_of(kind, rec):
                _scrub(m)
        kept.append((i, rec))
    if not cfg.dedupe:
        return kept, dropped
    keys = [normalize_key(json.dumps(rec, ensure_ascii=False, sort_keys=True)) for _, rec in kept]
    exact = exact_duplicate_of(keys)
    dropped += [(kept[j][0], "duplicate") for j, d in enumerate(exact) if d is not None]
    kept = [kr for kr, d in zip(kept, exact) if d is None]
    if cfg.near_dup_threshold <= 1:
        near = near_duplicate_of([_fields(kind, rec) for _, rec in kept], cfg.near_dup_threshold)
        dropped += [(kept[j][0], "near-duplicate") for j, d in enumerate(near) if d is not None]
        kept = [kr for kr, d in zip(kept, near) if d is None]
    return kept, dropped
