"""data.feedback CLI end to end, and the reading / atomic-writing helpers of data.io."""

import glob
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.feedback import main
from data.io import atomic_open, read_rows, write_jsonl

FIXTURES = Path(__file__).parent / "fixtures"  # copies of ../shared (faithful samples, real HH)
FORMATS = str(FIXTURES / "formats")
HH = str(FIXTURES / "hh-rlhf" / "harmless-base-test.jsonl.gz")


def load(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run(tmp_path, *args, out=None):
    """main() on the arguments; the report when something was written (exit 0 or 2), else None."""
    out = out or tmp_path / "out"
    rc = main([*map(str, args), "--out", str(out)])
    report = json.loads((out / "report.json").read_text()) if rc in (0, 2) else None
    return rc, out, report


def accounted(rep):
    """read = kept + dropped + malformed, per file and in total; the dropped reasons add up too."""
    for r in [rep, *rep["inputs"].values()]:
        c = r["records"]
        assert c["read"] == c["kept"] + c["dropped"] + c["malformed"], r
        assert sum(r["dropped"].values()) == c["dropped"], r
    total = {k: sum(r["records"][k] for r in rep["inputs"].values()) for k in rep["records"]}
    assert total == rep["records"]
    return rep["records"]


# ------------------------------------------------------------------------------------------------- reading
def test_read_rows_empty_and_whitespace_files(tmp_path):
    for name, content in [("empty.jsonl", b""), ("blank.jsonl", b"\n  \n")]:
        (tmp_path / name).write_bytes(content)
        assert list(read_rows(str(tmp_path / name))) == [(str(tmp_path / name), None, "file is empty (no records)")]


def test_read_rows_invalid_utf8_bad_json_blank_lines_and_bom(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"b": "\xff\xfe"}\n{"c": \n[1]\n')
    rows = list(read_rows(str(p)))
    assert rows == [(f"{p}:1", {"a": 1}, None),
                    (f"{p}:3", None, "invalid UTF-8 at byte 7 of the line"),
                    (f"{p}:4", None, "invalid JSON at column 7: Expecting value"),
                    (f"{p}:5", [1], None)]  # a wrong type is the parser's business


def test_read_rows_json_array_lone_object_and_broken_document(tmp_path):
    (tmp_path / "a.json").write_text('[{"x": 1},\n {"x": 2}]')
    assert [w for w, _, _ in read_rows(str(tmp_path / "a.json"))] == [f"{tmp_path}/a.json[0]", f"{tmp_path}/a.json[1]"]
    (tmp_path / "o.json").write_text('{\n "x": 1\n}')
    assert list(read_rows(str(tmp_path / "o.json"))) == [(f"{tmp_path}/o.json", {"x": 1}, None)]
    (tmp_path / "b.json").write_text('[{"x": 1},\n {"x": }]')
    assert list(read_rows(str(tmp_path / "b.json"))) == [
        (f"{tmp_path}/b.json:2", None, "invalid JSON at line 2 column 8: Expecting value")]


def test_read_rows_missing_and_broken_gzip(tmp_path):
    (where, obj, err), = read_rows(str(tmp_path / "nope.jsonl"))
    assert obj is None and err.startswith("cannot read file: [Errno 2]")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    (_, _, err), = read_rows(str(tmp_path / "bad.jsonl.gz"))
    assert err.startswith("cannot read file:") and "gzip" in err.lower()


def test_huge_line_rejected_with_default_limit_and_next_line_still_read(tmp_path):
    """A 50 MiB line against the default 16 MiB limit: 50 * 2**20 + 1 bytes counted with its newline."""
    p = tmp_path / "huge.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"messages": "' + b"x" * (50 * 2**20 - 16) + b'"}\n')
        f.write(b'{"ok": 1}\n')
    rows = list(read_rows(str(p)))
    assert rows[0] == (f"{p}:1", None, "line is 52,428,801 bytes, over the limit of 16,777,216 "
                                       "(raise --max-line-bytes if this is intended)")
    assert rows[1] == (f"{p}:2", {"ok": 1}, None)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "out.jsonl"
    write_jsonl(str(p), [{"a": "中文"}])
    with pytest.raises(RuntimeError):
        with atomic_open(str(p)) as f:
            f.write("half")
            raise RuntimeError("crash")
    assert p.read_text(encoding="utf-8") == '{"a": "中文"}\n' and os.listdir(tmp_path) == ["out.jsonl"]


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_all_samples_pinned(tmp_path):
    """10 sample files, 16 records. pairs: argilla 1 + labelstudio 1 + hh 1 + arena 1 + oasst 1 + openwebui 1 +
    shp 1 + summarize 1 + trl 2 + ultrafeedback 1 = 11, minus the Label Studio pair that repeats Argilla's = 10.
    unpaired: openwebui +1, trl +1 and -1 = 3; sft: the two positives. LibreChat's lone rated message (parent not
    exported) is the one malformed record; the Label Studio task is the one dropped record (its only row was the
    duplicate); the OASST prompter message is kept as the context of the kept pair."""
    rc, out, rep = run(tmp_path, *sorted(glob.glob(f"{FORMATS}/*.json*")))
    assert rc == 0
    assert accounted(rep) == {"read": 16, "kept": 14, "dropped": 1, "malformed": 1}
    assert rep["kept"] == {"sft": 2, "pairs": 10, "unpaired": 3} and rep["errors"] == 1
    assert rep["dropped"] == {"pairs: duplicate": 1} and rep["rows_dropped"] == {"pairs: duplicate": 1}
    assert "librechat_message_feedback.jsonl:1 (messageId=a1): message 'a1' has parent 'u1'" in rep["error_examples"][0]
    assert rep["inputs"][f"{FORMATS}/argilla_labelstudio.jsonl"]["formats"] == {"argilla": 1, "labelstudio": 1}
    assert rep["inputs"][f"{FORMATS}/oasst1_messages.jsonl"]["records"] == {"read": 3, "kept": 3, "dropped": 0,
                                                                            "malformed": 0}
    assert load(out / "sft.jsonl")[0] == {"messages": [{"role": "user", "content": "What is the capital of France?"},
                                                       {"role": "assistant", "content": "Paris.", "weight": 1}]}
    assert len(load(out / "pairs.jsonl")) == 10 and len(load(out / "unpaired.jsonl")) == 3
    assert sorted(os.listdir(out)) == ["pairs.jsonl", "report.json", "sft.jsonl", "unpaired.jsonl"]


def test_cli_no_dedupe_keeps_the_repeat(tmp_path):
    rc, _, rep = run(tmp_path, f"{FORMATS}/argilla_labelstudio.jsonl", "--no-dedupe")
    assert rc == 0 and rep["kept"]["pairs"] == 2 and rep["dropped"] == {}


def test_cli_on_error_stop_names_line_and_leaves_out_dir_untouched(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: no"}\n'
                   '{"chosen": "\\n\\nHuman: hi", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: no"}\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "pairs.jsonl").write_text("OLD\n")
    assert main([str(bad), "--out", str(out), "--on-error", "stop"]) == 1
    assert capsys.readouterr().err == f"error: {bad}:2: chosen has no final '\\n\\nAssistant:' turn\n"
    assert os.listdir(out) == ["pairs.jsonl"] and (out / "pairs.jsonl").read_text() == "OLD\n"
    rc, _, rep = run(tmp_path, bad)  # skip: counted, the good line kept, the old file replaced with the new set
    assert rc == 0 and rep["kept"]["pairs"] == 1 and accounted(rep) == {"read": 2, "kept": 1, "dropped": 0,
                                                                        "malformed": 1}
    assert len(load(out / "pairs.jsonl")) == 1 and len(os.listdir(out)) == 4


def test_cli_empty_file_invalid_utf8_and_wrong_types_are_counted(tmp_path, capsys):
    """The empty file is a file-level error (no record): exit 2, named on stderr; the other file's good record is
    written and each bad line is a malformed record with its line."""
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "mixed.jsonl").write_bytes(b'[1, 2]\n{"messages": [{"role": "user", "content": 5}], "rating": 1}\n'
                                           b'{"prompt": "\xff", "completion": "c", "rating": 1}\n'
                                           b'{"prompt": "q", "completion": "Fine.", "rating": 1}\n')
    rc, _, rep = run(tmp_path, tmp_path / "empty.jsonl", tmp_path / "mixed.jsonl")
    assert rc == 2 and rep["errors"] == 4 and rep["unreadable_inputs"] == [str(tmp_path / "empty.jsonl")]
    assert accounted(rep) == {"read": 4, "kept": 1, "dropped": 0, "malformed": 3}
    assert [e.split(": ", 1)[1] for e in rep["error_examples"]] == [
        "file is empty (no records)", "invalid UTF-8 at byte 12 of the line",
        "messages[0].content must be a string, got int",
        "cannot tell the format of this record (keys list); pass --format"]
    empty = tmp_path / "empty.jsonl"
    assert rep["inputs"][str(empty)]["error"] == f"{empty}: file is empty (no records)"
    assert capsys.readouterr().err.endswith(f"error: could not read {tmp_path / 'empty.jsonl'}: file is empty (no "
                                            f"records) (the other inputs were written)\n")


def test_cli_format_forced_and_gz_input(tmp_path, capsys):
    gz = tmp_path / "hh.jsonl.gz"
    with open(f"{FORMATS}/hh_rlhf.jsonl", "rb") as src, gzip.open(gz, "wb") as dst:
        dst.write(src.read())
    rc, out, rep = run(tmp_path, gz, "--format", "hh")
    assert rc == 0 and rep["kept"]["pairs"] == 1
    assert load(out / "pairs.jsonl")[0]["rejected"] == [{"role": "assistant", "content": "I don't know."}]
    before = (out / "pairs.jsonl").read_bytes()
    rc, _, rep = run(tmp_path, gz, "--format", "shp")  # every record malformed: nothing kept, nothing replaced
    assert rc == 1 and rep is None and (out / "pairs.jsonl").read_bytes() == before
    err = capsys.readouterr().err
    assert "malformed 1" in err and err.endswith(f"error: nothing kept from 1 input(s); {out} was left as it was\n")


def test_cli_decontaminate_and_scrub_pii(tmp_path, capsys):
    """The eval line shares the 13 words 'put the egg in boiling water for about 9 minutes then cool it' with the
    HH sample's chosen reply (punctuation is not a token), so the pair is dropped (and with it the whole output)."""
    ev = tmp_path / "eval.txt"
    ev.write_text("Q: put the egg in boiling water for about 9 minutes, then cool it!\nshort line\n")
    rc, _, rep = run(tmp_path, f"{FORMATS}/hh_rlhf.jsonl", "--decontaminate", ev)
    assert rc == 1 and "dropped: pairs: contaminated (13-gram overlap with eval data) 1" in capsys.readouterr().err
    rc, _, rep = run(tmp_path, f"{FORMATS}/hh_rlhf.jsonl", f"{FORMATS}/shp.jsonl", "--decontaminate", ev)
    assert rc == 0 and rep["kept"]["pairs"] == 1 and rep["decontamination"]["eval_texts_too_short"] == 1
    assert rep["dropped"] == {"pairs: contaminated (13-gram overlap with eval data)": 1}
    rc, _, rep = run(tmp_path, f"{FORMATS}/hh_rlhf.jsonl", "--decontaminate", ev, "--ngram", "14")
    assert rep["kept"]["pairs"] == 1
    pii = tmp_path / "pii.jsonl"
    pii.write_text(json.dumps({"messages": [{"role": "user", "content": "Mail me: amy@example.com"},
                                            {"role": "assistant", "content": "Call 0912-345-678."}],
                               "rating": "up"}) + "\n")
    rc, out, rep = run(tmp_path, pii, "--scrub-pii")
    assert load(out / "sft.jsonl")[0]["messages"][1]["content"] == "Call <PHONE>."
    assert load(out / "unpaired.jsonl")[0]["prompt"][0]["content"] == "Mail me: <EMAIL>"


def test_hh_harmless_base_test_real_data(tmp_path):
    """2,312 real HH comparisons: 5 whose two dialogues differ before the last reply; of the 2,307 pairs the
    chosen reply is empty in 4, ends mid-sentence (',', ':', ...) in 19, has unbalanced quotes/brackets in 14;
    2307 - 37 = 2270 kept; no exact or near duplicates."""
    rc, out, rep = run(tmp_path, HH)
    assert rc == 0 and rep["errors"] == 0
    assert accounted(rep) == {"read": 2312, "kept": 2270, "dropped": 42, "malformed": 0}
    assert rep["kept"] == {"sft": 0, "pairs": 2270, "unpaired": 0}
    assert rep["dropped"] == {"chosen and rejected dialogues differ before the final reply": 5,
                              "pairs: empty reply": 4, "pairs: truncated sentence": 19,
                              "pairs: unbalanced brackets or quotes": 14}
    first = load(out / "pairs.jsonl")[0]
    assert first["prompt"][0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert len(first["prompt"]) == 5 and first["chosen"][0]["content"].startswith("No, sorry!  All of these")


def test_module_entry_point(tmp_path):
    res = subprocess.run([sys.executable, "-m", "data.feedback", f"{FORMATS}/shp.jsonl", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[:2] == ["read 1 records from 1 file(s): kept 1, dropped 0, malformed 0",
                                           "rows written: sft 0, pairs 1, unpaired 0"]


# ------------------------------------------------------------------------------- output set, exit status, errors
def test_out_problems_are_one_line_errors(tmp_path, capsys):
    good = f"{FORMATS}/shp.jsonl"
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "model.safetensors").write_text("weights")
    cases = [(tmp_path / "a_file", "is a file, not a folder"),
             (tmp_path / "a_file" / "sub", "a_file is a file, not a folder"),
             (tmp_path / "theirs", "holds files this command did not write (model.safetensors)"),
             (Path("/sys/qwen-align-no-write"), "cannot write --out /sys/qwen-align-no-write")]
    for out, msg in cases:
        if str(out).startswith("/sys") and not os.path.isdir("/sys"):
            continue
        assert main([good, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: cannot write" if "cannot write" in msg else "error: --out"), err
        assert msg in err, err
        assert err.count("\n") == 1 and "Traceback" not in err, err
    assert (tmp_path / "theirs" / "model.safetensors").read_text() == "weights"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_without_write_permission(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main([f"{FORMATS}/shp.jsonl", "--out", str(locked / "out")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot write --out {locked / 'out'}") and err.count("\n") == 1
    finally:
        locked.chmod(0o700)


def test_unreadable_inputs_exit_status_and_old_outputs_kept(tmp_path, capsys):
    """An input that cannot be read (a typo, a folder, not JSON): exit 2 and the others written; if nothing is
    kept, exit 1 and the previous output set stays byte for byte."""
    rc, out, rep = run(tmp_path, f"{FORMATS}/shp.jsonl", tmp_path / "typo.jsonl", tmp_path, f"{FORMATS}/README.md")
    assert rc == 2 and rep["kept"]["pairs"] == 1
    assert rep["unreadable_inputs"] == [str(tmp_path / "typo.jsonl"), str(tmp_path), f"{FORMATS}/README.md"]
    err = capsys.readouterr().err
    assert "typo.jsonl: cannot read file: [Errno 2] No such file or directory" in err
    assert "Is a directory" in err and f"{FORMATS}/README.md: no record is JSON" in err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for bad in (tmp_path / "typo.jsonl", tmp_path / "empty.jsonl"):
        (tmp_path / "empty.jsonl").write_text("")
        assert main([str(bad), "--out", str(out)]) == 1
        assert capsys.readouterr().err.endswith(f"error: nothing kept from 1 input(s); {out} was left as it was\n")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_failed_write_leaves_the_old_set(tmp_path):
    """A write that fails half way (here: a row that is not JSON-serialisable, after sft.jsonl was written) leaves
    the previous four files exactly as they were and no temporary folder behind."""
    from data.feedback import write_outputs

    rc, out, rep = run(tmp_path, f"{FORMATS}/trl_formats.jsonl")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(TypeError):
        write_outputs(str(out), {"sft": [{"messages": []}], "pairs": [{"x": {1, 2}}], "unpaired": []}, rep)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_tree_accounting_counts_context_as_kept(tmp_path):
    """OASST: the prompter message is the context of the kept pair (kept); an unranked reply elsewhere in the tree
    and a message whose parent is missing are dropped / malformed, each counted once."""
    rows = [json.loads(line) for line in (Path(FORMATS) / "oasst1_messages.jsonl").read_text().splitlines()]
    rows.append(dict(rows[2], message_id="m3", parent_id="m1", role="prompter", rank=None, text="thanks"))
    rows.append(dict(rows[2], message_id="m4", parent_id="gone", text="orphan"))
    path = tmp_path / "oasst.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, rep = run(tmp_path, path)
    assert rc == 0 and accounted(rep) == {"read": 5, "kept": 3, "dropped": 1, "malformed": 1}
    assert rep["dropped"] == {"no feedback of its own, and no kept row uses it": 1}
    assert rep["error_examples"] == [f"{path}:5 (message_id=m4): message 'm4' has parent 'gone', which is not in "
                                     f"the input"]


def test_feedback_sft_row_learns_only_the_rated_reply(tmp_path, small_tok):
    """A thumbs-up on the second reply of a conversation whose first reply is bad: the sft.jsonl row marks the first
    reply weight 0 and the rated one weight 1, and the default mask learns only "Good answer." + <|im_end|>."""
    from data.datasets import build_sft_examples, load_records

    conv = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "Bad answer."},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "Good answer."}]
    path = tmp_path / "thumbs.jsonl"
    path.write_text(json.dumps({"messages": conv, "rating": "thumbs_up"}) + "\n")
    rc, out, rep = run(tmp_path, path)
    (row,) = load(out / "sft.jsonl")
    assert [m.get("weight") for m in row["messages"]] == [None, 0, None, 1]
    records, _ = load_records(out / "sft.jsonl")
    for mask in ("all_assistant", "last_assistant"):
        (ex,), _ = build_sft_examples(records, small_tok, 256, mask=mask)
        assert small_tok.decode([t for t in ex["labels"] if t != -100]) == "Good answer.<|im_end|>"
    (ex,), _ = build_sft_examples([{"messages": conv}], small_tok, 256)  # without weights both replies are learned
    assert small_tok.decode([t for t in ex["labels"] if t != -100]) == "Bad answer.<|im_end|>Good answer.<|im_end|>"


def test_special_token_text_is_escaped_and_trainable(tmp_path, small_tok):
    """A user asking what <|im_start|> is: kept, written with a zero-width space after "<|", and it tokenises as
    text (no <|im_start|> id inside the turn)."""
    from data.datasets import build_sft_examples, load_records

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"prompt": "What is <|im_start|>?", "completion": "It opens a turn.",
                                "rating": 1}) + "\n")
    rc, out, rep = run(tmp_path, path)
    assert rc == 0 and load(out / "sft.jsonl")[0]["messages"][0]["content"] == "What is <|\u200bim_start|>?"
    records, _ = load_records(out / "sft.jsonl")
    (ex,), _ = build_sft_examples(records, small_tok, 256, default_system=None)
    assert ex["input_ids"].count(small_tok.convert_tokens_to_ids("<|im_start|>")) == 2  # the two turn markers only
