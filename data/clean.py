"""Cleaning imported feedback: normalisation, CELLM's translated-data rules, decontamination, PII scrub, dedupe.

Pure functions on strings first, then `clean_records`, which applies them to the canonical records of one output
(sft / pairs / unpaired) and says which record was dropped for what reason.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

_PROGRESS_MIN = 5000  # records; below this a progress bar is noise

# ----------------------------------------------------------------------------------------------- normalisation
_WS = re.compile(r"\s+")


def normalize_key(text: str) -> str:
    """Comparison key: NFKC (full-width -> ASCII forms, compatibility characters), casefold, whitespace collapsed.

    Used for dedupe and decontamination only: written text keeps its full-width Chinese punctuation, which NFKC
    would turn into ASCII ("，" -> ",") and so change the style of Traditional / Simplified Chinese replies.
    """
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


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


def ngram_set(text: str, n: int) -> set[int]:
    # Python's hash of a tuple: fast, and stable within the one process that builds and queries the set
    toks = ngram_tokens(text)
    return {hash(tuple(toks[i:i + n])) for i in range(len(toks) - n + 1)}


class Decontaminator:
    """Drops training text sharing any n-gram (13 by default, Qwen report sec. 2.1) with the evaluation texts."""

    def __init__(self, eval_texts: Iterable[str], n: int = 13):
        self.n, self.grams, self.too_short = n, set(), 0
        for text in eval_texts:
            grams = ngram_set(text, n)
            self.too_short += not grams  # shorter than n tokens: cannot be checked this way; reported
            self.grams |= grams

    def contaminated(self, text: str) -> bool:
        return not self.grams.isdisjoint(ngram_set(text, self.n))


def strings_in(obj) -> Iterable[str]:
    """Every string value inside a JSON value (an eval record's question, choices, answer ...)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from strings_in(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings_in(v)


# ------------------------------------------------------------------------------------ MinHash near-duplicates
_M64 = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads rolling-hash values over all 64 bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingle_hashes(text: str, k: int = 5) -> np.ndarray:
    """Distinct 64-bit hashes of the character k-shingles of `text`  # (S,)

    Characters, not words, so Chinese needs no segmentation; a text shorter than k is one shingle.
    """
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)  # (C,)
    if len(cps) == 0:
        return np.zeros(1, dtype=np.uint64)
    k = min(k, len(cps))
    h = np.zeros(len(cps) - k + 1, dtype=np.uint64)  # (S,)
    for j in range(k):  # polynomial rolling hash, wrapping mod 2^64
        h = h * _M64 + cps[j:j + len(h)]
    return np.unique(_mix64(h))


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd: a bijection mod 2^64
    return a, rng.integers(0, 2**63, num_perm, dtype=np.uint64)


def minhash(text: str, num_perm: int = 128, k: int = 5, seed: int = 0) -> np.ndarray:
    """MinHash signature of the normalised text  # (num_perm,)

    Permutation i is x -> a_i * x + b_i mod 2^64 with odd a_i (a bijection); P(sig_a[i] == sig_b[i]) estimates the
    Jaccard similarity of the two shingle sets (Broder 1997).
    """
    a, b = _permutations(num_perm, seed)  # (num_perm,) each
    h = shingle_hashes(normalize_key(text), k)  # (S,)
    return (a[:, None] * h[None, :] + b[:, None]).min(axis=1)  # (num_perm,)


def lsh_params(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows) for LSH banding: the fewest false candidates among settings that make a record pair with
    Jaccard == threshold a candidate with probability >= recall.

    A pair with Jaccard s shares a bucket in some band with probability 1 - (1 - s^rows)^bands (Leskovec et al.,
    Mining of Massive Datasets, sec. 3.4); candidates are verified on the full signatures, so recall is what matters.
    """
    s = np.linspace(0.0, threshold, 1001)
    best = None
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands < recall:
            continue
        false_mass = np.trapezoid(1 - (1 - s**rows) ** bands, s)
        if best is None or false_mass < best[0]:
            best = (false_mass, bands, rows)
    if best is None:
        raise ValueError(f"no LSH banding of {num_perm} permutations reaches recall {recall} at {threshold}")
    return best[1], best[2]


def near_duplicate_of(fields: list[list[str]], threshold: float = 0.9, num_perm: int = 128,
                      k: int = 5) -> list[int | None]:
    """For each record (a list of text fields), the index of an earlier kept record it nearly duplicates, else None.

    Near duplicate = every field (e.g. prompt, chosen, rejected) has estimated Jaccard >= threshold; so two pairs
    that share a long prompt but differ in their replies are both kept. Candidates come from LSH banding of the
    first field's signature.
    """
    bands, rows = lsh_params(threshold, num_perm)
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    sigs, out = [], []
    for i, rec in enumerate(tqdm(fields, desc="near-duplicates", disable=len(fields) < _PROGRESS_MIN, file=sys.stderr)):
        sig = np.stack([minhash(f, num_perm, k) for f in rec])  # (F, num_perm)
        sigs.append(sig)
        keys = [sig[0, j * rows:(j + 1) * rows].tobytes() for j in range(bands)]
        cands = {c for j, key in enumerate(keys) for c in buckets[j].get(key, ())}
        dup = next((c for c in sorted(cands) if sigs[c].shape == sig.shape
                    and (sigs[c] == sig).mean(axis=1).min() >= threshold), None)
        out.append(dup)
        if dup is None:
            for j, key in enumerate(keys):
                buckets[j].setdefault(key, []).append(i)
    return out


def exact_duplicate_of(keys: list[str]) -> list[int | None]:
    """For each key, the index of its first occurrence if it is a repeat, else None."""
    first: dict[str, int] = {}
    out = []
    for i, key in enumerate(keys):
        out.append(first.get(key))
        first.setdefault(key, i)
    return out


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
        return [(m, bool(rec["label"])) for m in rec["completion"]]
    return [(rec["messages"][-1], True)]


def _messages_of(kind: str, rec: dict) -> list[dict]:
    keys = {"pairs": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion"), "sft": ("messages",)}
    return [m for key in keys[kind] for m in rec[key]]


def _fields(kind: str, rec: dict) -> list[str]:
    """Text fields compared for near duplicates; the unpaired label is part of the completion field."""
    join = lambda msgs: "\n".join(f"{m['role']}: {m['content']}" for m in msgs)  # noqa: E731
    if kind == "pairs":
        return [join(rec["prompt"]), join(rec["chosen"]), join(rec["rejected"])]
    if kind == "unpaired":
        return [join(rec["prompt"]), join(rec["completion"]) + f"\nlabel: {rec['label']}"]
    return [join(rec["messages"])]


def rule_problem(kind: str, rec: dict, cfg: CleanConfig) -> str | None:
    """Why one (already tidied) record is dropped by the CELLM rules or decontamination, or None."""
    prompt_text = "\n".join(m["content"] for m in rec.get("prompt", rec.get("messages", [])[:-1]))
    for msg, positive in _replies(kind, rec):
        # incomplete or broken replies are bad targets; as rejected / thumbs-down they are honest negatives
        reason = incomplete_reason(msg["content"]) if positive else (
            "empty reply" if not msg["content"].strip() else None)
        reason = reason or (json_problem(prompt_text, msg["content"]) if positive else None)
        if reason:
            return reason
    if cfg.decontaminator and any(cfg.decontaminator.contaminated(m["content"]) for m in _messages_of(kind, rec)):
        return f"contaminated ({cfg.decontaminator.n}-gram overlap with eval data)"
    return None


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
                m["content"] = scrub_pii(m["content"])
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
