"""One small parser per feedback / preference export format -> canonical records.

Canonical records (the agreed on-disk formats, see data/datasets.py):
  pair   {"prompt": [msgs], "chosen": [{"role": "assistant", ...}], "rejected": [...], "tools"?: [...]}
  single {"prompt": [msgs], "completion": [{"role": "assistant", ...}], "label": bool, "tools"?: [...]}
Messages keep tool calls and tool results (data/validate.py). A parser gets the rows of one input `[(where, obj)]`
and returns one `Parsed` per row (data/formats_base.py): its pairs and singles, the reasons it yields nothing
although valid (ties, equal scores), or the error that makes it malformed. Per-record formats are here; tree formats
(Open WebUI, LibreChat, OASST) need all rows of the file at once and live in data/formats_tree.py.
Field names and semantics follow tests/fixtures/formats/README.md.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Callable

from data.formats_base import (  # noqa: F401  (re-exported: the parsers' public names)
    Parsed,
    RecordError,
    Row,
    as_prompt,
    as_reply,
    get_dict,
    get_list,
    get_str,
    get_tools,
    msg,
    number,
    pair,
    parse_thumb,
    path_to_root,
    per_record,
    single,
    split_shared_prompt,
    type_name,
    with_tools,
)
from data.formats_tree import parse_librechat, parse_oasst, parse_openwebui
from data.validate import normalize_messages


# ------------------------------------------------------------------------------------------ per-record formats
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_hh(text: Any, name: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [user a, assistant b]; the text must start with a Human turn."""
    if not isinstance(text, str):
        raise RecordError(f"field {name!r} must be a string, got {type_name(text)}")
    if not text.startswith("\n\nHuman:"):
        raise RecordError(f"{name} does not start with '\\n\\nHuman:' ({text[:40]!r})")
    parts = _HH_TURN.split(text)[1:]  # [who, body, who, body, ...]
    msgs = [msg("user" if who == "Human" else "assistant", body.strip()) for who, body in zip(parts[::2], parts[1::2])]
    if msgs[-1]["role"] != "assistant":
        raise RecordError(f"{name} has no final '\\n\\nAssistant:' turn")
    return msgs


def hh_record(obj: dict) -> list:
    """Anthropic HH-RLHF: two full dialogues that differ only in the final Assistant turn."""
    shared = split_shared_prompt(split_hh(obj.get("chosen"), "chosen"), split_hh(obj.get("rejected"), "rejected"))
    if shared is None:
        return [("drop", "chosen and rejected dialogues differ before the final reply")]
    return [("pair", pair(*shared))]


def preference_record(obj: dict) -> list:
    """TRL preference (explicit or implicit prompt, standard or conversational, with tools) and
    UltraFeedback-binarized."""
    if "score_chosen" in obj and obj.get("score_chosen") == obj.get("score_rejected"):
        return [("drop", "tie")]
    chosen, rejected, tools = obj.get("chosen"), obj.get("rejected"), get_tools(obj)
    if isinstance(chosen, list) and isinstance(rejected, list) and any(
            isinstance(m, dict) and m.get("role") == "user" for m in chosen):
        # implicit prompt: full dialogues (UltraFeedback's prompt string repeats the user turn inside them)
        shared = split_shared_prompt(normalize_messages(chosen, "chosen"), normalize_messages(rejected, "rejected"))
        if shared is None:
            return [("drop", "chosen and rejected dialogues differ before the final reply")]
        return [("pair", with_tools(pair(*shared), tools))]
    if "prompt" not in obj:
        raise RecordError("preference record without 'prompt' whose chosen/rejected are not full dialogues: "
                          "cannot tell the prompt from the reply")
    return [("pair", with_tools(pair(as_prompt(obj["prompt"]), as_reply(chosen, "chosen"),
                                     as_reply(rejected, "rejected")), tools))]


_RATING_KEYS = ("rating", "label", "thumbs", "thumb", "feedback")


