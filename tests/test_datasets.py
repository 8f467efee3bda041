"""Datasets on the small tokenizer, with values derived by hand from its ids.

Small-tokenizer ids used below (see test_small_ids): <|endoftext|> 996, <|im_start|> 997, <|im_end|> 998,
<|reward|> 999, "\\n" 198, "user" 345, "assistant" 336, "Hi" 664, "Hello" 602, "!" 0.
"""

import json
from collections import Counter

import pytest

from common.config import InputError
from data.datasets import (
    DataReport,
    build_preference_examples,
    build_prompt_examples,
    build_sft_examples,
    build_text_examples,
    build_unpaired_examples,
    collate,
    load_records,
    mix_sources,
    pack_examples,
    prepare_record,
)

X = -100
U_HI = {"role": "user", "content": "Hi"}
A_HELLO = {"role": "assistant", "content": "Hello!"}
A_HI = {"role": "assistant", "content": "Hi"}
# <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n
PROMPT_IDS = [997, 345, 198, 664, 998, 198, 997, 336, 198]


def test_small_ids(small_tok):
    enc = lambda s: small_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert [enc(s) for s in ["\n", "user", "assistant", "Hi", "Hello!"]] == [[198], [345], [336], [664], [602, 0]]
    assert small_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|reward|>"]) == [
        996, 997, 998, 999]


def test_sft_example_by_hand(small_tok):
    """user "Hi", assistant "Hello!" (no system): ids = PROMPT_IDS + [602, 0, 998, 198]; learned (all_assistant):
    602, 0, 998 at positions 9..11. Shifted: labels[8] = 602, labels[9] = 0, labels[10] = 998, the rest -100."""
    ex, rep = build_sft_examples([{"messages": [U_HI, A_HELLO]}], small_tok, max_len=64, default_system=None)
    assert ex == [{"input_ids": PROMPT_IDS + [602, 0, 998, 198], "labels": [X] * 8 + [602, 0, 998, X, X]}]
    assert (rep.read, rep.kept, rep.truncated, rep.dropped) == (1, 1, 0, {})


def test_sft_prompt_completion_format_is_the_same(small_tok):
    a, _ = build_sft_examples([{"messages": [U_HI, A_HELLO]}], small_tok, 64, default_system=None)
    b, _ = build_sft_examples([{"prompt": "Hi", "completion": "Hello!"}], small_tok, 64, default_system=None)
    assert a == b


def test_sft_truncation_policies(small_tok):
    """13 tokens. max_len 11, "truncate": keep ids[:11] (ends ... 602, 0); labels[8] = 602, labels[9] = 0,
    labels[10] = -100 (the shift happens after the cut). max_len 9: the 9 kept tokens have no target -> dropped."""
    rec = [{"messages": [U_HI, A_HELLO]}]
    ex, rep = build_sft_examples(rec, small_tok, 11, truncation="truncate", default_system=None)
    assert ex == [{"input_ids": PROMPT_IDS + [602, 0], "labels": [X] * 8 + [602, 0, X]}]
    assert (rep.kept, rep.truncated) == (1, 1)
    _, rep = build_sft_examples(rec, small_tok, 11, truncation="drop", default_system=None)
    assert (rep.kept, rep.dropped) == (0, {"too_long": 1})
    _, rep = build_sft_examples(rec, small_tok, 9, truncation="truncate", default_system=None)
    assert rep.dropped == {"no_learned_tokens": 1}
    _, rep = build_sft_examples([{"messages": [U_HI]}], small_tok, 64)
    assert rep.dropped == {"no_learned_tokens": 1}
    with pytest.raises(ValueError, match="truncation must be one of"):
        build_sft_examples(rec, small_tok, 64, truncation="left")


def test_sft_bad_record_names_record(small_tok):
    with pytest.raises(ValueError, match=r"record 1: messages\[0\]: 'content' must be a string, got int"):
        build_sft_examples([{"messages": [U_HI]}, {"messages": [{"role": "user", "content": 5}]}], small_tok, 64)


