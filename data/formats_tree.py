"""Tree-shaped feedback exports: Open WebUI feedbacks, LibreChat messages, OpenAssistant oasst1 messages.

A tree parser needs every row of the file at once (a pair needs the sibling, a prompt needs its ancestors). Each
returns one Parsed per row; a row built from other rows lists their keys in `pair_uses` / `single_uses`, so the
report can count a context message as kept when a kept row uses it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from data.formats_base import (
    Parsed,
    RecordError,
    Row,
    get_dict,
    msg,
    number,
    pair,
    parse_thumb,
    path_to_root,
    single,
    tree_id,
    type_name,
)
from data.validate import normalize_tool_call

Tree = dict[str, tuple[str | None, str, list[dict]]]  # message id -> (parent id, role, messages it renders to)


def _parents(tree: Tree) -> dict[str, str | None]:
    return {k: v[0] for k, v in tree.items()}


def _path_messages(tree: Tree, parent_of: dict[str, str | None], leaf: str) -> list[dict]:
    """Messages from the root down to `leaf`."""
    return [m for node in path_to_root(parent_of, leaf) for m in tree[node][2]]


def _prompt_reply(tree: Tree, leaf: str, parent_of: dict | None = None) -> tuple[list[dict], list[dict]]:
    """(prompt, reply messages) for message `leaf`; the reply must be an assistant message."""
    parent_of = parent_of if parent_of is not None else _parents(tree)
    path_to_root(parent_of, leaf)  # a broken path is an error of the rated message
    if tree[leaf][1] != "assistant":
        raise RecordError(f"rated message {leaf!r} is a {tree[leaf][1]} message, not an assistant reply")
    parent = tree[leaf][0]
    return (_path_messages(tree, parent_of, parent) if parent is not None else []), tree[leaf][2]


# -------------------------------------------------------------------------------------------------- Open WebUI
@dataclass
class _Feedback:
    p: Parsed
    chat: str
    mid: str
    rating: bool | None
    tree: Tree
    annotated: dict[str, bool]
    time: tuple
    arena: bool


def _time(*values: Any) -> float:
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
            return float(v)
    return float("-inf")


def _openwebui_feedback(fb: Any, p: Parsed, index: int) -> _Feedback:
    """Validate one FeedbackModel and read its chat snapshot (snapshot.chat.chat.history.messages)."""
    if not isinstance(fb, dict):
        raise RecordError(f"expected a JSON object, got {type_name(fb)}")
    meta, data = get_dict(fb, "meta"), get_dict(fb, "data")
    chat = get_dict(get_dict(fb, "snapshot"), "chat", "snapshot.chat")
    inner = chat.get("chat") if isinstance(chat.get("chat"), dict) else chat  # snapshot.chat.chat.history (README)
    messages = get_dict(inner, "history", "snapshot.chat.chat.history").get("messages")
    if not isinstance(messages, dict):
        raise RecordError("no snapshot.chat.chat.history.messages object")
    mid = meta.get("message_id")
    if not isinstance(mid, str):
        raise RecordError("meta.message_id is missing")
    rating = data.get("rating")
    rating = None if rating is None or rating == 0 or rating == "0" or rating == "" else parse_thumb(rating)
    tree, annotated = {}, {}
    for key, m in messages.items():
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(
                m.get("content"), str):
            raise RecordError(f"message {key!r} needs role system/user/assistant and a string content")
        tree[key] = (tree_id(m.get("parentId"), f"message {key!r} parentId"), m["role"], [msg(m["role"], m["content"])])
        note = m.get("annotation")
        if isinstance(note, dict) and note.get("rating") in (1, -1, "1", "-1") and not isinstance(note["rating"], bool):
            annotated[key] = parse_thumb(note["rating"])
    if mid not in tree:
        raise RecordError(f"rated message {mid!r} is not in the snapshot")
    chat_id = tree_id(chat.get("id") or meta.get("chat_id") or None, "snapshot.chat.id")
    return _Feedback(p, chat_id if chat_id is not None else "\0" + p.key, mid, rating, tree, annotated,
                     (_time(chat.get("updated_at")), _time(fb.get("updated_at"), fb.get("created_at")), index),
                     meta.get("arena") is True)


def parse_openwebui(rows: list[Row]) -> list[Parsed]:
    """Open WebUI feedback export: each feedback rates meta.message_id inside its chat snapshot.

    Every rating -> single (positives also become SFT later), from the feedback's own snapshot. Pairs: a rated
    reply and a sibling reply (same parentId) with the opposite rating, from any feedback of the export (the newest
    wins when a message was rated twice) or, failing that, the sibling's annotation in the newest snapshot; in arena
    mode (meta.arena) an unrated sibling lost when the rating is +1 and won when it is -1, as Open WebUI's own
    leaderboard counts it. A user who rates, regenerates, then rates again leaves two snapshots: each pair comes
    from the NEWEST snapshot that holds both siblings, whichever feedback record carries it, and is emitted once.
    """
    out, fbs = [], []
    for index, (where, fb) in enumerate(rows):
        fid = fb.get("id") if isinstance(fb, dict) else None
        p = Parsed(f"{where} (feedback id={str(fid)[:60]})", key=where)
        out.append(p)
        try:
            f = _openwebui_feedback(fb, p, index)
            if f.rating is None:
                p.add("drop", "no thumbs rating")
            else:
                prompt, reply = _prompt_reply(f.tree, f.mid)
                p.add("single", single(prompt, reply, f.rating))
            fbs.append(f)
        except RecordError as e:
            p.fail(str(e))
    _openwebui_pairs([f for f in fbs if f.p.error is None])
    return out


def _openwebui_pairs(fbs: list[_Feedback]) -> None:
    by_time = sorted(fbs, key=lambda f: f.time)
    rated: dict[tuple[str, str], tuple[bool, str]] = {}  # (chat, message) -> (rating, key of the feedback)
    annotated: dict[tuple[str, str], bool] = {}
    for f in by_time:  # newest last, so it wins
        annotated.update({(f.chat, m): r for m, r in f.annotated.items()})
    for f in by_time:
        if f.rating is not None:
            rated[(f.chat, f.mid)] = (f.rating, f.p.key)
    snapshots = defaultdict(list)  # chat -> feedbacks, newest first
    for f in reversed(by_time):
        snapshots[f.chat].append(f)
    done = set()
    for f in fbs:
        if f.rating is None or rated[(f.chat, f.mid)][1] != f.p.key:
            continue  # unrated, or this message was rated again in a newer feedback
        parent = f.tree[f.mid][0]
        siblings = dict.fromkeys(s for g in snapshots[f.chat] for s, (par, role, _) in g.tree.items()
                                 if s != f.mid and par == parent and role == "assistant")
        for sib in siblings:
            other, other_key = rated.get((f.chat, sib), (annotated.get((f.chat, sib)), None))
            if other is None and f.arena:
                other = not f.rating
            if other is None or other == f.rating:
                continue
            win, lose = (f.mid, sib) if f.rating else (sib, f.mid)
            if (f.chat, win, lose) in done:
                continue
            done.add((f.chat, win, lose))
            uses = {f.p.key} | ({other_key} if other_key else set())
            _emit_openwebui_pair(snapshots[f.chat], parent, win, lose, uses)


def _emit_openwebui_pair(snapshots: list[_Feedback], parent: str | None, win: str, lose: str, uses: set[str]) -> None:
    """Put the pair on the feedback whose snapshot is the newest to hold both replies under `parent`."""
    for g in snapshots:  # newest first
        if all(g.tree.get(m, (0,))[0] == parent and g.tree[m][1] == "assistant" for m in (win, lose)):
            try:
                prompt, chosen = _prompt_reply(g.tree, win)
                rejected = g.tree[lose][2]
            except RecordError:
                continue  # this snapshot's path is broken (reported with its own record); try an older one
            g.p.add("pair", pair(prompt, chosen, rejected), tuple(sorted(uses - {g.p.key})))
            return


# --------------------------------------------------------------------------------------------------- LibreChat
_LIBRECHAT_NO_PARENT = "00000000-0000-0000-0000-000000000000"


def _librechat_part_text(part: dict) -> str:
    text = part.get("text")
    if isinstance(text, dict):  # assistants-API style {"value": ...}
        text = text.get("value")
    return text if isinstance(text, str) else ""


def _librechat_messages(m: dict, role: str, mid: str) -> list[dict]:
    """The messages one LibreChat message renders to: its text, or its content parts, where each "tool_call" part
    becomes an assistant tool call followed by a tool message with its output."""
    if isinstance(m.get("text"), str) and m["text"]:
        return [msg(role, m["text"])]
    parts = m.get("content")
    if not isinstance(parts, list):
        raise RecordError(f"message {mid!r} has no text")
    out, text = [], []
    for part in parts:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "tool_call" and role == "assistant":
            tc = get_dict(part, "tool_call", "content[].tool_call")
            call = normalize_tool_call({"name": tc.get("name"), "arguments": tc.get("args", {})},
                                       f"message {mid!r} tool_call")
            out.append({"role": "assistant", "content": "".join(text), "tool_calls": [call]})
            output = tc.get("output")
            out.append(msg("tool", output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)))
            text = []
        elif part.get("type", "text") == "text":
            text.append(_librechat_part_text(part))
    if text or not out:
        out.append(msg(role, "".join(text)))
    return out


def _librechat_row(m: Any, tree: Tree, ratings: dict[str, bool]) -> str:
    """Validate one message document and add it to the tree; returns its id."""
    if not isinstance(m, dict) or not isinstance(m.get("messageId"), str):
        raise RecordError("expected a message object with a string messageId")
    mid = m["messageId"]
    if mid in tree:
        raise RecordError(f"duplicate messageId {mid!r}")
    parent = tree_id(m.get("parentMessageId"), "parentMessageId")
    role = "user" if m.get("isCreatedByUser") is True else "assistant"
    tree[mid] = (None if parent == _LIBRECHAT_NO_PARENT else parent, role, _librechat_messages(m, role, mid))
    if m.get("feedback") is not None:
        ratings[mid] = parse_thumb(get_dict(m, "feedback").get("rating"))
    return mid


def parse_librechat(rows: list[Row]) -> list[Parsed]:
    """LibreChat messages collection: rated messages (feedback.rating thumbsUp/thumbsDown) -> singles; regenerated
    siblings (same parentMessageId) rated oppositely -> pairs. The input must hold the whole conversation: a rated
    message whose parent is missing is an error (export all messages, not only the rated ones)."""
    tree: Tree = {}
    results, ratings = [], {}
    for where, m in rows:
        mid = m.get("messageId") if isinstance(m, dict) else None
        p = Parsed(f"{where} (messageId={str(mid)[:60]})", key=where)
        try:
            mid = _librechat_row(m, tree, ratings)
        except RecordError as e:
            p.fail(str(e))
            mid = None
        results.append((mid, p))
    parent_of = _parents(tree)
    key_of = {mid: p.key for mid, p in results if p.error is None}
    for mid, p in results:
        if p.error or mid not in ratings:
            continue
        try:
            prompt, reply = _prompt_reply(tree, mid, parent_of)
        except RecordError as e:
            p.fail(str(e))
            continue
        context = tuple(key_of[n] for n in path_to_root(parent_of, mid)[:-1])
        p.add("single", single(prompt, reply, ratings[mid]), context)
        for sib, (parent, role, content) in tree.items():
            if ratings[mid] and parent == tree[mid][0] and role == "assistant" and ratings.get(sib) is False:
                p.add("pair", pair(prompt, reply, content), context + (key_of[sib],))
    return [p for _, p in results]


# ------------------------------------------------------------------------------------------------------- OASST
def _oasst_row(m: Any, tree: Tree, rank: dict[str, float], p: Parsed) -> str:
    if not isinstance(m, dict):
        raise RecordError(f"expected a JSON object, got {type_name(m)}")
    mid, role, text = m.get("message_id"), m.get("role"), m.get("text")
    if not isinstance(mid, str) or role not in ("prompter", "assistant") or not isinstance(text, str):
        raise RecordError("needs message_id, role prompter/assistant and a string text")
    if mid in tree:
        raise RecordError(f"duplicate message_id {mid!r}")
    parent = tree_id(m.get("parent_id"), "parent_id")
    r = m.get("rank")
    if role == "assistant" and r is not None:
        r = number(r, "rank")
    tree[mid] = (parent, "user" if role == "prompter" else "assistant", [msg("user" if role == "prompter" else
                                                                              "assistant", text)])
    if role == "assistant" and r is not None:
        if m.get("deleted") is True:
            p.add("drop", "deleted message")
        else:
            rank[mid] = r
    return mid


def parse_oasst(rows: list[Row]) -> list[Parsed]:
    """OpenAssistant oasst1 message table: ranked assistant siblings (rank 0 best) -> every (better, worse) pair.
    Deleted messages are left out of the ranking; every message's path to its root is checked."""
    tree: Tree = {}
    results: dict[str, Parsed] = {}
    rank: dict[str, float] = {}
    order = []
    for where, m in rows:
        mid = m.get("message_id") if isinstance(m, dict) else None
        p = Parsed(f"{where} (message_id={str(mid)[:60]})", key=where)
        order.append(p)
        try:
            results[_oasst_row(m, tree, rank, p)] = p
        except RecordError as e:
            p.fail(str(e))
    parent_of = _parents(tree)
    for mid in tree:
        try:
            path_to_root(parent_of, mid)
        except RecordError as e:
            results[mid].fail(str(e))
            rank.pop(mid, None)
    groups = defaultdict(list)
    for mid, r in rank.items():
        groups[tree[mid][0]].append((mid, r))
    for parent, ranked in groups.items():
        if parent is None or results[parent].error:
            continue
        context = tuple(results[n].key for n in path_to_root(parent_of, parent))
        prompt = _path_messages(tree, parent_of, parent)
        for win, lose in [(x, y) for x, rx in ranked for y, ry in ranked if rx < ry]:
            results[win].add("pair", pair(prompt, tree[win][2], tree[lose][2]), context + (results[lose].key,))
    return order