def thumbs_record(obj: dict) -> list:
    """Plain thumbs: {"messages": [..., assistant], "rating"|"label": ...} or {"prompt", "completion", "rating"}."""
    key = next((k for k in _RATING_KEYS if k in obj), None)
    if key is None:
        raise RecordError(f"no rating field (one of {', '.join(_RATING_KEYS)})")
    value = obj[key]
    label = parse_thumb(value.get("rating") if isinstance(value, dict) else value)
    tools = get_tools(obj)
    if "messages" in obj:
        msgs = normalize_messages(obj["messages"], "messages")
        if msgs[-1]["role"] != "assistant":
            raise RecordError("the rated conversation must end with an assistant reply")
        return [("single", with_tools(single(msgs[:-1], msgs[-1], label), tools))]
    if "prompt" in obj and "completion" in obj:
        return [("single", with_tools(single(as_prompt(obj["prompt"]), as_reply(obj["completion"], "completion"),
                                             label), tools))]
    raise RecordError("thumbs record needs 'messages' or 'prompt' + 'completion'")


def trl_record(obj: dict) -> list:
    """TRL dataset formats with feedback: preference (handled like UltraFeedback) and unpaired {prompt, completion,
    label}. Prompt-only and language-modelling records carry no feedback and are errors."""
    if "chosen" in obj or "rejected" in obj:
        return preference_record(obj)
    if "completion" in obj and "label" in obj:
        return [("single", with_tools(single(as_prompt(obj.get("prompt")), as_reply(obj["completion"], "completion"),
                                             parse_thumb(obj["label"])), get_tools(obj)))]
    raise RecordError(f"no feedback in this record (keys {sorted(obj)[:8]}): need chosen/rejected or "
                      f"completion+label")


def shp_record(obj: dict) -> list:
    """Stanford SHP: two Reddit comments on one post; the higher score wins, equal scores carry no preference."""
    a, b = obj.get("score_A"), obj.get("score_B")
    try:
        number(a, "score_A"), number(b, "score_B")
    except RecordError:
        raise RecordError(f"score_A and score_B must be finite numbers, got {a!r:.20} and {b!r:.20}") from None
    ref_a, ref_b = get_str(obj, "human_ref_A"), get_str(obj, "human_ref_B")
    prompt = [msg("user", get_str(obj, "history"))]
    if a == b:
        return [("drop", "equal scores")]
    win, lose = (ref_a, ref_b) if a > b else (ref_b, ref_a)
    return [("pair", pair(prompt, msg("assistant", win), msg("assistant", lose)))]


def arena_record(obj: dict) -> list:
    """LMSYS Chatbot Arena battle: winner model_a / model_b; ties carry no preference."""
    winner = obj.get("winner")
    if winner in ("tie", "tie (bothbad)"):
        return [("drop", winner)]
    if winner not in ("model_a", "model_b"):
        raise RecordError(f"winner must be model_a, model_b, tie or 'tie (bothbad)', got {winner!r:.40}")
    a = normalize_messages(obj.get("conversation_a"), "conversation_a")
    b = normalize_messages(obj.get("conversation_b"), "conversation_b")
    shared = split_shared_prompt(*((a, b) if winner == "model_a" else (b, a)))
    if shared is None:  # each model answered every turn: the vote covers whole dialogues, not one reply
        return [("drop", "multi-turn battle (dialogues differ before the final reply)")]
    return [("pair", pair(*shared))]


def summarize_record(obj: dict) -> list:
    """OpenAI summarize_from_feedback comparison; prompt in the TL;DR format of the N+ implementation details."""
    info, summaries, choice = get_dict(obj, "info", required=True), obj.get("summaries"), obj.get("choice")
    if not isinstance(summaries, list) or len(summaries) != 2 or not all(isinstance(s, dict) for s in summaries):
        raise RecordError("needs an 'info' object and exactly two 'summaries' objects")
    if choice not in (0, 1) or isinstance(choice, (bool, float)):
        raise RecordError(f"choice must be 0 or 1, got {choice!r:.20}")
    texts = [get_str(s, "text", f"summaries[{i}].text").strip() for i, s in enumerate(summaries)]  # N+: leading space
    title = get_str(info, "title", "info.title")
    if info.get("article") not in (None, ""):  # CNN/DM
        prompt = f"TITLE: {title}\n\n{get_str(info, 'article', 'info.article')}\n\nTL;DR:"
    else:
        prompt = (f"SUBREDDIT: r/{get_str(info, 'subreddit', 'info.subreddit')}\n\nTITLE: {title}\n\n"
                  f"POST: {get_str(info, 'post', 'info.post')}\n\nTL;DR:")
    return [("pair", pair([msg("user", prompt)], msg("assistant", texts[choice]), msg("assistant", texts[1 - choice])))]


