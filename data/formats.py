"""One small parser per feedback / preference export format -> canonical records.

Canonical records (the agreed on-disk formats, see data/datasets.py):
  pair   {"prompt": [msgs], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
  single {"prompt": [msgs], "completion": [{"role": "assistant", ...}], "label": bool}
A parser gets the rows of one input `[(where, obj)]` and returns one `Parsed` per row: its pairs and singles, the
reasons it yields nothing although valid (ties, equal scores), or the error that makes it malformed. Per-record
formats go through `_per_record`; tree formats (Open WebUI, LibreChat, OASST) need all rows of the file at once.
Field names and semantics follow tests/fixtures/formats/README.md.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

Row = tuple[str, Any]  # (where, obj): where is "file:line" or "file[i]"


class RecordError(ValueError):
    """A malformed record; the message says what is wrong (the caller adds file and line)."""


@dataclass
class Parsed:
    where: str
    pairs: list[dict] = field(default_factory=list)
    singles: list[dict] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # reasons a valid record yields nothing (a tie, ...)
    error: str | None = None


# ---------------------------------------------------------------------------------------------- shared helpers
def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _text(obj: dict, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, name: str) -> list[dict]:
    """Validate a [{role, content}] list; keeps only role and content."""
    if not isinstance(value, list) or not value:
        raise RecordError(f"field {name!r} must be a non-empty list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RecordError(f"{name}[{i}] must be a message with role system/user/assistant, got {m!r:.80}")
        if not isinstance(m.get("content"), str):
            raise RecordError(f"{name}[{i}].content must be a string, got {type(m.get('content')).__name__}")
        out.append(_msg(m["role"], m["content"]))
    return out


def _as_prompt(value: Any, name: str = "prompt") -> list[dict]:
    """A TRL prompt: a string (standard format -> one user turn) or a message list (conversational)."""
    return [_msg("user", value)] if isinstance(value, str) else _messages(value, name)


def _as_reply(value: Any, name: str) -> list[dict]:
    """A reply: a string or a list of assistant messages."""
    if isinstance(value, str):
        return [_msg("assistant", value)]
    msgs = _messages(value, name)
    if any(m["role"] != "assistant" for m in msgs):
        raise RecordError(f"field {name!r} must hold only assistant messages when a prompt is given")
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


def _pair(prompt: list[dict], chosen: dict | list[dict], rejected: dict | list[dict]) -> tuple[str, dict]:
    wrap = lambda x: x if isinstance(x, list) else [x]  # noqa: E731
    return "pair", {"prompt": prompt, "chosen": wrap(chosen), "rejected": wrap(rejected)}


def _single(prompt: list[dict], reply: dict | list[dict], label: bool) -> tuple[str, dict]:
    return "single", {"prompt": prompt, "completion": reply if isinstance(reply, list) else [reply], "label": label}


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
    raise RecordError(f"rating {value!r} is not a thumbs value (accepted: +1/-1, 1/0, true/false, up/down, "
                      f"thumbs_up/thumbs_down)")


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


def _per_record(fn: Callable[[dict], list]) -> Callable[[list[Row]], list[Parsed]]:
    """Lift a one-record parser (dict -> [("pair"|"single", rec) | ("drop", reason)]) to a rows parser."""
    def parse(rows: list[Row]) -> list[Parsed]:
        out = []
        for where, obj in rows:
            p = Parsed(where)
            try:
                if not isinstance(obj, dict):
                    raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
                for kind, value in fn(obj):
                    {"pair": p.pairs, "single": p.singles, "drop": p.dropped}[kind].append(value)
            except RecordError as e:
                p = Parsed(where, error=str(e))
            out.append(p)
        return out
    parse.__doc__ = fn.__doc__
    return parse


# ------------------------------------------------------------------------------------------ per-record formats
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_hh(text: Any, name: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [user a, assistant b]; the text must start with a Human turn."""
    if not isinstance(text, str):
        raise RecordError(f"field {name!r} must be a string, got {type(text).__name__}")
    if not text.startswith("\n\nHuman:"):
        raise RecordError(f"{name} does not start with '\\n\\nHuman:' ({text[:40]!r})")
    parts = _HH_TURN.split(text)[1:]  # [who, body, who, body, ...]
    msgs = [_msg("user" if who == "Human" else "assistant", body.strip()) for who, body in zip(parts[::2], parts[1::2])]
    if msgs[-1]["role"] != "assistant":
        raise RecordError(f"{name} has no final '\\n\\nAssistant:' turn")
    return msgs