def test_pack_and_collate_by_hand():
    """A (3 tokens) + B (2) fit in 5; C (4) starts a new row. position_ids restart at 0 per document.
    Collate right-pads row 2 with pad 996: label -100, attention 0, position 0."""
    a = {"input_ids": [1, 2, 3], "labels": [2, 3, X]}
    b = {"input_ids": [4, 5], "labels": [5, X]}
    c = {"input_ids": [6, 7, 8, 9], "labels": [7, 8, 9, X]}
    rows = pack_examples([a, b, c], seq_len=5)
    assert rows == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [2, 3, X, 5, X], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [6, 7, 8, 9], "labels": [7, 8, 9, X], "position_ids": [0, 1, 2, 3]},
    ]
    batch = collate(rows, pad_id=996)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 996]]
    assert batch["labels"].tolist() == [[2, 3, X, 5, X], [7, 8, 9, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["input_ids"].shape == (2, 5)
    unpacked = collate([b], pad_id=0)
    assert unpacked["position_ids"].tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="example 2 has 4 tokens, more than seq_len=3"):
        pack_examples([b, b, c], seq_len=3)


def test_text_examples_by_hand(small_tok):
    """"Hi" -> [664, 996]; "Hello!" -> [602, 0, 996]. Stream [664, 996, 602, 0, 996], per-document labels
    [996, -100 | 0, 996, -100], positions [0, 1 | 0, 1, 2]. Rows of 4: the cut document continues at position 0."""
    rows = build_text_examples([{"text": "Hi"}, {"text": "Hello!"}], small_tok, seq_len=4)
    assert rows == [
        {"input_ids": [664, 996, 602, 0], "labels": [996, X, 0, 996], "position_ids": [0, 1, 0, 1]},
        {"input_ids": [996], "labels": [X], "position_ids": [0]},
    ]


PREF_FORMATS = [
    {"prompt": [U_HI], "chosen": [A_HELLO], "rejected": [A_HI]},  # conversational, explicit prompt
    {"prompt": "Hi", "chosen": "Hello!", "rejected": "Hi"},  # standard strings
    {"chosen": [U_HI, A_HELLO], "rejected": [U_HI, A_HI]},  # implicit prompt
]


@pytest.mark.parametrize("rec", PREF_FORMATS)
def test_preference_formats_by_hand(small_tok, rec):
    """prompt = PROMPT_IDS (with the generation prompt); chosen "Hello!" -> [602, 0, 998]; rejected "Hi" -> [664, 998];
    with reward_token=True both end with 999."""
    ex, rep = build_preference_examples([rec], small_tok, 64, default_system=None)
    assert ex == [{"prompt_ids": PROMPT_IDS, "chosen_ids": [602, 0, 998], "rejected_ids": [664, 998]}]
    ex, _ = build_preference_examples([rec], small_tok, 64, reward_token=True, default_system=None)
    assert (ex[0]["chosen_ids"], ex[0]["rejected_ids"]) == ([602, 0, 998, 999], [664, 998, 999])


def test_implicit_string_prompt_splits_at_a_word():
    from data.datasets import preference_parts

    prompt, chosen, rejected = preference_parts({"chosen": "The sky is blue.", "rejected": "The sky is green."})
    assert (prompt[0]["content"], chosen["content"], rejected["content"]) == ("The sky is", " blue.", " green.")
    with pytest.raises(ValueError, match="HH-RLHF dialogue string; convert it"):
        preference_parts({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"})


def test_preference_truncation(small_tok):
    """9 prompt + 3 longest reply = 12. max_len 10: "drop" -> too_long; "truncate" keeps the last 10 - 3 = 7 prompt
    tokens [198, 664, 998, 198, 997, 336, 198]; max_len 3: the reply alone fills it -> response_too_long."""
    rec = [PREF_FORMATS[0]]
    _, rep = build_preference_examples(rec, small_tok, 10, default_system=None)
    assert rep.dropped == {"too_long": 1}
    ex, rep = build_preference_examples(rec, small_tok, 10, truncation="truncate", default_system=None)
    assert ex[0]["prompt_ids"] == [198, 664, 998, 198, 997, 336, 198] and rep.truncated == 1
    _, rep = build_preference_examples(rec, small_tok, 3, truncation="truncate", default_system=None)
    assert rep.dropped == {"response_too_long": 1}
    same = {"prompt": "Hi", "chosen": "Hi", "rejected": "Hi"}
    _, rep = build_preference_examples([same], small_tok, 64)
    assert rep.dropped == {"identical_replies": 1}


def test_reward_token_missing_raises():
    """A real tokenizer without <|reward|> (trained here in milliseconds) must be refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    backend.train_from_iterator(["Hi there"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.raises(ValueError, match=r"reward_token=True but .* no special token '<\|reward\|>'"):
        build_preference_examples([PREF_FORMATS[0]], tok, 64, reward_token=True)


def test_unpaired_and_prompt_examples(small_tok):
    rec = {"prompt": [U_HI], "completion": [A_HELLO], "label": True}
    ex, _ = build_unpaired_examples([rec], small_tok, 64, default_system=None)
    assert ex == [{"prompt_ids": PROMPT_IDS, "completion_ids": [602, 0, 998], "label": True}]
    with pytest.raises(ValueError, match="record 0: 'label' must be true or false, got str"):
        build_unpaired_examples([dict(rec, label="yes")], small_tok, 64)
    # A prompt from a prompt-only record, or from a conversation without its final reply: the same ids.
    ex, rep = build_prompt_examples([{"prompt": [U_HI]}, {"messages": [U_HI, A_HELLO]}], small_tok, 64,
                                    default_system=None)
    assert [e["prompt_ids"] for e in ex] == [PROMPT_IDS, PROMPT_IDS] and ex[1]["messages"] == [U_HI]
    ex, rep = build_prompt_examples([{"prompt": [U_HI]}], small_tok, 4, truncation="truncate", default_system=None)
    assert ex[0]["prompt_ids"] == [198, 997, 336, 198] and rep.truncated == 1
    _, rep = build_prompt_examples([{"prompt": [U_HI]}], small_tok, 4, default_system=None)
    assert rep.dropped == {"too_long": 1}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def test_load_records_detects_kinds(tmp_path):
    cases = {
        "sft": {"messages": [U_HI, A_HELLO]},
        "preference": PREF_FORMATS[0],
        "unpaired": {"prompt": [U_HI], "completion": [A_HELLO], "label": False},
        "prompt": {"prompt": [U_HI]},
        "text": {"text": "你好"},
    }
    for kind, rec in cases.items():
        recs, got = load_records(write_jsonl(tmp_path / f"{kind}.jsonl", [rec, rec]))
        assert (got, recs) == (kind, [rec, rec])
    # An explicit kind: prompts taken from a preference file.
    _, kind = load_records(tmp_path / "preference.jsonl", kind="prompt")
    assert kind == "prompt"
    (tmp_path / "a.json").write_text(json.dumps([cases["sft"]]))
    assert load_records(tmp_path / "a.json") == ([cases["sft"]], "sft")


def test_load_records_errors_name_file_and_line(tmp_path):
    good = PREF_FORMATS[0]
    path = write_jsonl(tmp_path / "pairs.jsonl", [good] * 6 + [dict(good, chosen=3)])
    with pytest.raises(ValueError, match=r"pairs.jsonl:7: 'chosen' must be a list of messages or a string, got int"):
        load_records(path)
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [U_HI]}, {"text": "x"}])
    with pytest.raises(ValueError, match=r"sft.jsonl:2: sft record is missing \['messages'\]"):
        load_records(path)
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(ValueError, match=r"odd.jsonl:1: cannot tell the record kind from keys \['foo'\]"):
        load_records(path)
    (tmp_path / "broken.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:2: invalid JSON"):
        load_records(tmp_path / "broken.jsonl")
    with pytest.raises(InputError, match="nope.jsonl: no such file"):
        load_records(tmp_path / "nope.jsonl")


def test_load_parquet_arrow_and_dataset_dir(tmp_path):
    import datasets

    recs = [{"prompt": [U_HI], "chosen": [A_HELLO], "rejected": [A_HI]}] * 3
    ds = datasets.Dataset.from_list(recs)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "dir"))
    arrow = next((tmp_path / "dir").glob("*.arrow"))
    for path in (tmp_path / "p.parquet", tmp_path / "dir", arrow):
        assert load_records(path) == (recs, "preference")
    bad = datasets.Dataset.from_list([{"prompt": "Hi", "chosen": "a", "rejected": "b", "label": 1}] * 2)
    bad = bad.remove_columns(["chosen"])  # now an "unpaired" record with a non-bool label
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match=r"bad.parquet row 0: .*missing \['completion'\]"):
        load_records(tmp_path / "bad.parquet", kind="unpaired")


def test_mix_sources_ratio_and_seed():
    """zh:en = 2:1 with n = 300 -> exactly 200 and 100; n = 301 -> 200.67/100.33, the one left goes to zh (larger
    remainder) -> 201 and 100. en has 5 records drawn 100 times: each exactly 20 times (no-replacement passes)."""
    zh = [{"src": "zh", "i": i} for i in range(10)]
    en = [{"src": "en", "i": i} for i in range(5)]
    mixed = mix_sources([(zh, 2.0), (en, 1.0)], n=300, seed=0)
    assert Counter(r["src"] for r in mixed) == {"zh": 200, "en": 100}
    assert set(Counter(r["i"] for r in mixed if r["src"] == "en").values()) == {20}
    assert Counter(r["src"] for r in mix_sources([(zh, 2), (en, 1)], n=301, seed=0)) == {"zh": 201, "en": 100}
    assert mix_sources([(zh, 2), (en, 1)], 300, seed=0) == mixed
    assert mix_sources([(zh, 2), (en, 1)], 300, seed=1) != mixed
    with pytest.raises(ValueError, match="source 1 has weight 0"):
        mix_sources([(zh, 1), (en, 0)], 10, seed=0)


def test_report_summary():
    rep = DataReport(read=5, kept=3, truncated=1)
    rep.drop("too_long")
    rep.drop("no_learned_tokens")
    assert rep.summary() == "read 5, kept 3 (1 truncated), dropped 2 (no_learned_tokens: 1, too_long: 1)"


def test_show_cli_marks_learned_tokens(tmp_path, capsys):
    """`python -m data.show` on an SFT file: the assistant reply and its <|im_end|> are inside ⟦ ⟧ (not a tty);
    3 learned tokens (602, 0, 998), as in test_sft_example_by_hand (plus the default system turn, all masked)."""
    from data.show import main

    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [U_HI, A_HELLO]}, {"messages": [U_HI]}])
    assert main([str(path), "--tokenizer", "small"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>assistant\n⟦Hello!<|im_end|>⟧\n" in out
    assert out.startswith(f"{path} record 0 (sft), tokenizer small\n--- sft, mask=all_assistant ---\n")
    assert "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" in out
    assert "learned: 3," in out
    assert main([str(path), "--tokenizer", "small", "--mask", "qwen_finetune"]) == 0
    assert "⟦<|im_start|>⟧system\n" in capsys.readouterr().out


def test_show_cli_preference_and_errors(tmp_path, capsys):
    from data.show import main

    path = write_jsonl(tmp_path / "pairs.jsonl", [PREF_FORMATS[0]])
    assert main([str(path), "--tokenizer", "small", "--ids"]) == 0
    out = capsys.readouterr().out
    assert "--- chosen ---" in out and "⟦Hello!<|im_end|>⟧" in out and "⟦Hi<|im_end|>⟧" in out
    # default system turn (11 ids) + PROMPT_IDS (9) + reply: chosen [602, 0, 998], rejected [664, 998]
    assert "tokens: 23, learned: 3, masked: 20" in out and "tokens: 22, learned: 2, masked: 20" in out
    bad = write_jsonl(tmp_path / "bad.jsonl", [PREF_FORMATS[0], dict(PREF_FORMATS[0], rejected=[1])])
    assert main([str(bad), "--tokenizer", "small"]) == 2
    assert "bad.jsonl:2: rejected[0]: a message must be a dict" in capsys.readouterr().err
    assert main([str(path), "--tokenizer", "small", "--index", "3"]) == 2
    assert "has 1 records; --index 3 is out of range" in capsys.readouterr().err


def test_load_records_escapes_joins_and_skips_with_a_reason(tmp_path, capsys):
    """The one validation shared with data.feedback (data/validate.py): special-token text escaped (a zero-width
    space after "<|"), several plain assistant messages joined, identical and tool-spanning replies skipped."""
    recs = [
        {"prompt": "What is <|im_start|>?", "chosen": "A marker.", "rejected": "No idea."},
        {"prompt": [U_HI], "rejected": [A_HI],
         "chosen": [{"role": "assistant", "content": "One."}, {"role": "assistant", "content": "Two."}]},
        {"prompt": [U_HI], "chosen": [A_HI], "rejected": [A_HI]},
        {"prompt": [U_HI], "chosen": [{"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "f", "arguments": {}}}]}, {"role": "tool", "content": "1"}, A_HI],
         "rejected": [A_HELLO]},
    ]
    out, kind = load_records(write_jsonl(tmp_path / "p.jsonl", recs))
    assert kind == "preference" and len(out) == 2
    assert out[0]["prompt"] == "What is <|\u200bim_start|>?"
    assert out[1]["chosen"] == [{"role": "assistant", "content": "One.\n\nTwo."}]
    assert capsys.readouterr().err == (f"{tmp_path / 'p.jsonl'}: skipped 2 of 4 records (chosen equals rejected: 1, "
                                       "reply spans several turns (tool results or tool calls between messages): 1)\n")
    with pytest.raises(ValueError, match="none of its 1 records can be used"):
        load_records(write_jsonl(tmp_path / "same.jsonl", [recs[2]]))


def test_tools_and_tool_call_replies_in_builders(small_tok):
    """A record's "tools" go into the system turn of every builder; a tool-call reply is its rendered body."""
    from data.chatml import assistant_body, render

    tools = [{"type": "function", "function": {"name": "f"}}]
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]}
    rec = {"prompt": [U_HI], "chosen": [call], "rejected": [A_HI], "tools": tools}
    (ex,), _ = build_preference_examples([rec], small_tok, 512)
    assert small_tok.decode(ex["prompt_ids"]) == render([U_HI], add_generation_prompt=True, tools=tools)
    assert small_tok.decode(ex["chosen_ids"]) == assistant_body(call) + "<|im_end|>"
    (p,), _ = build_prompt_examples([rec], small_tok, 512)
    assert p["prompt_ids"] == ex["prompt_ids"] and p["tools"] == tools
    (sft,), _ = build_sft_examples([{"messages": [U_HI, call], "tools": tools}], small_tok, 512)
    assert small_tok.decode([t for t in sft["labels"] if t != -100]) == assistant_body(call) + "<|im_end|>"
    with pytest.raises(ValueError, match="f:1: tools: must be a list"):
        prepare_record({"messages": [U_HI, A_HI], "tools": "f"}, "sft", "f:1")