def _ranked_pairs(order: list[tuple[str, int]]) -> list[tuple[str, str]]:
    """[(name, rank)] -> every (better, worse) pair; a lower rank is better, equal ranks give no pair."""
    return [(x, y) for x, rx in order for y, ry in order if rx < ry]


def _prompt_field(obj: dict, skip: set[str]) -> str:
    for key in ("prompt", "instruction", "question", "input"):
        if isinstance(obj.get(key), str) and key not in skip:
            return obj[key]
    raise RecordError("no prompt field (prompt / instruction / question / input)")


def _argilla_ranking(r: Any, column: str) -> list[tuple[str, float]]:
    """One annotator's ranking [{value: field name, rank: number}] -> sorted [(name, rank)]."""
    if not isinstance(r, list) or not r or not all(isinstance(x, dict) for x in r):
        raise RecordError(f"{column} must hold rankings [{{value, rank}}, ...], got {r!r:.80}")
    out = []
    for x in r:
        if not isinstance(x.get("value"), str):
            raise RecordError(f"{column}: a ranking value must be a field name (string), got {x.get('value')!r:.40}")
        out.append((x["value"], number(x.get("rank"), f"{column}: rank of {x['value']!r}")))
    return sorted(out)


def argilla_record(obj: dict) -> list:
    """Argilla 2.x flattened record with a RankingQuestion ("<q>.responses": per-user [{value, rank}])."""
    if obj.get("status", "completed") != "completed":
        return [("drop", "not completed")]
    keys = [k for k in obj if k.endswith(".responses")]
    if not keys:
        raise RecordError("no '<question>.responses' column")
    responses = get_list(obj, keys[0])
    statuses = get_list(obj, keys[0] + ".status") or ["submitted"] * len(responses)
    rankings = [r for r, s in zip(responses, statuses) if s == "submitted"]
    if not rankings:
        return [("drop", "no submitted ranking")]
    orders = [_argilla_ranking(r, keys[0]) for r in rankings]
    if any(o != orders[0] for o in orders):
        return [("drop", "annotators disagree")]
    fields = {**obj, **get_dict(obj, "fields")}
    names = [v for v, _ in orders[0]]
    for v in names:
        if not isinstance(fields.get(v), str):
            raise RecordError(f"ranking names field {v!r}, which is not a text field of the record")
    prompt = [msg("user", _prompt_field(fields, set(names)))]
    return [("pair", pair(prompt, msg("assistant", fields[w]), msg("assistant", fields[lo])))
            for w, lo in _ranked_pairs(orders[0])]


def _labelstudio_votes(annotations: list) -> set[tuple[str, str]]:
    votes = set()
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or ann.get("was_cancelled") is True:
            continue
        for res in get_list(ann, "result", f"annotations[{i}].result"):
            if isinstance(res, dict) and res.get("type") == "pairwise":
                names, value = res.get("to_name"), get_dict(res, "value", f"annotations[{i}].result.value")
                names = names.split(",") if isinstance(names, str) else []
                selected = value.get("selected")
                if len(names) != 2 or selected not in ("left", "right"):
                    raise RecordError(f"pairwise result needs to_name 'a,b' and selected left/right, got {res!r:.120}")
                votes.add(tuple(names) if selected == "left" else tuple(names[::-1]))
    return votes


