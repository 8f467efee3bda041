"""The demo world's checkable reward (`true_reward`): reply in the prompt's language (Simplified vs Traditional
Chinese included), on its topic, with the polite closing, not too long, not repetitive; max 2.5. data/demo/README.md
describes the rule. Kept apart from data/demo.py (the generator, an entry point) so trainers and the evaluation can
import it; `data.demo.true_reward` is the same function.
"""

from __future__ import annotations

import re
from pathlib import Path

from data import demo_world as W

DEMO_DIR = Path(__file__).resolve().parent / "demo"
SEED = 20240917
LANGS = ("zh-Hans", "zh-Hant", "en")
CLOSINGS = {"zh-Hans": "希望有帮助！", "zh-Hant": "希望有幫助！", "en": "Hope this helps!"}
LENGTH_LIMIT = {"zh": 60, "en": 160}  # characters; a normal reply is 20-45 zh / 60-130 en characters
W_LANGUAGE, W_TOPIC, W_CLOSING = 1.0, 1.0, 0.5
MAX_TRUE_REWARD = W_LANGUAGE + W_TOPIC + W_CLOSING

S2T = {W.S2T[i]: W.S2T[i + 1] for i in range(0, len(W.S2T), 2)}
HANS_ONLY = frozenset(S2T) - frozenset(S2T.values())
HANT_ONLY = frozenset(S2T.values()) - frozenset(S2T)
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]|[a-z0-9']+")


def to_hant(text: str) -> str:
    """Simplified -> Traditional, character by character (exact for every sentence of demo_world, see there)."""
    return "".join(S2T.get(ch, ch) for ch in text)


def localize(text: str, lang: str) -> str:
    return to_hant(text) if lang == "zh-Hant" else text


def coarse(lang: str | None) -> str | None:
    return None if lang is None else ("en" if lang == "en" else "zh")


# Topic keywords: (Simplified, Traditional, English word regex) per topic, from demo_world.TOPICS.
TOPIC_KEYS = tuple(t[0] for t in W.TOPICS)
_ZH_KW = tuple((t[1], to_hant(t[1])) for t in W.TOPICS)
_EN_KW = tuple(re.compile(r"\b" + re.escape(t[2]) + r"\b", re.IGNORECASE) for t in W.TOPICS)


# ----------------------------------------------------------------------------------------------- the true reward
def detect_language(text: str) -> str | None:
    """"en", "zh-Hans", "zh-Hant", "zh" (Chinese, script variant not recognisable) or None (no letters at all).

    Chinese if there are at least as many CJK characters as Latin words. The variant is the majority among characters
    whose Simplified and Traditional forms differ (the S2T table of demo_world, e.g. 们/們, 吗/嗎, 帮/幫)."""
    n_cjk, n_words = len(_CJK.findall(text)), len(_LATIN_WORD.findall(text))
    if n_cjk == 0 and n_words == 0:
        return None
    if n_words > n_cjk:
        return "en"
    n_hans, n_hant = sum(ch in HANS_ONLY for ch in text), sum(ch in HANT_ONLY for ch in text)
    return "zh-Hans" if n_hans > n_hant else "zh-Hant" if n_hant > n_hans else "zh"


def find_topic(text: str) -> int | None:
    """Index into demo_world.TOPICS of the topic keyword that occurs first in `text`, or None."""
    best: tuple[int, int] | None = None  # (position, topic index)
    for i, ((hans, hant), en) in enumerate(zip(_ZH_KW, _EN_KW)):
        positions = [text.find(hans), text.find(hant)]
        match = en.search(text)
        positions.append(match.start() if match else -1)
        for pos in positions:
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, i)
    return None if best is None else best[1]


def mentions_topic(text: str, topic: int, lang: str | None) -> bool:
    """Does `text` contain the keyword of `topic` in `lang` (either Chinese script for zh)?"""
    if coarse(lang) == "zh":
        return any(kw in text for kw in _ZH_KW[topic])
    return coarse(lang) == "en" and _EN_KW[topic].search(text) is not None


def repetition(text: str) -> float:
    """1 - distinct/total token 3-grams; 0 for fewer than 3 tokens. Tokens: CJK characters and lower-cased words."""
    tokens = _TOKEN.findall(text.lower())
    grams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def _last_user_text(prompt: list[dict] | str) -> str:
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            return message.get("content") or ""
    raise ValueError(f"true_reward: the prompt has no user message (roles: {[m.get('role') for m in prompt]})")


def reward_parts(prompt: list[dict] | str, response: str) -> dict[str, float]:
    """The terms of `true_reward` (see the module docstring): language, topic, closing, length, repetition, total."""
    user = _last_user_text(prompt)
    lang, topic = detect_language(user), find_topic(user)
    reply_lang = detect_language(response)
    same_script = coarse(lang) == coarse(reply_lang) and lang is not None
    if same_script and coarse(lang) == "zh" and "zh" not in (lang, reply_lang):
        same_script = lang == reply_lang  # both variants recognisable: Simplified for Traditional is off-language
    closings = [CLOSINGS[lang]] if lang in CLOSINGS else [CLOSINGS["zh-Hans"], CLOSINGS["zh-Hant"]] if lang else []
    limit = LENGTH_LIMIT[coarse(lang) or "en"]
    n_chars = len(response.strip())
    parts = {
        "language": W_LANGUAGE * same_script,
        "topic": W_TOPIC * (topic is not None and mentions_topic(response, topic, lang)),
        "closing": W_CLOSING * any(response.rstrip().endswith(c) for c in closings),
        "length": -min(1.0, max(0, n_chars - limit) / limit),
        "repetition": -repetition(response),
    }
    parts["total"] = sum(parts.values())
    return parts


def true_reward(prompt: list[dict] | str, response: str) -> float:
    """The demo world's ground-truth reward of `response` to `prompt` (chat messages or the user text); max 2.5."""
    return reward_parts(prompt, response)["total"]