def hh_record(obj: dict) -> list:
    """Anthropic HH-RLHF: two full dialogues that differ only in the final Assistant turn."""
    shared = split_shared_prompt(split_hh(obj.get("chosen"), "chosen"), split_hh(obj.get("rejected"), "rejected"))
    if shared is None:
        return [("drop", "chosen and rejected dialogues differ before the final reply")]
    return [_pair(*shared)]


def preference_record(obj: dict) -> list:
    """TRL preference (explicit or implicit prompt, standard or conversational) and UltraFeedback-binarized."""
    if "score_chosen" in obj and obj.get("score_chosen") == obj.get("score_rejected"):
        return [("drop", "tie")]
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list) and any(
            isinstance(m, dict) and m.get("role") == "user" for m in chosen):
        # implicit prompt: full dialogues (UltraFeedback's prompt string repeats the user turn inside them)
        shared = split_shared_prompt(_messages(chosen, "chosen"), _messages(rejected, "rejected"))
        if shared is None:
            return [("drop", "chosen and rejected dialogues differ before the final reply")]
        return [_pair(*shared)]
    if "prompt" not in obj:
        raise RecordError("preference record without 'prompt' whose chosen/rejected are not full dialogues: "
                          "cannot tell the prompt from the reply")
    return [_pair(_as_prompt(obj["prompt"]), _as_reply(chosen, "chosen"), _as_reply(rejected, "rejected"))]


_RATING_KEYS = ("rating", "label", "thumbs", "thumb", "feedback")


def thumbs_record(obj: dict) -> list:
    """Plain thumbs: {"messages": [..., assistant], "rating"|"label": ...} or {"prompt", "completion", "rating"}."""
    key = next((k for k in _RATING_KEYS if k in obj), None)
    if key is None:
        raise RecordError(f"no rating field (one of {', '.join(_RATING_KEYS)})")
    value = obj[key]
    label = parse_thumb(value.get("rating") if isinstance(value, dict) else value)
    if "messages" in obj:
        msgs = _messages(obj["messages"], "messages")
        if msgs[-1]["role"] != "assistant":
            raise RecordError("the rated conversation must end with an assistant reply")
        return [_single(msgs[:-1], msgs[-1], label)]
    if "prompt" in obj and "completion" in obj:
        return [_single(_as_prompt(obj["prompt"]), _as_reply(obj["completion"], "completion"), label)]
    raise RecordError("thumbs record needs 'messages' or 'prompt' + 'completion'")


def trl_record(obj: dict) -> list:
    """TRL dataset formats with feedback: preference (handled like UltraFeedback) and unpaired {prompt, completion,
    label}. Prompt-only and language-modelling records carry no feedback and are errors."""
    if "chosen" in obj or "rejected" in obj:
        return preference_record(obj)
    if "completion" in obj and "label" in obj:
        return [_single(_as_prompt(obj.get("prompt")), _as_reply(obj["completion"], "completion"),
                        parse_thumb(obj["label"]))]
    raise RecordError(f"no feedback in this record (keys {sorted(obj)}): need chosen/rejected or completion+label")


def shp_record(obj: dict) -> list:
    """Stanford SHP: two Reddit comments on one post; the higher score wins, equal scores carry no preference."""
    a, b = obj.get("score_A"), obj.get("score_B")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in (a, b)):
        raise RecordError(f"score_A and score_B must be numbers, got {a!r} and {b!r}")
    ref_a, ref_b = _text(obj, "human_ref_A"), _text(obj, "human_ref_B")
    if a == b:
        return [("drop", "equal scores")]
    prompt = [_msg("user", _text(obj, "history"))]
    win, lose = (ref_a, ref_b) if a > b else (ref_b, ref_a)
    return [_pair(prompt, _msg("assistant", win), _msg("assistant", lose))]