def labelstudio_record(obj: dict) -> list:
    """Label Studio JSON export task with a Pairwise tag (result.value.selected = left | right)."""
    data, annotations = obj.get("data"), obj.get("annotations")
    if not isinstance(data, dict) or not isinstance(annotations, list):
        raise RecordError("needs a 'data' object and an 'annotations' list")
    votes = _labelstudio_votes(annotations)
    if not votes:
        return [("drop", "no pairwise annotation")]
    if len(votes) > 1:
        return [("drop", "annotators disagree")]
    win, lose = votes.pop()
    prompt = [msg("user", _prompt_field(data, {win, lose}))]
    return [("pair", pair(prompt, msg("assistant", get_str(data, win, f"data.{win}")),
                          msg("assistant", get_str(data, lose, f"data.{lose}"))))]


def parse_thumbs(rows: list[Row]) -> list[Parsed]:
    """Plain thumbs records, and LibreChat message documents (rows with a messageId) as one message tree."""
    librechat = [(w, o) for w, o in rows if isinstance(o, dict) and "messageId" in o]
    plain = [(w, o) for w, o in rows if not (isinstance(o, dict) and "messageId" in o)]
    return per_record(thumbs_record)(plain) + (parse_librechat(librechat) if librechat else [])


# ------------------------------------------------------------------------------------------- detection, dispatch
PARSERS: dict[str, Callable[[list[Row]], list[Parsed]]] = {
    "openwebui": parse_openwebui,
    "thumbs": parse_thumbs,
    "hh": per_record(hh_record),
    "ultrafeedback": per_record(preference_record),
    "shp": per_record(shp_record),
    "arena": per_record(arena_record),
    "oasst": parse_oasst,
    "argilla": per_record(argilla_record),
    "labelstudio": per_record(labelstudio_record),
    "summarize": per_record(summarize_record),
    "trl": per_record(trl_record),
}

_DETECT: list[tuple[str, Callable[[dict], bool]]] = [  # first match wins; keys from each project's own schema
    ("openwebui", lambda o: {"snapshot", "meta", "data"} <= o.keys()),
    ("thumbs", lambda o: "messageId" in o),  # LibreChat message document
    ("oasst", lambda o: "message_tree_id" in o or {"message_id", "parent_id"} <= o.keys()),
    ("arena", lambda o: {"conversation_a", "conversation_b", "winner"} <= o.keys()),
    ("shp", lambda o: {"human_ref_A", "human_ref_B"} <= o.keys()),
    ("summarize", lambda o: {"summaries", "choice"} <= o.keys()),
    ("labelstudio", lambda o: {"data", "annotations"} <= o.keys()),
    ("argilla", lambda o: any(k.endswith(".responses") for k in o)),
    ("hh", lambda o: "prompt" not in o and isinstance(o.get("chosen"), str) and o["chosen"].startswith("\n\nHuman:")),
    ("ultrafeedback", lambda o: "score_chosen" in o or "prompt_id" in o),
    ("thumbs", lambda o: any(k in o for k in ("rating", "thumbs", "thumb", "feedback"))  # a bare "label" is TRL's
     or {"messages", "label"} <= o.keys()),
    ("trl", lambda o: "chosen" in o or "rejected" in o or "completion" in o),
]


def detect_format(obj: Any) -> str | None:
    """Name of the format one record looks like, or None."""
    if not isinstance(obj, dict):
        return None
    return next((name for name, test in _DETECT if test(obj)), None)


def parse_rows(rows: list[Row], fmt: str = "auto") -> list[tuple[str | None, Parsed]]:
    """Parse rows of one input: `fmt` names the format, or "auto" detects it record by record (one file may mix
    formats, e.g. Argilla and Label Studio). Returns (format, Parsed) grouped by format, in input order within one."""
    if fmt != "auto" and fmt not in PARSERS:
        raise ValueError(f"unknown format {fmt!r}; known: auto, {', '.join(PARSERS)}")
    groups: dict[str, list[Row]] = defaultdict(list)
    unknown = []
    for where, obj in rows:
        name = fmt if fmt != "auto" else detect_format(obj)
        if name is None:
            keys = sorted(obj)[:8] if isinstance(obj, dict) else type_name(obj)
            unknown.append((None, Parsed(where, error=f"cannot tell the format of this record (keys {keys}); "
                                                     f"pass --format")))
        else:
            groups[name].append((where, obj))
    return [(name, p) for name, group in groups.items() for p in PARSERS[name](group)] + unknown
