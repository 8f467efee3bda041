"""Format parsers against the faithful samples in tests/fixtures/formats/ (copied from ../shared/formats/) and malformed variants of them."""

import copy
import json
import os
from pathlib import Path

import pytest

from data.formats import RecordError, detect_format, parse_rows, parse_thumb, path_to_root, split_hh
from data.io import read_rows

FORMATS = str(Path(__file__).parent / "fixtures" / "formats")  # copies of ../shared/formats


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def sample_rows(name):
    rows = [(w, o) for w, o, err in read_rows(os.path.join(FORMATS, name))]
    assert rows, name
    return rows


def parse_sample(name, fmt="auto"):
    return parse_rows(sample_rows(name), fmt)


def only(parsed):
    """The single Parsed of a one-record input, checked to be error-free."""
    assert len(parsed) == 1, parsed
    assert parsed[0][1].error is None, parsed[0][1].error
    return parsed[0][1]


def test_hh_sample():
    p = only(parse_sample("hh_rlhf.jsonl"))
    assert p.pairs == [{"prompt": [u("How do I boil an egg?")],
                        "chosen": [a("Put the egg in boiling water for about 9 minutes, then cool it in cold water.")],
                        "rejected": [a("I don't know.")]}]


def test_split_hh_multi_turn_and_errors():
    assert split_hh("\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ok?\n\nAssistant: ", "chosen") == [
        u("hi"), a("yo"), u("ok?"), a("")]
    with pytest.raises(RecordError, match="does not start with"):
        split_hh("Human: hi\n\nAssistant: yo", "chosen")
    with pytest.raises(RecordError, match="no final '\\\\n\\\\nAssistant:' turn"):
        split_hh("\n\nHuman: hi", "rejected")
    with pytest.raises(RecordError, match="must be a string, got int"):
        split_hh(3, "chosen")