def arena_record(obj: dict) -> list:
    """LMSYS Chatbot Arena battle: winner model_a / model_b; ties carry no preference."""
    winner = obj.get("winner")
    if winner in ("tie", "tie (bothbad)"):
        return [("drop", winner)]
    if winner not in ("model_a", "model_b"):
        raise RecordError(f"winner must be model_a, model_b, tie or 'tie (bothbad)', got {winner!r}")
    a = _messages(obj.get("conversation_a"), "conversation_a")
    b = _messages(obj.get("conversation_b"), "conversation_b")
    shared = split_shared_prompt(*((a, b) if winner == "model_a" else (b, a)))
    if shared is None:  # each model answered every turn: the vote covers whole dialogues, not one reply
        return [("drop", "multi-turn battle (dialogues differ before the final reply)")]
    return [_pair(*shared)]


def summarize_record(obj: dict) -> list:
    """OpenAI summarize_from_feedback comparison; prompt in the TL;DR format of the N+ implementation details."""
    info, summaries, choice = obj.get("info"), obj.get("summaries"), obj.get("choice")
    if not isinstance(info, dict) or not isinstance(summaries, list) or len(summaries) != 2 or not all(
            isinstance(s, dict) for s in summaries):
        raise RecordError("needs an 'info' object and exactly two 'summaries' objects")
    if choice not in (0, 1) or isinstance(choice, bool):
        raise RecordError(f"choice must be 0 or 1, got {choice!r}")
    texts = [_text(s, "text").strip() for s in summaries]  # N+ summaries start with a space (completion style)
    if info.get("article"):  # CNN/DM
        prompt = f"TITLE: {info.get('title')}\n\n{info['article']}\n\nTL;DR:"
    else:
        prompt = (f"SUBREDDIT: r/{info.get('subreddit')}\n\nTITLE: {info.get('title')}\n\n"
                  f"POST: {_text(info, 'post')}\n\nTL;DR:")
    return [_pair([_msg("user", prompt)], _msg("assistant", texts[choice]), _msg("assistant", texts[1 - choice]))]


def _ranked_pairs(order: list[tuple[str, int]]) -> list[tuple[str, str]]:
    """[(name, rank)] -> every (better, worse) pair; a lower rank is better, equal ranks give no pair."""
    return [(x, y) for x, rx in order for y, ry in order if rx < ry]


def _prompt_field(obj: dict, skip: set[str]) -> str:
    for key in ("prompt", "instruction", "question", "input"):
        if isinstance(obj.get(key), str) and key not in skip:
            return obj[key]
    raise RecordError("no prompt field (prompt / instruction / question / input)")


def argilla_record(obj: dict) -> list:
    """Argilla 2.x flattened record with a RankingQuestion ("<q>.responses": per-user [{value, rank}])."""
    if obj.get("status", "completed") != "completed":
        return [("drop", "not completed")]
    keys = [k for k in obj if k.endswith(".responses")]
    if not keys:
        raise RecordError("no '<question>.responses' column")
    statuses = obj.get(keys[0] + ".status") or ["submitted"] * len(obj[keys[0]] or [])
    rankings = [r for r, s in zip(obj[keys[0]] or [], statuses) if s == "submitted"]
    if not rankings:
        return [("drop", "no submitted ranking")]
    orders = []
    for r in rankings:
        if not isinstance(r, list) or not all(isinstance(x, dict) and "value" in x and "rank" in x for x in r):
            raise RecordError(f"{keys[0]} must hold rankings [{{value, rank}}, ...], got {r!r:.80}")
        orders.append(sorted((x["value"], x["rank"]) for x in r))
    if any(o != orders[0] for o in orders):
        return [("drop", "annotators disagree")]
    fields = {**obj, **(obj.get("fields") or {})}
    names = [v for v, _ in orders[0]]
    for v in names:
        if not isinstance(fields.get(v), str):
            raise RecordError(f"ranking names field {v!r}, which is not a text field of the record")
    prompt = [_msg("user", _prompt_field(fields, set(names)))]
    return [_pair(prompt, _msg("assistant", fields[w]), _msg("assistant", fields[l]))
            for w, l in _ranked_pairs(orders[0])]


