"""Cleaning rules of data/clean.py, each against values worked out by hand."""

import numpy as np
import pytest

from data.clean import (CleanConfig, Decontaminator, clean_records, exact_duplicate_of, incomplete_reason,
                        json_problem, lsh_params, minhash, near_duplicate_of, ngram_tokens, normalize_key,
                        scrub_pii, shingle_hashes, strip_translation_prefix, tidy_text)


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def test_normalize_key_nfkc_casefold_whitespace():
    """NFKC maps full-width 'Ｈｅｌｌｏ' -> 'Hello', '，' -> ',', ideographic space U+3000 -> ' '; then casefold."""
    assert normalize_key("  Ｈｅｌｌｏ，\u3000World\n\tＯＫ ") == "hello, world ok"


def test_tidy_text_is_lossless_for_chinese_punctuation():
    assert tidy_text("你好，世界。  \r\n\n\n\n下一段\u3000\n") == "你好，世界。\n\n下一段"


@pytest.mark.parametrize("text,want", [
    ("Translation: Hello there.", "Hello there."),
    ("翻译：你好。", "你好。"),
    ("譯文：你好。", "你好。"),
    ("以下是翻譯：\n你好。", "你好。"),
    ("Here is the translation: Bonjour.", "Bonjour."),
    ("Sure, here's the translation in Traditional Chinese:\n\n早安。", "早安。"),
    ("Translation is hard: it loses nuance.", "Translation is hard: it loses nuance."),
    ("The translation: stays", "The translation: stays"),
])
def test_strip_translation_prefix(text, want):
    assert strip_translation_prefix(text) == want


@pytest.mark.parametrize("text,want", [
    ("", "empty reply"), ("  \n", "empty reply"),
    ("```python\nprint(1)", "unclosed code block"),
    ('He said "hi', "unbalanced brackets or quotes"),
    ("「你好", "unbalanced brackets or quotes"),
    ("see (note", "unbalanced brackets or quotes"),
    ("Here are the steps:", "truncated sentence"),
    ("我們需要，", "truncated sentence"),
    ("and then,", "truncated sentence"),
    ("7", None), ("Paris.", None), ("1) one\n2) two", None), ("ok :)", None), ("sad :-(", None),
    ("Bye.\n-----", None), ("use `f(` carefully.", None), ("「你好」他說。", None),
    ("```\ncode(\n```\nDone.", None),
])
def test_incomplete_reason(text, want):
    assert incomplete_reason(text) == want


def test_json_problem():
    assert json_problem("any", 'Here:\n```json\n{"a": 1}\n```') is None
    assert json_problem("any", 'Here:\n```json\n{"a": 1,}\n```') == "malformed JSON"
    assert json_problem("Answer in JSON please", '{"a": ') == "malformed JSON"
    assert json_problem("Answer in JSON please", '{"a": [1, 2]}') is None
    assert json_problem("no format asked", "{not json}") is None  # the reply does not claim JSON


@pytest.mark.parametrize("text,want", [
    ("mail amy.lee+x@mail.example.com.tw now", "mail <EMAIL> now"),
    ("台灣手機 0912-345-678。", "台灣手機 <PHONE>。"),
    ("call 0912345678", "call <PHONE>"),
    ("tel +886 912 345 678", "tel <PHONE>"),
    ("tel +886-912-345-678", "tel <PHONE>"),
    ("手机13812345678", "手机<PHONE>"),
    ("手机 +86 138 1234 5678", "手机 <PHONE>"),
    ("市話 (02) 2345-6789", "市話 <PHONE>"),
    ("市話 02-2345-6789", "市話 <PHONE>"),
    ("US (555) 123-4567", "US <PHONE>"),
    ("UK +44 20 7946 0958", "UK <PHONE>"),
    ("date 2024-01-01, isbn 9780131103627, pi 3.14159265", "date 2024-01-01, isbn 9780131103627, pi 3.14159265"),
])
def test_scrub_pii(text, want):
    assert scrub_pii(text) == want


def test_ngram_tokens_words_for_latin_characters_for_cjk():
    """NFKC turns '：' into ':' and casefolds 'GPT'; CJK characters are one token each, punctuation none."""
    assert ngram_tokens("GPT-4 說：你好! ＡＢＣ") == ["gpt", "4", "說", "你", "好", "abc"]


def test_decontaminator_ngram_overlap():
    """n=3: eval 'a b c d' has 3-grams {abc, bcd}; 'x a b c' contains abc; 'a b x c d' has abx, bxc, xcd: none.
    Eval text '你好' has 2 tokens < 3: counted as too short. Chinese 3-gram '天氣很' is shared."""
    d = Decontaminator(["a b c d", "你好", "今天天氣很好"], n=3)
    assert d.too_short == 1
    assert d.contaminated("X A, B. C!") and not d.contaminated("a b x c d")
    assert d.contaminated("明天天氣很冷") and not d.contaminated("天氣")