def test_hh_malformed_and_divergent_rows():
    rows = [("f:1", {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: no"}),
            ("f:2", {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}),
            ("f:3", ["not", "a", "dict"])]
    out = [p for _, p in parse_rows(rows, "hh")]
    assert out[0].error == "chosen has no final '\\n\\nAssistant:' turn" and out[0].where == "f:1"
    assert out[1].error is None and out[1].pairs == [] and out[1].dropped == [
        "chosen and rejected dialogues differ before the final reply"]
    assert out[2].error == "expected a JSON object, got list"


def test_ultrafeedback_sample_and_tie():
    p = only(parse_sample("ultrafeedback_binarized.jsonl"))
    assert p.pairs == [{"prompt": [u("Name a prime number.")], "chosen": [a("7 is a prime number.")],
                        "rejected": [a("9.")]}]
    obj = dict(sample_rows("ultrafeedback_binarized.jsonl")[0][1], score_rejected=9.0)
    assert only(parse_rows([("f:1", obj)])).dropped == ["tie"]


def test_shp_sample_higher_score_wins_and_equal_dropped():
    (where, obj), = sample_rows("shp.jsonl")
    p = only(parse_rows([(where, obj)]))
    assert p.pairs[0]["chosen"] == [a("Your water was probably too hot.")]  # score_A 340 > score_B 166
    swapped = dict(obj, score_A=1, score_B=2)
    assert only(parse_rows([("f:1", swapped)])).pairs[0]["chosen"] == [a("Try a warmer room.")]
    assert only(parse_rows([("f:1", dict(obj, score_B=340))])).dropped == ["equal scores"]
    bad = parse_rows([("f:1", dict(obj, score_A="340"))])[0][1]
    assert bad.error == "score_A and score_B must be finite numbers, got '340' and 166"
    nan = parse_rows([("f:1", dict(obj, score_B=float("nan")))])[0][1]  # NaN used to make B the winner
    assert nan.error == "score_A and score_B must be finite numbers, got 340 and nan" and nan.pairs == []


def test_arena_sample_ties_and_bad_winner():
    (where, obj), = sample_rows("lmsys_arena.jsonl")
    p = only(parse_rows([(where, obj)]))
    assert p.pairs == [{"prompt": [u("Say hi")], "chosen": [a("Hi! How can I help?")], "rejected": [a("hello")]}]
    assert only(parse_rows([("f", dict(obj, winner="model_b"))])).pairs[0]["chosen"] == [a("hello")]
    assert only(parse_rows([("f", dict(obj, winner="tie"))])).dropped == ["tie"]
    assert only(parse_rows([("f", dict(obj, winner="tie (bothbad)"))])).dropped == ["tie (bothbad)"]
    assert "winner must be" in parse_rows([("f", dict(obj, winner="model_c"))])[0][1].error
    multi = dict(obj, conversation_a=obj["conversation_a"] + [u("more"), a("x")],
                 conversation_b=obj["conversation_b"] + [u("more"), a("y")])
    assert only(parse_rows([("f", multi)])).dropped == ["multi-turn battle (dialogues differ before the final reply)"]


def test_summarize_sample_prompt_format():
    p = only(parse_sample("summarize_from_feedback_comparisons.jsonl"))
    assert p.pairs[0]["prompt"][0]["content"] == ("SUBREDDIT: r/relationships\n\nTITLE: How do I remember birthdays?"
                                                  "\n\nPOST: I (24F) keep forgetting ...\n\nTL;DR:")
    assert p.pairs[0]["chosen"] == [a("I forget birthdays, need a system.")]  # choice 0, leading space removed
    obj = sample_rows("summarize_from_feedback_comparisons.jsonl")[0][1]
    assert parse_rows([("f", dict(obj, choice=2))])[0][1].error == "choice must be 0 or 1, got 2"
    no_title = dict(obj, info={k: v for k, v in obj["info"].items() if k != "title"})  # used to become "TITLE: None"
    assert parse_rows([("f", no_title)])[0][1].error == "field 'info.title' must be a string, got null"


def test_argilla_and_labelstudio_sample_mixed_in_one_file():
    out = parse_sample("argilla_labelstudio.jsonl")
    assert [name for name, _ in out] == ["argilla", "labelstudio"]
    want = [{"prompt": [u("Name a prime")], "chosen": [a("7")], "rejected": [a("9")]}]
    assert [p.pairs for _, p in out] == [want, want]


def test_argilla_disagreement_pending_and_bad_field():
    obj = sample_rows("argilla_labelstudio.jsonl")[0][1]
    two = dict(obj, **{"preference.responses": obj["preference.responses"] + [[{"value": "response1", "rank": 2},
                                                                               {"value": "response2", "rank": 1}]],
                       "preference.responses.status": ["submitted", "submitted"]})
    assert only(parse_rows([("f", two)])).dropped == ["annotators disagree"]
    assert only(parse_rows([("f", dict(obj, status="pending"))])).dropped == ["not completed"]
    bad = dict(obj, **{"preference.responses": [[{"value": "response3", "rank": 1}, {"value": "response2", "rank": 2}]]})
    assert "ranking names field 'response3'" in parse_rows([("f", bad)])[0][1].error


def test_labelstudio_right_selected_and_cancelled():
    obj = sample_rows("argilla_labelstudio.jsonl")[1][1]
    right = copy.deepcopy(obj)
    right["annotations"][0]["result"][0]["value"]["selected"] = "right"
    assert only(parse_rows([("f", right)])).pairs[0]["chosen"] == [a("9")]
    cancelled = copy.deepcopy(obj)
    cancelled["annotations"][0]["was_cancelled"] = True
    assert only(parse_rows([("f", cancelled)])).dropped == ["no pairwise annotation"]


def test_trl_sample_all_four_types():
    out = [p for _, p in parse_sample("trl_formats.jsonl")]
    assert [len(p.pairs) for p in out] == [1, 1, 0, 0] and [len(p.singles) for p in out] == [0, 0, 1, 1]
    assert out[0].pairs[0] == {"prompt": [u("The sky is")], "chosen": [a(" blue.")], "rejected": [a(" green.")]}
    assert out[3].singles[0] == {"prompt": [u("What color is the sky?")], "completion": [a("It is green.")],
                                 "label": False}
    err = parse_rows([("f", {"chosen": "The sky is blue.", "rejected": "The sky is green."})], "trl")[0][1].error
    assert "cannot tell the prompt from the reply" in err
    assert "no feedback in this record" in parse_rows([("f", {"prompt": "hi"})], "trl")[0][1].error


@pytest.mark.parametrize("value,want", [(1, True), (-1, False), (0, False), (True, True), (False, False),
                                        ("up", True), ("down", False), ("thumbs_up", True), ("thumbsDown", False),
                                        ("+1", True), ("Thumbs-Up", True)])
def test_parse_thumb(value, want):
    assert parse_thumb(value) is want


@pytest.mark.parametrize("value", [5, 0.5, "meh", None, [1]])
def test_parse_thumb_rejects(value):
    with pytest.raises(RecordError, match="is not a thumbs value"):
        parse_thumb(value)


def test_plain_thumbs_messages_and_prompt_completion():
    rows = [("f:1", {"messages": [u("q"), a("r")], "rating": "thumbs_up"}),
            ("f:2", {"prompt": "q", "completion": "r", "rating": -1}),
            ("f:3", {"messages": [u("q")], "label": 1}),
            ("f:4", {"messages": "q", "rating": 1})]
    out = [p for _, p in parse_rows(rows)]
    assert out[0].singles == [{"prompt": [u("q")], "completion": [a("r")], "label": True}]
    assert out[1].singles == [{"prompt": [u("q")], "completion": [a("r")], "label": False}]
    assert out[2].error == "the rated conversation must end with an assistant reply"
    assert out[3].error == "field 'messages' must be a non-empty list of messages, got str"


def test_librechat_sample_needs_its_parent_then_imports():
    p = parse_sample("librechat_message_feedback.jsonl")[0][1]
    assert p.error == "message 'a1' has parent 'u1', which is not in the input" and "messageId=a1" in p.where
    rows = [("f:0", {"messageId": "u1", "parentMessageId": "00000000-0000-0000-0000-000000000000",
                     "isCreatedByUser": True, "text": "Capital of France?"})] + sample_rows(
        "librechat_message_feedback.jsonl")
    out = [p for _, p in parse_rows(rows)]
    assert [p.error for p in out] == [None, None]
    assert out[1].singles == [{"prompt": [u("Capital of France?")], "completion": [a("Paris.")], "label": False}]


def test_oasst_sample_and_three_ranked_siblings():
    out = [p for _, p in parse_sample("oasst1_messages.jsonl")]
    assert [len(p.pairs) for p in out] == [0, 1, 0]
    assert out[1].pairs[0] == {"prompt": [u("What is RLHF?")],
                               "chosen": [a("Reinforcement learning from human feedback ...")], "rejected": [a("idk")]}
    rows = sample_rows("oasst1_messages.jsonl")
    third = dict(rows[2][1], message_id="m3", rank=2, text="no idea")
    out = [p for _, p in parse_rows(rows + [("f:4", third)])]
    assert sorted((p["chosen"][0]["content"][:3], p["rejected"][0]["content"]) for q in out for p in q.pairs) == [
        ("Rei", "idk"), ("Rei", "no idea"), ("idk", "no idea")]  # ranks 0 < 1 < 2: all three ordered pairs


def test_oasst_cycle_and_missing_parent():
    rows = sample_rows("oasst1_messages.jsonl")
    cyc = [(w, dict(o, parent_id="m1") if o["message_id"] == "m0" else o) for w, o in rows]
    out = [p for _, p in parse_rows(cyc)]
    assert all("cycle in the message tree at message" in p.error for p in out)
    missing = [(w, dict(o, parent_id="gone") if o["message_id"] == "m0" else o) for w, o in rows]
    errs = [p.error for _, p in parse_rows(missing)]
    assert errs[0] == "message 'm0' has parent 'gone', which is not in the input"
    assert all(e is not None for e in errs) and not any(p.pairs for _, p in parse_rows(missing))


def _openwebui():
    with open(os.path.join(FORMATS, "openwebui_feedbacks_export.json")) as f:
        return json.load(f)


def _history(fb):
    return fb["snapshot"]["chat"]["chat"]["history"]["messages"]


def test_openwebui_sample_arena_pair_single():
    p = only(parse_sample("openwebui_feedbacks_export.json"))
    prompt = [u("What is the capital of France?")]
    assert p.singles == [{"prompt": prompt, "completion": [a("Paris.")], "label": True}]
    assert p.pairs == [{"prompt": prompt, "chosen": [a("Paris.")], "rejected": [a("The capital of France is Lyon.")]}]
    assert "feedback id=3f2b7c1e" in p.where


def test_openwebui_thumbs_down_and_opposite_sibling_ratings_give_one_pair():
    fb = _openwebui()[0]
    down = copy.deepcopy(fb)
    down.update(id="fb-2", data=dict(fb["data"], rating=-1), meta=dict(fb["meta"], message_id="m-asst-2"))
    out = [p for _, p in parse_rows([("x[0]", fb), ("x[1]", down)])]
    assert [len(p.pairs) for p in out] == [0, 1]  # once, from the newest snapshot (equal times: the later record)
    assert out[1].pair_uses == [("x[0]",)]  # built from the other feedback's rating too
    assert out[1].singles[0]["label"] is False and out[1].singles[0]["completion"] == [a("The capital of France is Lyon.")]
    no_arena = copy.deepcopy(fb)
    no_arena["meta"]["arena"] = False
    assert only(parse_rows([("x", no_arena)])).pairs == []  # unrated sibling, not arena: no preference


def test_openwebui_cycle_and_missing_parent_name_feedback_and_message():
    cyc = copy.deepcopy(_openwebui()[0])
    _history(cyc)["m-user-1"]["parentId"] = "m-asst-1"
    p = parse_rows([("x[0]", cyc)])[0][1]
    assert p.error == "cycle in the message tree at message 'm-asst-1'"
    assert p.where == "x[0] (feedback id=3f2b7c1e-9a4d-4c1e-8f7a-2d5e6b9c0a11)"
    gone = copy.deepcopy(_openwebui()[0])
    _history(gone)["m-user-1"]["parentId"] = "m-missing"
    assert parse_rows([("x[0]", gone)])[0][1].error == (
        "message 'm-user-1' has parent 'm-missing', which is not in the input")
    user_rated = copy.deepcopy(_openwebui()[0])
    user_rated["meta"]["message_id"] = "m-user-1"
    assert "is a user message, not an assistant reply" in parse_rows([("x", user_rated)])[0][1].error


def test_path_to_root():
    assert path_to_root({"a": None, "b": "a", "c": "b"}, "c") == ["a", "b", "c"]
    with pytest.raises(RecordError, match="message 'x' is not in the input"):
        path_to_root({}, "x")


def test_detect_format_and_unknown_record():
    assert detect_format({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}) == "hh"
    assert detect_format({"prompt": "p", "completion": "c", "label": True}) == "trl"
    assert detect_format({"messages": [], "rating": 1}) == "thumbs"
    assert detect_format([1]) is None
    p = parse_rows([("f:7", {"foo": 1})])[0][1]
    assert p.error == "cannot tell the format of this record (keys ['foo']); pass --format" and p.where == "f:7"
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        parse_rows([], "xml")


def test_openwebui_single_nested_snapshot_also_read():
    """Some exports put history directly under snapshot.chat (no inner chat object); the same pair comes out."""
    fb = _openwebui()[0]
    fb["snapshot"]["chat"] = fb["snapshot"]["chat"]["chat"]
    assert only(parse_rows([("x", fb)])).pairs[0]["rejected"] == [a("The capital of France is Lyon.")]
    del fb["snapshot"]["chat"]["history"]
    assert parse_rows([("x", fb)])[0][1].error == "no snapshot.chat.chat.history.messages object"


def test_librechat_regenerated_siblings_rated_oppositely_give_a_pair():
    rows = [("f:1", {"messageId": "u", "parentMessageId": None, "isCreatedByUser": True, "text": "2+2?"}),
            ("f:2", {"messageId": "r1", "parentMessageId": "u", "text": "4", "feedback": {"rating": "thumbsUp"}}),
            ("f:3", {"messageId": "r2", "parentMessageId": "u", "text": "5", "feedback": {"rating": "thumbsDown"}})]
    out = [p for _, p in parse_rows(rows)]
    assert [len(p.pairs) for p in out] == [0, 1, 0] and [len(p.singles) for p in out] == [0, 1, 1]
    assert out[1].pairs[0] == {"prompt": [u("2+2?")], "chosen": [a("4")], "rejected": [a("5")]}


def _regenerated(arena=False, annotate_first=True):
    """Rate reply 1 (+1), regenerate reply 2, rate it (-1): two feedbacks; the first snapshot lacks reply 2."""
    first = copy.deepcopy(_openwebui()[0])
    first["meta"]["arena"] = arena
    hist = _history(first)
    del hist["m-asst-2"]
    hist["m-user-1"]["childrenIds"] = ["m-asst-1"]
    first["snapshot"]["chat"].update(updated_at=100)
    first.update(id="fb-1", created_at=110, updated_at=110)
    second = copy.deepcopy(_openwebui()[0])
    second["meta"].update(arena=arena, message_id="m-asst-2")
    second.update(id="fb-2", data=dict(second["data"], rating=-1), created_at=210, updated_at=210)
    second["snapshot"]["chat"].update(updated_at=200)
    _history(second)["m-asst-2"]["annotation"] = {"rating": -1}
    if not annotate_first:
        del _history(second)["m-asst-1"]["annotation"]
    return first, second


@pytest.mark.parametrize("annotate_first", [True, False])
@pytest.mark.parametrize("order", ["rate-regenerate-rate", "reversed"])
def test_openwebui_rate_regenerate_rate_gives_one_pair_from_the_newest_snapshot(order, annotate_first):
    """The pair comes from feedback 2's snapshot (the only one holding both replies) in both file orders; reply 1's
    rating is taken from feedback 1 when feedback 2's snapshot does not carry its annotation."""
    first, second = _regenerated(annotate_first=annotate_first)
    rows = [("x[0]", first), ("x[1]", second)] if order != "reversed" else [("x[0]", second), ("x[1]", first)]
    out = {p.key: p for _, p in parse_rows(rows)}
    carrier = out["x[1]" if order != "reversed" else "x[0]"]
    other = out["x[0]" if order != "reversed" else "x[1]"]
    want = {"prompt": [u("What is the capital of France?")], "chosen": [a("Paris.")],
            "rejected": [a("The capital of France is Lyon.")]}
    assert carrier.pairs == [want] and other.pairs == []
    assert carrier.pair_uses == [(other.key,)]
    assert [s["label"] for s in other.singles + carrier.singles] == [True, False]


def test_openwebui_second_feedback_alone_and_same_ratings():
    first, second = _regenerated()
    assert only(parse_rows([("x", second)])).pairs[0]["chosen"] == [a("Paris.")]  # from the annotation
    first, second = _regenerated(annotate_first=False)
    assert only(parse_rows([("x", second)])).pairs == []  # nothing says how reply 1 was rated
    second["data"]["rating"] = 1  # both liked: no preference
    assert all(p.pairs == [] for _, p in parse_rows([("a", first), ("b", second)]))


def test_openwebui_rerated_message_uses_the_newest_feedback():
    """Reply 1 first rated +1, later -1 (a newer feedback on the same message); reply 2 rated +1 -> Lyon wins."""
    first, second = _regenerated(annotate_first=False)
    again = copy.deepcopy(second)
    again["meta"]["message_id"] = "m-asst-1"
    again.update(id="fb-3", data=dict(again["data"], rating=-1), created_at=310, updated_at=310)
    again["snapshot"]["chat"]["updated_at"] = 300
    second["data"]["rating"] = 1
    pairs = [q for _, p in parse_rows([("a", first), ("b", second), ("c", again)]) for q in p.pairs]
    assert pairs == [{"prompt": [u("What is the capital of France?")], "chosen": [a("The capital of France is Lyon.")],
                      "rejected": [a("Paris.")]}]


def test_librechat_tool_call_parts_become_tool_messages():
    """A rated agent reply whose content parts are text, a tool call with its output, and text: the reply keeps the
    call (arguments parsed from LibreChat's JSON string) and the tool result as messages."""
    rows = [("f:1", {"messageId": "u1", "parentMessageId": None, "isCreatedByUser": True, "text": "Capital?"}),
            ("f:2", {"messageId": "a1", "parentMessageId": "u1", "text": "", "feedback": {"rating": "thumbsUp"},
                     "content": [{"type": "text", "text": "Let me look. "},
                                 {"type": "tool_call", "tool_call": {"name": "search", "args": '{"q": "capital"}',
                                                                     "output": "Paris"}},
                                 {"type": "think", "think": "not shown"}, {"type": "text", "text": "It is Paris."}]})]
    out = [p for _, p in parse_rows(rows)]
    assert out[1].singles == [{"prompt": [u("Capital?")], "label": True, "completion": [
        {"role": "assistant", "content": "Let me look. ",
         "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"q": "capital"}}}]},
        {"role": "tool", "content": "Paris"}, a("It is Paris.")]}]
    assert out[1].single_uses == [("f:1",)]
    dup = parse_rows(rows + [("f:3", rows[0][1])])
    assert [p.error for _, p in dup][2] == "duplicate messageId 'u1'"


def test_tool_calls_kept_in_message_formats():
    """OpenAI / TRL tool-calling messages: content may be missing, arguments a JSON string (parsed), tools kept."""
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    rec = {"messages": [u("Time?"), {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"}, a("Noon.")], "rating": 1, "tools": tools}
    p = only(parse_rows([("f:1", rec)]))
    call = {"type": "function", "function": {"name": "get_time", "arguments": {}}}
    assert p.singles == [{"prompt": [u("Time?"), {"role": "assistant", "content": "", "tool_calls": [call]},
                                     {"role": "tool", "content": "12:00"}],
                          "completion": [a("Noon.")], "label": True, "tools": tools}]
    bad = dict(rec, messages=[u("x"), {"role": "user", "content": "y", "tool_calls": [{}]}, a("z")])
    assert parse_rows([("f:2", bad)])[0][1].error == "messages[1] has tool_calls but role 'user' (only assistant " \
                                                    "messages call tools)"
    deep = {"function": {"name": "f", "arguments": json.loads('{"a": ' * 70 + "1" + "}" * 70)}}
    bad = dict(rec, messages=[u("x"), {"role": "assistant", "tool_calls": [deep]}])
    assert "nested deeper than 64 levels" in parse_rows([("f:3", bad)])[0][1].error
