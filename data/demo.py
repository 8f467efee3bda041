"""Embedded demo data: a tiny bilingual assistant world whose preferences follow a rule that code can check.

The whole recipe (pretraining text -> SFT -> reward model PMP -> reward finetune -> PPO -> DPO) must run on 2 CPU
cores in minutes AND show whether alignment worked. Real preference data cannot tell us that; here every label comes
from `true_reward`, a cheap deterministic rule, so each stage is measured by the mean true reward of its generations
(policy) or by its accuracy on clean comparisons (reward model).

True reward of a reply, given the prompt's language and topic (both read from the prompt's LAST user message):
  +1.0  language   the reply is in the prompt's language: CJK vs Latin script; for Chinese, Simplified vs Traditional
                   must not contradict each other when both are recognisable (see `detect_language`)
  +1.0  topic      the reply contains the prompt's topic keyword in the prompt's language (天气/天氣 for zh, weather)
  +0.5  closing    the reply ends with the prompt language's closing: 希望有帮助！ | 希望有幫助！ | Hope this helps!
  -len  length     min(1, (chars - limit) / limit) for a reply longer than limit = 60 chars (zh prompt), 160 (en)
  -rep  repetition 1 - distinct / total over the reply's token 3-grams (token = one CJK character or one Latin word)
A perfect reply scores 2.5. A prompt with no recognisable topic gives no topic credit.

Data (Qwen report sec. 3: SFT, then a reward model pretrained on large noisy public comparisons (PMP) and finetuned on
clean in-domain ones, then PPO with pretraining-text mixing, here also DPO): the SFT replies are deliberately imperfect
(about a third earn the closing bonus, some are off-language or off-topic), so PPO/DPO have room to raise the mean.
PMP pairs are many, 25% label-flipped and from a shifted distribution (other phrasing, mostly en/Simplified, no
Simplified-for-Traditional mistakes), so a PMP reward model is above chance in-domain and finetuning beats it.
Thumbs ratings (KTO) are single SFT-style replies rated up or down by a noisy rater of the true reward, with more
ups than downs, in the format `python -m data.feedback` writes (unpaired.jsonl).

    python -m data.demo --out data/demo     # regenerate the shipped files (deterministic, byte for byte)
    python -m data.demo --check             # regenerate into a temp dir, compare with data/demo, exit 1 on a difference
    python -m data.demo --stats             # counts and mean true reward per file
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write_bytes
from data import demo_openwebui as owui
from data import demo_world as W
from data.demo_reward import (  # noqa: F401  (true_reward: data.demo.true_reward stays the documented name)
    CLOSINGS, DEMO_DIR, LANGS, LENGTH_LIMIT, MAX_TRUE_REWARD, SEED, TOPIC_KEYS, W_CLOSING, W_LANGUAGE, W_TOPIC, coarse,
    detect_language, find_topic, localize, repetition, reward_parts, true_reward)
from data.io import read_rows


# ------------------------------------------------------------------------------------------ sampling the world
@dataclass(frozen=True)
class ReplyStyle:
    """How often a simulated assistant makes each kind of mistake (probabilities per reply)."""

    off_language: float  # answers in the other language (zh <-> en)
    off_variant: float  # answers a Traditional prompt in Simplified Chinese (the Taiwan-LLM complaint)
    off_topic: float  # talks about another topic
    closing: float  # ends with the closing of its own language
    wrong_closing: float  # ends with another language's closing
    signoff: float  # ends with some other sign-off
    long: float  # pads the reply with filler sentences (length penalty)
    repeat: float  # repeats its fact (repetition penalty)
    junk: float = 0.0  # a content-free reply ("I don't know.")
    pmp: bool = False  # use the shifted PMP reply phrasing


SFT_STYLE = ReplyStyle(0.07, 0.15, 0.08, 0.35, 0.05, 0.25, 0.07, 0.05)
GOOD_STYLE = ReplyStyle(0.0, 0.0, 0.0, 0.5, 0.0, 0.3, 0.0, 0.0)  # earlier turns of multi-turn prompts
RM_STYLE = ReplyStyle(0.15, 0.25, 0.15, 0.45, 0.08, 0.25, 0.15, 0.12)
PMP_STYLE = ReplyStyle(0.25, 0.0, 0.25, 0.4, 0.0, 0.25, 0.2, 0.15, junk=0.1, pmp=True)
IN_DOMAIN_LANGS = {"zh-Hans": 0.45, "zh-Hant": 0.22, "en": 0.33}  # zh:en about 2:1 (CT-LLM's SFT mix)
PMP_LANGS = {"zh-Hans": 0.45, "zh-Hant": 0.05, "en": 0.50}
P_SYSTEM, P_MULTI_TURN = 0.15, 0.15
PMP_FLIP = 0.25  # fraction of PMP labels flipped (noisy public comparisons)
RM_MARGIN, PMP_MARGIN = 0.5, 0.25  # minimum true-reward gap of a kept pair
RATER_THRESHOLD, RATER_TEMPERATURE = 2.0, 0.25  # thumbs up with probability sigmoid((reward - 2) / 0.25)
DOWN_KEPT = 0.5  # raters leave a thumbs-down half as often as they feel one (they regenerate instead)


def pick_lang(rng: random.Random, weights: dict[str, float]) -> str:
    r, acc = rng.random(), 0.0
    for lang in LANGS:
        acc += weights[lang]
        if r < acc:
            return lang
    return LANGS[-1]


def is_heldout(user_text: str) -> bool:
    """A fixed 10% of distinct user texts are held out (prompts_heldout, rm_test); crc32 is platform-independent."""
    return zlib.crc32(user_text.encode("utf-8")) % 10 == 0


def user_text(rng: random.Random, lang: str, topic: int, pmp: bool = False) -> str:
    if lang == "en":
        template = rng.choice(W.EN_PMP_PROMPTS if pmp else W.EN_PROMPTS)
        return template.format(kw=W.TOPICS[topic][2], aspect=rng.choice(W.EN_PMP_ASPECTS if pmp else W.EN_ASPECTS))
    template = rng.choice(W.ZH_PMP_PROMPTS if pmp else W.ZH_PROMPTS)
    return localize(template.format(kw=W.TOPICS[topic][1], aspect=rng.choice(W.ZH_ASPECTS)), lang)


def sample_prompt(rng: random.Random, lang: str, split: str, pmp: bool = False) -> tuple[list[dict], int]:
    """(messages ending with a user turn, topic index). split "train" or "heldout" picks the user-text partition."""
    while True:
        topic = rng.randrange(len(W.TOPICS))
        text = user_text(rng, lang, topic, pmp)
        if pmp or is_heldout(text) == (split == "heldout"):
            break
    if find_topic(text) != topic or detect_language(text) != lang:
        raise AssertionError(f"demo world: prompt {text!r} is not recognised as {lang}/{TOPIC_KEYS[topic]}")
    messages = []
    if not pmp and rng.random() < P_SYSTEM:
        system = W.SYSTEM_PROMPTS["en" if lang == "en" or rng.random() < 0.5 else "zh-Hans"]
        messages.append({"role": "system", "content": localize(system, lang)})
    if not pmp and rng.random() < P_MULTI_TURN:
        earlier = (topic + rng.randrange(1, len(W.TOPICS))) % len(W.TOPICS)
        messages.append({"role": "user", "content": user_text(rng, lang, earlier)})
        messages.append({"role": "assistant", "content": make_reply(rng, lang, earlier, GOOD_STYLE)})
    messages.append({"role": "user", "content": text})
    return messages, topic


def _join(lang: str, parts: list[str]) -> str:
    return (" " if lang == "en" else "").join(p for p in parts if p)


def make_reply(rng: random.Random, prompt_lang: str, topic: int, style: ReplyStyle) -> str:
    """One simulated assistant reply; its mistakes are drawn from `style`."""
    lang = prompt_lang
    if rng.random() < style.off_language:
        lang = rng.choice(("zh-Hans", "zh-Hans", "zh-Hant")) if lang == "en" else "en"
    elif lang == "zh-Hant" and rng.random() < style.off_variant:
        lang = "zh-Hans"
    if rng.random() < style.off_topic:
        topic = (topic + rng.randrange(1, len(W.TOPICS))) % len(W.TOPICS)
    key, zh_kw, en_kw, zh_facts, en_facts = W.TOPICS[topic]
    en = lang == "en"
    if rng.random() < style.junk:
        parts = [rng.choice(W.EN_JUNK if en else W.ZH_JUNK)]
    else:
        templates = (W.EN_PMP_REPLIES if style.pmp else W.EN_REPLIES) if en else (
            W.ZH_PMP_REPLIES if style.pmp else W.ZH_REPLIES)
        fact = rng.choice(en_facts if en else zh_facts)
        parts = [rng.choice(templates).format(kw=en_kw if en else zh_kw, fact=fact)]
        if rng.random() < style.repeat:
            parts += [fact] * rng.randint(1, 2)
        if rng.random() < style.long:
            parts += rng.sample(W.EN_FILLERS if en else W.ZH_FILLERS, rng.randint(2, 3))
    body = localize(_join(lang, parts), lang)
    r = rng.random()
    if r < style.closing:
        ending = CLOSINGS[lang]
    elif r < style.closing + style.wrong_closing:
        ending = rng.choice([c for other, c in CLOSINGS.items() if other != lang])
    elif r < style.closing + style.wrong_closing + style.signoff:
        ending = localize(rng.choice(W.EN_SIGNOFFS if en else W.ZH_SIGNOFFS), lang)
    else:
        ending = ""
    return _join(lang, [body, ending])


def sample_pair(rng: random.Random, style: ReplyStyle, langs: dict, split: str, margin: float) -> dict:
    """A TRL conversational preference record whose chosen reply beats the rejected one by >= margin true reward."""
    while True:
        lang = pick_lang(rng, langs)
        prompt, topic = sample_prompt(rng, lang, split, pmp=style.pmp)
        a, b = make_reply(rng, lang, topic, style), make_reply(rng, lang, topic, style)
        ra, rb = true_reward(prompt, a), true_reward(prompt, b)
        if abs(ra - rb) >= margin:
            chosen, rejected = (a, b) if ra > rb else (b, a)
            return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]}


# ------------------------------------------------------------------------------------------------ the files
def build_sft(n: int, rng: random.Random) -> list[dict]:
    records = []
    for _ in range(n):
        lang = pick_lang(rng, IN_DOMAIN_LANGS)
        prompt, topic = sample_prompt(rng, lang, "train")
        reply = make_reply(rng, lang, topic, SFT_STYLE)
        records.append({"messages": prompt + [{"role": "assistant", "content": reply}]})
    return records


def build_prompts(n: int, rng: random.Random, split: str) -> list[dict]:
    records, seen = [], set()
    while len(records) < n:
        prompt, _ = sample_prompt(rng, pick_lang(rng, IN_DOMAIN_LANGS), split)
        key = json.dumps(prompt, ensure_ascii=False, sort_keys=True)
        if key not in seen:
            seen.add(key)
            records.append({"prompt": prompt})
    return records


def build_pairs(n: int, rng: random.Random, style: ReplyStyle, langs: dict, split: str, margin: float,
                flip: float = 0.0) -> list[dict]:
    """Preference records; with `flip` > 0 that fraction of labels is swapped (label noise of public PMP data)."""
    records = [sample_pair(rng, style, langs, split, margin) for _ in range(n)]
    for i in sorted(rng.sample(range(n), round(flip * n))):  # exactly round(flip * n) flipped, not about
        records[i]["chosen"], records[i]["rejected"] = records[i]["rejected"], records[i]["chosen"]
    return records


def rater_up_probability(reward: float) -> float:
    """The simulated rater's chance of a thumbs-up: a logistic curve around RATER_THRESHOLD. A reply in the right
    language and on topic but without the closing (2.0) is a coin flip, with it (2.5) 88% up; off-language or
    off-topic replies (<= 1.5) are up at most 12% of the time."""
    return 1.0 / (1.0 + math.exp(-(reward - RATER_THRESHOLD) / RATER_TEMPERATURE))


def build_ratings(n: int, rng: random.Random) -> list[dict]:
    """Thumbs up/down on single SFT-style replies to training prompts, in data.feedback's unpaired.jsonl format
    {"prompt": [msgs], "completion": [assistant msg], "label": bool}: a noisy rater (rater_up_probability), and only
    DOWN_KEPT of the thumbs-downs are given, so ups outnumber downs about 2:1 (class imbalance for KTO's weights)."""
    records = []
    while len(records) < n:
        lang = pick_lang(rng, IN_DOMAIN_LANGS)
        prompt, topic = sample_prompt(rng, lang, "train")
        reply = make_reply(rng, lang, topic, SFT_STYLE)
        up = rng.random() < rater_up_probability(true_reward(prompt, reply))
        if up or rng.random() < DOWN_KEPT:
            records.append({"prompt": prompt, "completion": [{"role": "assistant", "content": reply}], "label": up})
    return records


def make_doc(rng: random.Random, lang: str) -> str:
    """One pretraining document: sentences about one or two topics, sometimes a question/answer exchange."""
    en = lang == "en"
    if rng.random() < 0.15:
        prompt, topic = sample_prompt(rng, lang, "train")
        q, a = prompt[-1]["content"], make_reply(rng, lang, topic, SFT_STYLE)
        return f"Q: {q}\nA: {a}" if en else localize(f"问：{q}\n答：{a}", lang)
    sentences = []
    for topic in rng.sample(range(len(W.TOPICS)), rng.randint(1, 2)):
        _, zh_kw, en_kw, zh_facts, en_facts = W.TOPICS[topic]
        sentences.append(rng.choice(W.EN_GENERIC if en else W.ZH_GENERIC).format(kw=en_kw if en else zh_kw))
        sentences += rng.sample(en_facts if en else zh_facts, rng.randint(1, 3))
    if rng.random() < 0.3:
        sentences.append(rng.choice(W.EN_FILLERS if en else W.ZH_FILLERS))
    return localize(_join(lang, sentences), lang)


def build_text(n: int, rng: random.Random, exclude: frozenset[str] = frozenset()) -> list[dict]:
    records, seen = [], set(exclude)
    while len(records) < n:
        doc = make_doc(rng, pick_lang(rng, IN_DOMAIN_LANGS))
        if doc not in seen:
            seen.add(doc)
            records.append({"text": doc})
    return records


# ------------------------------------------------------------------------------- Open WebUI feedback export
def build_feedback(n_arena: int, n_single: int, rng: random.Random) -> list[dict]:
    """Arena chats: two replies differing by >= RM_MARGIN true reward, the better rated +1 and the worse -1.
    Single-reply chats: +1 if the reply's true reward >= 2.0, -1 if <= 1.0 (others are not rated)."""
    feedbacks = []
    for index in range(n_arena + n_single):
        if index < n_arena:
            record = sample_pair(rng, RM_STYLE, IN_DOMAIN_LANGS, "train", RM_MARGIN)
            good, bad = record["chosen"][0]["content"], record["rejected"][0]["content"]
            models = tuple(rng.sample(owui.MODELS, 2))
            chat = owui.chat_object(rng, index, record["prompt"], [(models[0], good), (models[1], bad)])
            ids = list(chat["history"]["messages"])[-2:]  # [good, bad], in insertion order
            order = [(ids[0], 1), (ids[1], -1)] if rng.random() < 0.5 else [(ids[1], -1), (ids[0], 1)]
            feedbacks += [owui.feedback_record(rng, chat, mid, rating, models) for mid, rating in order]
            continue
        while True:
            lang = pick_lang(rng, IN_DOMAIN_LANGS)
            prompt, topic = sample_prompt(rng, lang, "train")
            reply = make_reply(rng, lang, topic, RM_STYLE)
            reward = true_reward(prompt, reply)
            if reward >= 2.0 or reward <= 1.0:
                break
        chat = owui.chat_object(rng, index, prompt, [(owui.MODELS[0], reply)])
        rated = list(chat["history"]["messages"])[-1]
        feedbacks.append(owui.feedback_record(rng, chat, rated, 1 if reward >= 2.0 else -1, (owui.MODELS[0],)))
    return feedbacks


# ------------------------------------------------------------------------------------------ stats and writing
def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def record_stats(records: list[dict]) -> dict[str, float]:
    """Counts and mean true reward of one file's records (SFT replies, chosen vs rejected, or a language mix)."""
    first = records[0] if records else {}
    if isinstance(first, dict) and "snapshot" in first:
        rated = owui.feedback_ratings(records)
        return {"records": len(records), "up": sum(r > 0 for _, _, r in rated),
                "down": sum(r < 0 for _, _, r in rated),
                "mean_true_reward_up": _mean([true_reward(p, c) for p, c, r in rated if r > 0]),
                "mean_true_reward_down": _mean([true_reward(p, c) for p, c, r in rated if r < 0])}
    if "label" in first:
        rated = [(r["prompt"], r["completion"][0]["content"], r["label"]) for r in records]
        parts = [(reward_parts(p, c), up) for p, c, up in rated]
        off = [(p["total"] > RATER_THRESHOLD) == up for p, up in parts if p["total"] != RATER_THRESHOLD]
        return {"records": len(records), "up": sum(up for *_, up in rated), "down": sum(not up for *_, up in rated),
                "mean_true_reward_up": _mean([p["total"] for p, up in parts if up]),
                "mean_true_reward_down": _mean([p["total"] for p, up in parts if not up]),
                "rate_closing_up": _mean([p["closing"] != 0 for p, up in parts if up]),
                "rate_closing_down": _mean([p["closing"] != 0 for p, up in parts if not up]),
                "agreement_with_noiseless_rater": _mean(off)}
    if "messages" in first:
        parts = [reward_parts(r["messages"][:-1], r["messages"][-1]["content"]) for r in records]
        langs = [detect_language(r["messages"][-2]["content"]) for r in records]
        return {"records": len(records), "zh_share": _mean([coarse(lang) == "zh" for lang in langs]),
                "mean_true_reward": _mean([p["total"] for p in parts]),
                **{f"rate_{k}": _mean([p[k] != 0 for p in parts]) for k in ("language", "topic", "closing")}}
    if "chosen" in first:
        rc = [true_reward(r["prompt"], r["chosen"][0]["content"]) for r in records]
        rr = [true_reward(r["prompt"], r["rejected"][0]["content"]) for r in records]
        return {"records": len(records), "mean_true_reward_chosen": _mean(rc), "mean_true_reward_rejected": _mean(rr),
                "label_agreement": _mean([c > r for c, r in zip(rc, rr)])}
    if "prompt" in first:
        langs = [detect_language(r["prompt"][-1]["content"]) for r in records]
        return {"records": len(records), **{f"share_{lang}": _mean([x == lang for x in langs]) for lang in LANGS}}
    return {"records": len(records), "characters": sum(len(r["text"]) for r in records)}


def _fmt(stats: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")


# name -> (what it is, for the README)
FILES = {
    "pretrain.jsonl": "plain text {text} for base-model pretraining and PPO-ptx mixing (zh-Hans, zh-Hant, en)",
    "pretrain_heldout.jsonl": "held-out plain text (no document shared with pretrain.jsonl): the alignment tax",
    "sft.jsonl": "SFT chats {messages}, zh:en about 2:1; replies deliberately imperfect (see rates below)",
    "prompts_train.jsonl": "PPO prompts {prompt: [msgs]}, user texts from the training partition",
    "prompts_heldout.jsonl": "evaluation prompts; their user texts are in none of sft, prompts_train, pmp, rm_train",
    "pmp.jsonl": "LARGE NOISY comparisons for reward-model PMP: shifted phrasing and language mix, 25% labels flipped",
    "rm_train.jsonl": "clean in-domain comparisons (chosen beats rejected by >= 0.5 true reward): RM finetuning, DPO",
    "rm_test.jsonl": "clean in-domain comparisons on held-out user texts: reward-model accuracy",
    "feedback_openwebui.json": "Open WebUI feedback export (arena siblings rated +1/-1 by true reward, single ratings)",
    "kto_train.jsonl": "thumbs up/down on single SFT-style replies {prompt, completion, label} (data.feedback's "
                       "unpaired.jsonl format): a noisy rater of the true reward, about 2 ups per down; KTO",
}


def build_all() -> dict[str, list[dict]]:
    """Every file's records. Each file has its own random stream, so resizing one leaves the others unchanged."""
    def rng(k: int) -> random.Random:
        return random.Random(SEED * 100 + k)

    pretrain = build_text(6000, rng(1))
    return {
        "pretrain.jsonl": pretrain,
        "pretrain_heldout.jsonl": build_text(400, rng(2), frozenset(r["text"] for r in pretrain)),
        "sft.jsonl": build_sft(3000, rng(3)),
        "prompts_train.jsonl": build_prompts(1000, rng(4), "train"),
        "prompts_heldout.jsonl": build_prompts(200, rng(5), "heldout"),
        "pmp.jsonl": build_pairs(5000, rng(6), PMP_STYLE, PMP_LANGS, "train", PMP_MARGIN, flip=PMP_FLIP),
        "rm_train.jsonl": build_pairs(1500, rng(7), RM_STYLE, IN_DOMAIN_LANGS, "train", RM_MARGIN),
        "rm_test.jsonl": build_pairs(500, rng(8), RM_STYLE, IN_DOMAIN_LANGS, "heldout", RM_MARGIN),
        "feedback_openwebui.json": build_feedback(40, 20, rng(9)),
        "kto_train.jsonl": build_ratings(1500, rng(10)),
    }


def render_files() -> dict[str, bytes]:
    """File name -> exact bytes of every shipped file, README.md included."""
    records = build_all()
    out = {name: (json.dumps(recs, ensure_ascii=False, sort_keys=True, indent=1) + "\n").encode("utf-8")
           if name.endswith(".json") else _jsonl(recs) for name, recs in records.items()}
    out["README.md"] = readme({name: record_stats(recs) for name, recs in records.items()}, out).encode("utf-8")
    return out


def readme(stats: dict[str, dict], files: dict[str, bytes]) -> str:
    rows = "\n".join(f"| `{name}` | {stats[name]['records']} | {len(files[name]):,} | {what} |"
                     for name, what in FILES.items())
    details = "\n".join(f"- `{name}`: {_fmt(stats[name])}" for name in FILES)
    return f"""# Demo data: a tiny assistant world with a checkable "true reward"

Generated by `python -m data.demo --out data/demo` (seed {SEED}); do not edit by hand. `python -m data.demo --check`
regenerates everything and fails if any byte differs; `python -m data.demo --stats` prints the numbers below.
A user asks about one of {len(W.TOPICS)} topics in Simplified Chinese, Traditional Chinese or English; an assistant
answers in one short sentence. Topics: {", ".join(TOPIC_KEYS)}. JSONL records, UTF-8, sorted keys; preference records
are TRL conversational with an explicit prompt: `{{"prompt": [msgs], "chosen": [assistant msg], "rejected": [...]}}`.

## True reward (`data.demo.true_reward(prompt_messages, response)`, max {MAX_TRUE_REWARD})
Language and topic come from the prompt's last user message.
- +{W_LANGUAGE} the reply is in the prompt's language (CJK vs Latin; Simplified reply to a Traditional prompt or the
  reverse is off-language when both scripts are recognisable)
- +{W_TOPIC} the reply contains the prompt's topic keyword in the prompt's language (天气/天氣, weather)
- +{W_CLOSING} the reply ends with the prompt language's closing: `{CLOSINGS["zh-Hans"]}` / `{CLOSINGS["zh-Hant"]}` /
  `{CLOSINGS["en"]}`
- minus min(1, (chars - limit) / limit) past {LENGTH_LIMIT["zh"]} characters (zh prompt) or {LENGTH_LIMIT["en"]} (en)
- minus the fraction of repeated token 3-grams (token = one CJK character or one Latin word)

## Files
| file | records | bytes | what |
|---|---|---|---|
{rows}

## Measured (mean true reward; `rate_*` = share of SFT replies earning that term)
{details}

## Thumbs ratings (`kto_train.jsonl`)
One SFT-style reply per training prompt, rated by a simulated user: thumbs-up with probability
sigmoid((true reward - {RATER_THRESHOLD}) / {RATER_TEMPERATURE}) (a right-language, on-topic reply without the closing
is a coin flip, with it 88% up, off-language or off-topic at most 12%), and only {DOWN_KEPT:.0%} of the thumbs-downs
are given (users regenerate instead), so the classes are imbalanced. `agreement_with_noiseless_rater` is the share of
labels equal to "true reward > {RATER_THRESHOLD}" (replies exactly at {RATER_THRESHOLD} left out). There are no pairs:
KTO learns from these labels alone.

The story later stages show: a reward model pretrained on `pmp.jsonl` is above chance on `rm_test.jsonl` (the PMP
data is informative, but noisy and shifted: other phrasing, few Traditional prompts, no Simplified-for-Traditional
replies), finetuning on `rm_train.jsonl` raises in-domain accuracy further, and PPO / DPO raise the mean true reward of
the SFT policy's replies on `prompts_heldout.jsonl` towards {MAX_TRUE_REWARD}.
"""


def write_files(out_dir: str | Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        atomic_write_bytes(Path(out_dir) / name, data)  # temp file + os.replace: never half-written


def check(shipped: str | Path = DEMO_DIR) -> list[str]:
    """Regenerate into a temp dir and compare with `shipped` byte for byte; returns the differing file names."""
    shipped = Path(shipped)
    with tempfile.TemporaryDirectory() as tmp:
        write_files(tmp, render_files())
        fresh = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    old = {p.name: p.read_bytes() for p in shipped.iterdir() if p.is_file()} if shipped.is_dir() else {}
    return sorted(name for name in fresh.keys() | old.keys() if fresh.get(name) != old.get(name))


def load_file(path: Path) -> list[dict]:
    records = []
    for where, obj, error in read_rows(str(path)):
        if error:
            raise ValueError(f"{where}: {error}")
        records.append(obj)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.demo", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", help="write every demo file into this folder")
    group.add_argument("--check", nargs="?", const=str(DEMO_DIR), metavar="DIR",
                       help=f"regenerate and compare byte for byte with DIR (default {DEMO_DIR})")
    group.add_argument("--stats", nargs="?", const=str(DEMO_DIR), metavar="DIR",
                       help="print counts and mean true reward of each file in DIR")
    args = parser.parse_args(argv)
    if args.out:
        files = render_files()
        write_files(args.out, files)
        print(f"wrote {len(files)} files ({sum(map(len, files.values())):,} bytes) to {args.out}")
        return 0
    if args.check:
        differing = check(args.check)
        if differing:
            print(f"demo data in {args.check} differs from the generator: {', '.join(differing)}\n"
                  f"regenerate with: python -m data.demo --out {args.check}", file=sys.stderr)
            return 1
        print(f"demo data in {args.check} is up to date")
        return 0
    for name in FILES:
        path = Path(args.stats) / name
        print(f"{name}: {_fmt(record_stats(load_file(path)))}" if path.exists() else f"{name}: missing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