def labelstudio_record(obj: dict) -> list:
    """Label Studio JSON export task with a Pairwise tag (result.value.selected = left | right)."""
    data, annotations = obj.get("data"), obj.get("annotations")
    if not isinstance(data, dict) or not isinstance(annotations, list):
        raise RecordError("needs a 'data' object and an 'annotations' list")
    votes = set()
    for ann in annotations:
        if not isinstance(ann, dict) or ann.get("was_cancelled"):
            continue
        for res in ann.get("result") or []:
            if isinstance(res, dict) and res.get("type") == "pairwise":
                names = str(res.get("to_name", "")).split(",")
                selected = (res.get("value") or {}).get("selected")
                if len(names) != 2 or selected not in ("left", "right"):
                    raise RecordError(f"pairwise result needs to_name 'a,b' and selected left/right, got {res!r:.120}")
                votes.add(tuple(names) if selected == "left" else tuple(names[::-1]))
    if not votes:
        return [("drop", "no pairwise annotation")]
    if len(votes) > 1:
        return [("drop", "annotators disagree")]
    win, lose = votes.pop()
    prompt = [_msg("user", _prompt_field(data, {win, lose}))]
    return [_pair(prompt, _msg("assistant", _text(data, win)), _msg("assistant", _text(data, lose)))]


# ------------------------------------------------------------------------------------------------ tree formats
def _parents(tree: dict[str, tuple[str | None, str, str]]) -> dict[str, str | None]:
    return {k: v[0] for k, v in tree.items()}


def _path_messages(tree: dict, parent_of: dict[str, str | None], leaf: str) -> list[dict]:
    """Messages from the root down to `leaf` of a tree {id: (parent_id, role, content)}."""
    return [_msg(tree[m][1], tree[m][2]) for m in path_to_root(parent_of, leaf)]


def _tree_records(tree: dict, leaf: str, parent_of: dict | None = None) -> tuple[list[dict], dict]:
    """(prompt, reply) for message `leaf`; the reply must be an assistant message."""
    path = _path_messages(tree, parent_of if parent_of is not None else _parents(tree), leaf)
    if path[-1]["role"] != "assistant":
        raise RecordError(f"rated message {leaf!r} is a {path[-1]['role']} message, not an assistant reply")
    return path[:-1], path[-1]


def _openwebui_tree(fb: dict) -> tuple[str, dict[str, tuple[str | None, str, str]], dict[str, bool]]:
    """(chat id, {id: (parentId, role, content)}, {id: annotation rating}) from a feedback's chat snapshot."""
    chat = ((fb.get("snapshot") or {}).get("chat")) or {}
    inner = chat.get("chat") if isinstance(chat.get("chat"), dict) else chat  # snapshot.chat.chat.history (README)
    messages = (inner.get("history") or {}).get("messages")
    if not isinstance(messages, dict):
        raise RecordError("no snapshot.chat.chat.history.messages object")
    tree, ratings = {}, {}
    for mid, m in messages.items():
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise RecordError(f"message {mid!r} needs role system/user/assistant and a string content")
        tree[mid] = (m.get("parentId"), m["role"], m["content"])
        rating = (m.get("annotation") or {}).get("rating")
        if rating in (1, -1, "1", "-1"):
            ratings[mid] = parse_thumb(rating)
    return str(chat.get("id") or (fb.get("meta") or {}).get("chat_id")), tree, ratings


def _openwebui_rating(fb: dict) -> tuple[str, bool | None]:
    mid = (fb.get("meta") or {}).get("message_id")
    if not isinstance(mid, str):
        raise RecordError("meta.message_id is missing")
    rating = (fb.get("data") or {}).get("rating")
    return mid, None if rating in (None, 0, "0", "") else parse_thumb(rating)


