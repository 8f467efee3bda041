"""Fuzzing data.feedback with broken and odd exports, all in ONE command next to the good samples.

Generated inputs (over a thousand records, ~30 files): every field of every format sample replaced by values of the
wrong JSON type (and deleted), one at a time; plus files with a BOM, CRLF, UTF-16, a damaged .jsonl.gz and
.json.gz, NaN / Infinity, null lines, an over-long line, duplicate keys, ratings as strings, lone surrogates, deep
nesting, invalid UTF-8, an empty file, a folder, a missing path, special-token text, tool calls, identical and
multi-message replies. Asserted: no traceback (main returns), read = kept + dropped + malformed per file and in
total, every row the good samples give alone is still written, every malformed record is named by file:line or
file[index], no row fails the trainers' validation, and every output loads through each trainer's data path.
A 3-million-character reply is imported in a subprocess whose peak RSS is measured.
"""

import copy
import gzip
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data.datasets import (
    build_preference_examples,
    build_prompt_examples,
    build_sft_examples,
    build_unpaired_examples,
    load_records,
)
from data.feedback import main

FORMATS = Path(__file__).parent / "fixtures" / "formats"
GOOD = sorted(str(p) for p in FORMATS.glob("*.json*"))
WRONG = [None, 0, -1, 2.5, float("nan"), float("inf"), True, "", "x", "<|im_start|>", [], [1], ["a"], {}, {"a": 1},
         [[[]]], {"role": "user"}, [{"role": "tool"}], "\ud800"]
DELETE = object()
MAX_LINE = 300_000


def load(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def sample(name):
    text = (FORMATS / name).read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]