def test_shingle_hashes_counts():
    """k=5: 'abcde' has 1 shingle, 'abcdef' 2, 'aaaaaa' 2 equal ones -> 1 distinct, 'ab' shorter than k -> 1."""
    assert [len(shingle_hashes(t, 5)) for t in ["abcde", "abcdef", "aaaaaa", "ab", ""]] == [1, 2, 1, 1, 1]
    assert shingle_hashes("abcdef", 5).dtype == np.uint64


def test_minhash_estimates_jaccard():
    """5-shingles of 'abcdefghij' and 'abcdefghiX': 6 each, 5 shared, union 7 -> Jaccard 5/7 = 0.714; a 128-perm
    estimate has std sqrt(0.714 * 0.286 / 128) = 0.04, so it is within 0.12 (3 std)."""
    s1, s2 = minhash("abcdefghij"), minhash("abcdefghiX")
    assert s1.shape == (128,) and np.array_equal(s1, minhash("ABCDEFGHIJ"))  # normalised: case does not matter
    assert abs((s1 == s2).mean() - 5 / 7) < 0.12
    assert (minhash("completely different") == s1).mean() < 0.1


def test_lsh_params_reach_recall_at_threshold():
    """(12 bands, 10 rows) at 0.9: 0.9^10 = 0.349, 1 - (1 - 0.349)^12 = 0.994 >= 0.99; 11 rows would give
    1 - (1 - 0.9^11)^11 = 0.984 < 0.99, and fewer rows let more dissimilar pairs through."""
    assert lsh_params(0.9, 128) == (12, 10)


def test_near_duplicate_of_needs_every_field_similar():
    """The 125-character story has 120 distinct 5-shingles; appending '！' adds one, so Jaccard = 120/121 = 0.99.
    Its one-word edit ('牛肉麵' -> '牛肉湯麵') shares 116 of 125 shingles: 0.928 exactly, MinHash-estimated 0.898
    with seed 0, so at threshold 0.95 it is not a near duplicate."""
    base = ("今天天氣很好，我們去公園散步吧。公園裡有很多人在跑步、打太極拳，還有小朋友在玩耍。"
            "中午我們在湖邊的小餐館吃了牛肉麵和小籠包，味道非常好。下午天空突然變暗，下起了一陣大雨，"
            "我們只好躲進附近的書店，一邊看書一邊等雨停。傍晚雨停了，夕陽把整條街染成金色。")
    fields = [[base, "好啊，走吧。"],
              [base + "！", "好啊，走吧。"],  # near duplicate of 0
              [base, "不要，我想在家。"],  # same prompt, different reply: a different comparison, kept
              [base.replace("牛肉麵", "牛肉湯麵"), "好啊，走吧。"]]
    assert near_duplicate_of(fields, threshold=0.95) == [None, 0, None, None]


def test_exact_duplicate_of():
    assert exact_duplicate_of(["a", "b", "a", "a", "c"]) == [None, None, 0, 0, None]


def test_clean_records_pairs():
    recs = [
        {"prompt": [u("翻譯成中文：Good morning")], "chosen": [a("譯文：早安。")], "rejected": [a("早")]},
        {"prompt": [u("q")], "chosen": [a("The steps are:")], "rejected": [a("ok.")]},     # truncated chosen
        {"prompt": [u("q")], "chosen": [a("Fine.")], "rejected": [a("cut off,")]},         # truncated rejected: kept
        {"prompt": [u("翻譯成中文：Good  morning")], "chosen": [a("早安。")], "rejected": [a("早")]},  # = record 0
        {"prompt": [u("q")], "chosen": [a("Sure.")], "rejected": [a("")]},                  # empty rejected
    ]
    kept, dropped = clean_records("pairs", recs, CleanConfig())
    assert [i for i, _ in kept] == [0, 2]
    assert kept[0][1]["chosen"] == [a("早安。")] and recs[0]["chosen"] == [a("譯文：早安。")]  # input not edited
    assert sorted(dropped) == [(1, "truncated sentence"), (3, "duplicate"), (4, "empty reply")]
    kept, dropped = clean_records("pairs", recs, CleanConfig(dedupe=False))
    assert [i for i, _ in kept] == [0, 2, 3]


def test_clean_records_unpaired_sft_decontaminate_and_pii():
    recs = [{"prompt": [u("mail a@b.co")], "completion": [a("unfinished (")], "label": False},  # negative: kept
            {"prompt": [u("mail a@b.co")], "completion": [a("unfinished (")], "label": True},   # positive: dropped
            {"prompt": [u("q")], "completion": [a("one two three four")], "label": True}]
    cfg = CleanConfig(scrub_pii=True, decontaminator=Decontaminator(["x two three four y"], n=3))
    kept, dropped = clean_records("unpaired", recs, cfg)
    assert kept == [(0, {"prompt": [u("mail <EMAIL>")], "completion": [a("unfinished (")], "label": False})]
    assert dropped == [(1, "unbalanced brackets or quotes"), (2, "contaminated (3-gram overlap with eval data)")]
    sft = [{"messages": [u("Give JSON"), a('```json\n{"a": 1,}\n```')]}, {"messages": [u("hi"), a("Hello!")]}]
    kept, dropped = clean_records("sft", sft, CleanConfig())
    assert [i for i, _ in kept] == [1] and dropped == [(0, "malformed JSON")]