def parse_openwebui(rows: list[Row]) -> list[Parsed]:
    """Open WebUI feedback export: each feedback rates meta.message_id inside its chat snapshot.

    Every rating -> single (positives also become SFT later). Pairs: a rated reply and a sibling reply (same
    parentId) with the opposite rating, from any feedback of the export or the sibling's own annotation; in arena
    mode (meta.arena) an unrated sibling lost when the rating is +1 and won when it is -1, as Open WebUI's own
    leaderboard counts it. A pair rated from both sides is emitted once, by its positive side.
    """
    rated: dict[tuple[str, str], bool] = {}  # (chat id, message id) -> rating, over the whole export
    for _, fb in rows:
        try:
            mid, rating = _openwebui_rating(fb)
            if rating is not None:
                rated[(_openwebui_tree(fb)[0], mid)] = rating
        except (RecordError, AttributeError, TypeError):
            pass  # reported with its record below
    out = []
    for where, fb in rows:
        fid = fb.get("id") if isinstance(fb, dict) else None
        p = Parsed(f"{where} (feedback id={fid})")
        try:
            if not isinstance(fb, dict):
                raise RecordError(f"expected a JSON object, got {type(fb).__name__}")
            _openwebui_one(fb, rated, p)
        except RecordError as e:
            p = Parsed(p.where, error=str(e))
        out.append(p)
    return out


def _openwebui_one(fb: dict, rated: dict[tuple[str, str], bool], p: Parsed) -> None:
    mid, rating = _openwebui_rating(fb)
    if rating is None:
        p.dropped.append("no thumbs rating")
        return
    chat_id, tree, annotated = _openwebui_tree(fb)
    prompt, reply = _tree_records(tree, mid)
    p.singles.append(_single(prompt, reply, rating)[1])
    parent = tree[mid][0]
    for sib, (sib_parent, role, content) in tree.items():
        if sib == mid or sib_parent != parent or role != "assistant":
            continue
        other = rated.get((chat_id, sib), annotated.get(sib))
        if other is None and (fb.get("meta") or {}).get("arena"):
            other = not rating
        if other is None or other == rating or (not rating and (chat_id, sib) in rated):
            continue  # no preference, or the sibling's own feedback (the positive side) emits this pair
        sib_msg = _msg("assistant", content)
        p.pairs.append(_pair(prompt, reply, sib_msg)[1] if rating else _pair(prompt, sib_msg, reply)[1])


_LIBRECHAT_NO_PARENT = "00000000-0000-0000-0000-000000000000"


def _librechat_text(m: dict) -> str:
    if isinstance(m.get("text"), str) and m["text"]:
        return m["text"]
    parts = m.get("content")  # newer versions: content parts [{type: "text", text}]
    if isinstance(parts, list):
        return "".join(x.get("text", "") for x in parts if isinstance(x, dict) and isinstance(x.get("text"), str))
    raise RecordError(f"message {m.get('messageId')!r} has no text")


def parse_librechat(rows: list[Row]) -> list[Parsed]:
    """LibreChat messages collection: rated messages (feedback.rating thumbsUp/thumbsDown) -> singles; regenerated
    siblings (same parentMessageId) rated oppositely -> pairs. The input must hold the whole conversation: a rated
    message whose parent is missing is an error (export all messages, not only the rated ones)."""
    tree, results, ratings = {}, [], {}
    for where, m in rows:
        p = Parsed(f"{where} (messageId={m.get('messageId') if isinstance(m, dict) else None})")
        try:
            if not isinstance(m, dict) or not isinstance(m.get("messageId"), str):
                raise RecordError("expected a message object with a string messageId")
            parent = m.get("parentMessageId")
            role = "user" if m.get("isCreatedByUser") else "assistant"
            parent = None if parent in (None, _LIBRECHAT_NO_PARENT) else parent
            tree[m["messageId"]] = (parent, role, _librechat_text(m))
            if isinstance(m.get("feedback"), dict):
                ratings[m["messageId"]] = parse_thumb(m["feedback"].get("rating"))
        except RecordError as e:
            p.error = str(e)
        results.append((m.get("messageId") if isinstance(m, dict) else None, p))
    parent_of = _parents(tree)
    for mid, p in results:
        if p.error or mid not in ratings:
            continue
        try:
            prompt, reply = _tree_records(tree, mid, parent_of)
        except RecordError as e:
            p.error = str(e)
            continue
        p.singles.append(_single(prompt, reply, ratings[mid])[1])
        for sib, (parent, role, content) in tree.items():
            if ratings[mid] and parent == tree[mid][0] and role == "assistant" and ratings.get(sib) is False:
                p.pairs.append(_pair(prompt, reply, _msg("assistant", content))[1])
    return [p for _, p in results]