def field_paths(obj, prefix=()):
    """Every path to a value inside obj."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from field_paths(v, prefix + (k,))


def mutated(obj, path, value):
    obj = copy.deepcopy(obj)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(value)
    return obj


def mutants(records, rng, per_path=3):
    """(index of the mutated record, mutant) for 3 wrong values (one may be a deletion) at every field path."""
    for i, rec in enumerate(records):
        for path in field_paths(rec):
            for value in rng.sample(WRONG + [DELETE], per_path):
                if value is DELETE and not isinstance(path[-1], str):
                    continue
                yield i, mutated(rec, path, value)


def renamed_tree(records, tag, keys):
    """A copy of a message tree whose ids (the given keys) get a prefix: independent trees in one file."""
    out = []
    for rec in copy.deepcopy(records):
        for k in keys:
            if isinstance(rec.get(k), str):
                rec[k] = f"{tag}-{rec[k]}"
        out.append(rec)
    return out


def dump_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:  # json.dumps writes NaN/Infinity and "\ud800" as such
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def build_fuzz_inputs(d: Path) -> tuple[list[str], int]:
    """The broken and odd input files; returns (paths, number of generated inputs)."""
    rng = random.Random(13)
    paths, n = [], 0
    for name in ["hh_rlhf.jsonl", "ultrafeedback_binarized.jsonl", "shp.jsonl", "lmsys_arena.jsonl",
                 "summarize_from_feedback_comparisons.jsonl", "argilla_labelstudio.jsonl", "trl_formats.jsonl"]:
        recs = [m for _, m in mutants(sample(name), rng)]
        paths.append(dump_jsonl(d / f"fuzz_{name}", recs))
        n += len(recs)
    # trees: each mutant is a whole tree of its own (ids prefixed), one message mutated
    oasst = sample("oasst1_messages.jsonl")
    trees = []
    for j, (i, m) in enumerate(mutants(oasst, rng)):
        tree = renamed_tree(oasst, f"t{j}", ["message_id", "parent_id", "message_tree_id"])
        tree[i] = renamed_tree([m], f"t{j}", ["message_id", "parent_id", "message_tree_id"])[0]
        trees += tree
        n += 1
    paths.append(dump_jsonl(d / "fuzz_oasst.jsonl", trees))
    chat = [{"messageId": "u1", "parentMessageId": None, "isCreatedByUser": True, "text": "Capital of France?"},
            sample("librechat_message_feedback.jsonl")[0],
            {"messageId": "a2", "parentMessageId": "u1", "text": "Lyon.", "feedback": {"rating": "thumbsDown"}},
            {"messageId": "a3", "parentMessageId": "u1", "feedback": {"rating": "thumbsUp"}, "text": "",
             "content": [{"type": "text", "text": "Let me look. "},
                         {"type": "tool_call", "tool_call": {"name": "search", "args": '{"q": "capital"}',
                                                             "output": "Paris"}},
                         {"type": "text", "text": "It is Paris."}]}]
    librechat = []
    for j, (i, m) in enumerate(mutants(chat, rng)):
        tree = renamed_tree(chat, f"t{j}", ["messageId", "parentMessageId"])
        tree[i] = renamed_tree([m], f"t{j}", ["messageId", "parentMessageId"])[0]
        librechat += tree
        n += 1
    paths.append(dump_jsonl(d / "fuzz_librechat.jsonl", librechat))
    owui = sample("openwebui_feedbacks_export.json")[0]
    feedbacks = []
    for j, (_, m) in enumerate(mutants([owui], rng)):
        if isinstance(m.get("snapshot"), dict) and isinstance(m["snapshot"].get("chat"), dict):
            m["snapshot"]["chat"]["id"] = f"c{j}"  # each mutant its own chat
        feedbacks.append(m)
    (d / "fuzz_openwebui.json").write_text(json.dumps(feedbacks))
    paths.append(str(d / "fuzz_openwebui.json"))
    n += len(feedbacks)
    paths += odd_files(d)
    return paths, n + len(odd_files.names)


def clean_hh_lines() -> list[bytes]:
    """Real HH comparisons (tests/fixtures/hh-rlhf) that pass every cleaning rule: kept wherever they appear first."""
    from data.clean import incomplete_reason
    from data.formats import split_hh

    out = []
    with gzip.open(Path(__file__).parent / "fixtures" / "hh-rlhf" / "harmless-base-test.jsonl.gz") as f:
        for line in f:
            rec = json.loads(line)
            replies = [split_hh(rec[k], k)[-1]["content"] for k in ("chosen", "rejected")]
            if incomplete_reason(replies[0]) is None and replies[1].strip() and replies[0] != replies[1]:
                out.append(line.strip())
            if len(out) == 400:
                return out
    return out


def odd_files(d: Path) -> list[str]:
    """One file per kind of damage; each holds some good records too, which must be kept."""
    real = iter(clean_hh_lines())  # a distinct good record for each file, so none is a duplicate of another
    hh = next(real)
    files = {
        "bom_crlf.jsonl": b"\xef\xbb\xbf" + hh + b"\r\n" + next(real) + b"\r\n",
        "utf16.jsonl": (next(real).decode() + "\r\n").encode("utf-16"),
        "nan_inf_null.jsonl": b'{"history": "q", "human_ref_A": "a", "human_ref_B": "b", "score_A": NaN, '
                              b'"score_B": 1}\nnull\n[]\n"text"\n{"history": "q", "human_ref_A": "a", '
                              b'"human_ref_B": "b", "score_A": Infinity, "score_B": -Infinity}\n' + next(real) + b"\n",
        "dup_keys_string_ratings.jsonl": b'{"prompt": "hi", "completion": "Hello.", "rating": 1, "rating": "down"}\n'
                                         b'{"prompt": "hi", "completion": "Hey.", "rating": "thumbs_up"}\n'
                                         b'{"prompt": "hi", "completion": "Yo.", "rating": "+1"}\n'
                                         b'{"prompt": "hi", "completion": "Sup.", "rating": "maybe"}\n',
        "surrogates.jsonl": b'{"prompt": "a\\ud800b", "completion": "c.", "rating": 1}\n'
                            b'{"prompt": "smile \\ud83d\\ude00", "completion": "Done.", "rating": 1}\n',
        "deep.jsonl": b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b', "completion": "c", "rating": 1}\n'
                      + b'{"messages": [{"role": "user", "content": "t?"}, {"role": "assistant", "content": "", '
                        b'"tool_calls": [{"function": {"name": "f", "arguments": ' + b'{"a": ' * 200 + b"1"
                      + b"}" * 200 + b"}}]}], \"rating\": 1}\n" + next(real) + b"\n",
        "invalid_utf8.jsonl": b'{"prompt": "\xff\xfe", "completion": "c", "rating": 1}\n' + next(real) + b"\n",
        "huge_line.jsonl": b'{"prompt": "' + b"x" * (MAX_LINE + 10) + b'", "completion": "c", "rating": 1}\n'
                           + next(real),
        "truncated.json": b'[{"prompt": "a", "completion": "b", "rating": 1}, {"prompt": ',
        "empty.jsonl": b"",
        "blank.jsonl": b"\n   \n\t\n",
        "not_json.jsonl": b"prompt,completion,rating\nhi,hello,1\n",
        "special_tokens.jsonl": json.dumps({"messages": [
            {"role": "user", "content": "What does <|im_start|> mean in ChatML? And <|endoftext|>?"},
            {"role": "assistant", "content": "<|im_start|> opens a turn; <|im_end|> closes it."}],
            "rating": 1}).encode() + b"\n" + json.dumps({"prompt": "Say <|im_end|>", "chosen": "<|im_end|>",
                                                          "rejected": "No."}).encode() + b"\n",
        "replies.jsonl": b"\n".join(json.dumps(r).encode() for r in [
            {"prompt": "q", "chosen": "Same.", "rejected": "Same."},
            {"prompt": "q0", "chosen": "Same.", "rejected": "Same.  "},  # equal after tidying
            {"prompt": "q2", "chosen": [{"role": "assistant", "content": "Part one."},
                                        {"role": "assistant", "content": "Part two."}], "rejected": "No."},
            {"prompt": "q3", "chosen": [{"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
                {"role": "tool", "content": "1"}, {"role": "assistant", "content": "One."}], "rejected": "No."},
            {"prompt": [{"role": "user", "content": "Weather?"}], "chosen": [{"role": "assistant", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Taipei"}}}]}],
             "rejected": [{"role": "assistant", "content": "I cannot know."}],
             "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]},
            {"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": "
                                                                                                  "\"Taipei\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "assistant", "content": "Sunny in Taipei."}], "rating": "up",
             "tools": json.dumps([{"type": "function", "function": {"name": "get_weather"}}])},
        ]) + b"\n",
    }
    paths = []
    for name, data in files.items():
        (d / name).write_bytes(data)
        paths.append(str(d / name))
    gz = d / "damaged.jsonl.gz"
    full = gzip.compress(b"\n".join(clean_hh_lines()[20:320]) + b"\n")  # 300 real, distinct HH comparisons
    gz.write_bytes(full[: len(full) * 2 // 3])  # cut: the first lines are readable, then the stream breaks
    (d / "damaged.json.gz").write_bytes(gzip.compress(b"[" + hh + b"]")[:-12])
    (d / "a_folder").mkdir()
    paths += [str(gz), str(d / "damaged.json.gz"), str(d / "a_folder"), str(d / "no_such_file.jsonl")]
    odd_files.names = paths
    return paths


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    inputs, n = build_fuzz_inputs(d)
    good_out, all_out = d / "good_out", d / "all_out"
    assert main([*GOOD, "--out", str(good_out)]) == 0
    rc = main([*GOOD, *inputs, "--out", str(all_out), "--max-line-bytes", str(MAX_LINE)])
    return rc, good_out, all_out, inputs, n


def test_fuzz_inputs_are_many(fuzz_run):
    _, _, _, inputs, n = fuzz_run
    assert n >= 100 and len(inputs) >= 25


def test_fuzz_no_traceback_accounting_adds_up_nothing_good_lost(fuzz_run):
    rc, good_out, all_out, inputs, _ = fuzz_run
    assert rc == 2  # written, but some inputs could not be read at all
    rep = json.loads((all_out / "report.json").read_text())
    for r in [rep, *rep["inputs"].values()]:
        c = r["records"]
        assert c["read"] == c["kept"] + c["dropped"] + c["malformed"] and sum(r["dropped"].values()) == c["dropped"]
    assert {k: sum(r["records"][k] for r in rep["inputs"].values()) for k in rep["records"]} == rep["records"]
    for name in ("sft", "pairs", "unpaired"):  # every row of the good samples is still there
        rows = [json.dumps(r, sort_keys=True) for r in load(all_out / f"{name}.jsonl")]
        assert set(json.dumps(r, sort_keys=True) for r in load(good_out / f"{name}.jsonl")) <= set(rows), name
        assert len(rows) > len(load(good_out / f"{name}.jsonl")), name  # and the fuzz files added some
    assert not any(k.split(": ", 1)[1].startswith("not trainable") for k in rep["rows_dropped"])
    assert set(rep["unreadable_inputs"]) == {str(Path(p)) for p in inputs if Path(p).name in {
        "truncated.json", "empty.jsonl", "blank.jsonl", "not_json.jsonl", "damaged.json.gz", "damaged.jsonl.gz",
        "a_folder", "no_such_file.jsonl"}}
    by_name = {Path(p).name: r for p, r in rep["inputs"].items()}
    assert by_name["damaged.jsonl.gz"]["records"]["kept"] > 0  # the lines before the break were read and kept
    assert by_name["damaged.jsonl.gz"]["error"].split(": ", 1)[1].startswith("cannot read file after line")
    for name in ("bom_crlf.jsonl", "utf16.jsonl", "nan_inf_null.jsonl", "deep.jsonl", "invalid_utf8.jsonl",
                 "huge_line.jsonl", "surrogates.jsonl", "special_tokens.jsonl"):
        assert by_name[name]["records"]["kept"] >= 1, name
    assert by_name["dup_keys_string_ratings.jsonl"]["records"] == {"read": 4, "kept": 3, "dropped": 0,
                                                                   "malformed": 1}
    spans = "pairs: reply spans several turns (tool results or tool calls between messages)"
    assert by_name["replies.jsonl"]["dropped"] == {"pairs: chosen equals rejected": 2, spans: 1}
    assert by_name["replies.jsonl"]["rows_dropped"] == {"pairs: chosen equals rejected": 2, spans: 1}


def test_fuzz_errors_name_file_and_line(fuzz_run):
    _, _, all_out, _, _ = fuzz_run
    rep = json.loads((all_out / "report.json").read_text())
    assert rep["errors"] > 500
    pattern = re.compile(r"^(?P<path>/[^:\[]+?)(?::\d+| ?\[\d+\])?(?: \([a-z_A-Z]+=.*?\))?: \S")
    for e in rep["error_examples"]:  # file:line or file[index] (and the record's id), or the file alone
        m = pattern.match(e)
        assert m and m["path"] in rep["inputs"], e
    errors = "\n".join(rep["error_examples"])
    assert "fuzz_hh_rlhf.jsonl:7: field 'rejected' must be a string, got float" in errors
    assert "fuzz_ultrafeedback_binarized.jsonl:33: rejected[0].content must be a string, got null" in errors


def test_fuzz_special_tokens_tool_calls_and_joined_replies_written(fuzz_run):
    _, _, all_out, _, _ = fuzz_run
    sft = load(all_out / "sft.jsonl")
    pairs = load(all_out / "pairs.jsonl")
    asked = next(r for r in sft if "mean in ChatML" in r["messages"][0]["content"])
    assert asked["messages"][0]["content"] == "What does <|\u200bim_start|> mean in ChatML? And <|\u200bendoftext|>?"
    tool_sft = next(r for r in sft if r.get("tools") and r["messages"][-1]["content"] == "Sunny in Taipei.")
    assert tool_sft["messages"][1] == {"role": "assistant", "content": "", "weight": 0, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Taipei"}}}]}
    assert tool_sft["messages"][2] == {"role": "tool", "content": "sunny"}
    assert any(p["chosen"][0].get("tool_calls") and p.get("tools") for p in pairs)
    assert any(p["chosen"] == [{"role": "assistant", "content": "Part one.\n\nPart two."}] for p in pairs)


@pytest.mark.parametrize("which", ["good_out", "all_out"])
def test_every_output_loads_in_every_trainer(fuzz_run, qwen_tok, which):
    """Each trainer's data path (load_records + the builder it calls, data/datasets.py): SFT on sft.jsonl, DPO and
    the reward model on pairs.jsonl, KTO-style unpaired on unpaired.jsonl, PPO prompts from every file."""
    out = fuzz_run[1] if which == "good_out" else fuzz_run[2]
    sft, _ = load_records(out / "sft.jsonl", kind="sft")
    ex, rep = build_sft_examples(sft, qwen_tok, 4096)
    assert rep.kept == len(sft) and all(any(lab != -100 for lab in e["labels"]) for e in ex)
    pairs, _ = load_records(out / "pairs.jsonl", kind="preference")
    for reward_token in (False, True):  # DPO, reward model
        _, rep = build_preference_examples(pairs, qwen_tok, 4096, reward_token=reward_token)
        assert rep.kept == len(pairs), rep.summary()
    unpaired, _ = load_records(out / "unpaired.jsonl", kind="unpaired")
    _, rep = build_unpaired_examples(unpaired, qwen_tok, 4096)
    assert rep.kept == len(unpaired), rep.summary()
    for name in ("sft", "pairs", "unpaired"):
        prompts, _ = load_records(out / f"{name}.jsonl", kind="prompt")
        _, rep = build_prompt_examples(prompts, qwen_tok, 4096)
        assert rep.kept == len(prompts), rep.summary()


def test_feedback_sft_learns_only_the_rated_reply(fuzz_run, qwen_tok):
    """An earlier reply in the conversation (thumbs-down or not) is context: default-mask training of the sft.jsonl
    rows learns the rated reply and its <|im_end|> only."""
    sft, _ = load_records(fuzz_run[2] / "sft.jsonl", kind="sft")
    row = next(r for r in sft if r["messages"][-1]["content"] == "Sunny in Taipei.")
    (ex,), _ = build_sft_examples([row], qwen_tok, 4096)
    learned = qwen_tok.decode([t for t in ex["labels"] if t != -100])
    assert learned == "Sunny in Taipei.<|im_end|>"


HUGE = """
import json, sys
from data.feedback import main
rc = main(sys.argv[1:])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"rc": rc, "peak_rss_kb": int(hwm.split()[1])}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS read from /proc (Linux)")
def test_three_million_character_reply_needs_a_few_hundred_mb(tmp_path):
    """One thumbs record whose reply is 3,000,000 characters (Chinese and English sentences), imported with the
    default cleaning plus decontamination, in a fresh process: kept, and the peak RSS stays under 400 MB. The peak is
    VmHWM of the new process (getrusage's ru_maxrss would carry over the forking pytest process's size)."""
    unit = "今天天氣很好，我們去公園散步吧。The quick brown fox jumps over the lazy dog again. "
    reply = (unit * (3_000_000 // len(unit) + 1))[:3_000_000 - 1] + "。"
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Write a long story."},
                                             {"role": "assistant", "content": reply}], "rating": 1},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp_path / "eval.txt").write_text("a line of an evaluation set that shares no thirteen words with the story\n")
    res = subprocess.run([sys.executable, "-c", HUGE, str(path), "--out", str(tmp_path / "out"),
                          "--decontaminate", str(tmp_path / "eval.txt")],
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout.splitlines()[-1])
    print(f"3M-character reply: peak RSS {stats['peak_rss_kb'] / 1024:.0f} MiB")
    assert stats["rc"] == 0 and stats["peak_rss_kb"] < 400 * 1024, stats
    rows = load(tmp_path / "out" / "sft.jsonl")
    assert len(rows[0]["messages"][1]["content"]) == 3_000_000