def parse_oasst(rows: list[Row]) -> list[Parsed]:
    """OpenAssistant oasst1 message table: ranked assistant siblings (rank 0 best) -> every (better, worse) pair.
    Deleted messages are left out of the ranking; every message's path to its root is checked."""
    tree, results, rank = {}, {}, {}
    for where, m in rows:
        mid = m.get("message_id") if isinstance(m, dict) else None
        p = Parsed(f"{where} (message_id={mid})")
        if not isinstance(mid, str) or m.get("role") not in ("prompter", "assistant") or not isinstance(
                m.get("text"), str):
            p.error = "needs message_id, role prompter/assistant and a string text"
        elif mid in tree:
            p.error = f"duplicate message_id {mid!r}"
        else:
            tree[mid] = (m.get("parent_id"), "user" if m["role"] == "prompter" else "assistant", m["text"])
            if m["role"] == "assistant" and isinstance(m.get("rank"), int):
                if m.get("deleted"):
                    p.dropped.append("deleted message")
                else:
                    rank[mid] = m["rank"]
        results[mid if p.error is None else f"\0{where}"] = p
    parent_of = _parents(tree)
    for mid in tree:
        try:
            path_to_root(parent_of, mid)
        except RecordError as e:
            results[mid].error = str(e)
    groups = defaultdict(list)
    for mid, r in rank.items():
        if results[mid].error is None:
            groups[tree[mid][0]].append((mid, r))
    for parent, order in groups.items():
        if parent is None or results.get(parent) is None or results[parent].error:
            continue
        prompt = _path_messages(tree, parent_of, parent)
        for win, lose in _ranked_pairs(order):
            win_msg, lose_msg = _msg("assistant", tree[win][2]), _msg("assistant", tree[lose][2])
            results[win].pairs.append(_pair(prompt, win_msg, lose_msg)[1])
    return list(results.values())


def parse_thumbs(rows: list[Row]) -> list[Parsed]:
    """Plain thumbs records, and LibreChat message documents (rows with a messageId) as one message tree."""
    librechat = [(w, o) for w, o in rows if isinstance(o, dict) and "messageId" in o]
    plain = [(w, o) for w, o in rows if not (isinstance(o, dict) and "messageId" in o)]
    return _per_record(thumbs_record)(plain) + (parse_librechat(librechat) if librechat else [])


# ------------------------------------------------------------------------------------------- detection, dispatch
PARSERS: dict[str, Callable[[list[Row]], list[Parsed]]] = {
    "openwebui": parse_openwebui,
    "thumbs": parse_thumbs,
    "hh": _per_record(hh_record),
    "ultrafeedback": _per_record(preference_record),
    "shp": _per_record(shp_record),
    "arena": _per_record(arena_record),
    "oasst": parse_oasst,
    "argilla": _per_record(argilla_record),
    "labelstudio": _per_record(labelstudio_record),
    "summarize": _per_record(summarize_record),
    "trl": _per_record(trl_record),
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
            keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            unknown.append((None, Parsed(where, error=f"cannot tell the format of this record (keys {keys}); "
                                                     f"pass --format")))
        else:
            groups[name].append((where, obj))
    return [(name, p) for name, group in groups.items() for p in PARSERS[name](group)] + unknown
