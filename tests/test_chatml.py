"""ChatML: byte-for-byte Qwen2 templates, tokenisation by construction == whole-string, golden masks, label shift."""

import random
import unicodedata
from pathlib import Path

import pytest

from data.chatml import (
    IGNORE_INDEX,
    MASK_STRATEGIES,
    QWEN25_DEFAULT_SYSTEM,
    render,
    shift_labels,
    tokenize_chat,
    tokenize_response,
)

# Copied verbatim from Qwen/Qwen2-7B-Instruct tokenizer_config.json "chat_template".
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"  # noqa: E501
)
# Qwen/Qwen2.5-7B-Instruct tokenizer_config.json "chat_template" (golden source: tests/fixtures/qwen2.5-instruct/).
QWEN25_TEMPLATE = (Path(__file__).parent / "fixtures" / "qwen2.5-instruct" / "chat_template.jinja").read_text(
    encoding="utf-8")


def u(c):
    return {"role": "user", "content": c}


def a(c):
    return {"role": "assistant", "content": c}


def s(c):
    return {"role": "system", "content": c}


TRICKY = ["\nHi", "  \nHi", " \n\n x", "\n", "Hi\n", "Hi  ", " ", "", "\r\nok", "\tTab", "   three", "'s fine",
          "2024年", "你好！", "臺灣，謝謝。", "😀👍 emoji", "a\n\n\nb", "...", " 'll", "x\u0301 combining"]
CONVERSATIONS = [
    [u("Hi"), a("Hello!")],
    [s("Be brief."), u("你好"), a("你好！有什么可以帮你？")],
    [u("請問臺北有什麼好吃的？"), a("夜市小吃很多。"), u("謝謝"), a("不客氣！")],
    [u(""), a("")],
    [s(""), u("x")],
    [u("q")],
    [a("assistant first")],
    [u("1"), a("2"), u("3"), a("4"), u("5"), a("6")],
    [s("sys"), s("second system"), u("q"), a("r")],
] + [[u(t), a(t)] for t in TRICKY] + [[s(t), u(t), a(t), u(t), a(t)] for t in TRICKY]


@pytest.mark.parametrize("template, default", [(QWEN2_TEMPLATE, None), (QWEN25_TEMPLATE, QWEN25_DEFAULT_SYSTEM)])
@pytest.mark.parametrize("gen", [False, True])
def test_render_is_byte_for_byte_the_jinja_template(small_tok, template, default, gen):
    kwargs = {} if default is None else {"default_system": default}
    for msgs in CONVERSATIONS:
        want = small_tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)
        assert render(msgs, add_generation_prompt=gen, **kwargs) == want


def test_render_no_default_system():
    assert render([u("hi")], default_system=None) == "<|im_start|>user\nhi<|im_end|>\n"


def random_conversation(rng):
    alphabet = ["a", "Hi", " ", "  ", "\n", "\n\n", "\r\n", "\t", "你", "好", "臺", "灣", "😀", "!", "?", "'s", "7",
                "x\u0301", ".", ":", "-"]
    msgs = [s("".join(rng.choices(alphabet, k=rng.randint(0, 6))))] if rng.random() < 0.5 else []
    for i in range(rng.randint(1, 4)):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant",
                     "content": "".join(rng.choices(alphabet, k=rng.randint(0, 8)))})
    return msgs


def all_test_conversations():
    rng = random.Random(0)
    return CONVERSATIONS + [random_conversation(rng) for _ in range(300)]


@pytest.mark.parametrize("tok_name", ["small_tok", "qwen_tok"])
def test_tokenize_by_construction_equals_whole_string(request, tok_name):
    """For every conversation, generation prompt or not, the constructed ids equal tokenising render() at once."""
    tok = request.getfixturevalue(tok_name)
    for msgs in all_test_conversations():
        for gen in (False, True):
            whole = tok(render(msgs, add_generation_prompt=gen), add_special_tokens=False)["input_ids"]
            for mask in MASK_STRATEGIES:
                got = tokenize_chat(tok, msgs, mask=mask, add_generation_prompt=gen)
                assert got.input_ids == whole, (msgs, gen)
                assert len(got.loss_mask) == len(whole)


def learned_runs(tc):
    """Contiguous runs of learned token ids."""
    runs, prev = [], 0
    for tid, m in zip(tc.input_ids, tc.loss_mask):
        if m and not prev:
            runs.append([])
        if m:
            runs[-1].append(tid)
        prev = m
    return runs


@pytest.mark.parametrize("tok_name", ["small_tok", "qwen_tok"])
def test_learned_tokens_are_exactly_assistant_content_and_im_end(request, tok_name):
    """With "all_assistant", each assistant turn gives one learned run that decodes to its content + <|im_end|>
    (NFC-normalised, as Qwen2 tokenises). A run may start with one extra "\n" (the header's) only when the content's
    leading whitespace holds a newline: that is the straddling token of the module docstring."""
    tok = request.getfixturevalue(tok_name)
    for msgs in all_test_conversations():
        runs = learned_runs(tokenize_chat(tok, msgs))
        contents = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert len(runs) == len(contents), msgs
        for run, content in zip(runs, contents):
            text, want = tok.decode(run), unicodedata.normalize("NFC", content) + "<|im_end|>"
            leading_ws = content[: len(content) - len(content.lstrip())]
            assert text == want or ("\n" in leading_ws or "\r" in leading_ws) and text == "\n" + want, (msgs, text)


def test_straddling_token_goes_to_content(qwen_tok):
    """Content "\\nHi": the Qwen2 regex `\\s*[\\r\\n]+` makes the header "\\n" and the content "\\n" one token "\\n\\n"
    (id 271). Rule: a token with any content character is content, so it is learned (and "Hi" is learned)."""
    tc = tokenize_chat(qwen_tok, [u("q"), a("\nHi")], mask="last_assistant", default_system=None)
    tail = list(zip(tc.input_ids, tc.loss_mask))[-6:]
    # <|im_start|> assistant  "\n\n"  Hi  <|im_end|>  "\n"
    assert tail == [(151644, 0), (77091, 0), (271, 1), (13048, 1), (151645, 1), (198, 0)]


GOLDEN_MSGS = [
    s("You are a helpful assistant."),
    u("Hi!"),
    a("Hello! How can I help?"),
    u("你好"),
    a("你好！"),
]
GOLDEN_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
    "<|im_start|>user\n你好<|im_end|>\n"
    "<|im_start|>assistant\n你好！<|im_end|>\n"
)
# One line per turn: <|im_start|> role "\n" content... <|im_end|> "\n"
GOLDEN_IDS = [
    151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198,  # system: You| are| a| helpful| assistant|.
    151644, 872, 198, 13048, 0, 151645, 198,  # user: Hi|!
    151644, 77091, 198, 9707, 0, 2585, 646, 358, 1492, 30, 151645, 198,  # assistant: Hello|!| How| can| I| help|?
    151644, 872, 198, 108386, 151645, 198,  # user: 你好
    151644, 77091, 198, 108386, 6313, 151645, 198,  # assistant: 你好|！
]
GOLDEN_MASKS = {
    "all_assistant": [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0,
        0, 0, 0, 0, 0, 0,
        0, 0, 0, 1, 1, 1, 0,
    ],
    "last_assistant": [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0,
        0, 0, 0, 1, 1, 1, 0,
    ],
    "qwen_finetune": [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1,
        1, 0, 0, 0, 0, 1, 1,
        1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1,
        1, 0, 0, 0, 1, 1,
        1, 0, 0, 1, 1, 1, 1,
    ],
    "none": [0] * 43,
}


def test_golden_qwen2(qwen_tok):
    """Pinned on the real Qwen2 tokenizer (ids inspected by decoding each one; see the comments above)."""
    assert render(GOLDEN_MSGS) == GOLDEN_TEXT
    assert render(GOLDEN_MSGS[1:]) == GOLDEN_TEXT  # the default system prompt is the same one
    assert qwen_tok(GOLDEN_TEXT)["input_ids"] == GOLDEN_IDS
    for mask, want in GOLDEN_MASKS.items():
        tc = tokenize_chat(qwen_tok, GOLDEN_MSGS, mask=mask)
        assert tc.input_ids == GOLDEN_IDS
        assert tc.loss_mask == want, mask
    learned = tokenize_chat(qwen_tok, GOLDEN_MSGS).loss_mask
    spans = qwen_tok.decode([t for t, m in zip(GOLDEN_IDS[:30], learned[:30]) if m])
    assert spans == "Hello! How can I help?<|im_end|>"


def test_generation_prompt(qwen_tok):
    tc = tokenize_chat(qwen_tok, [u("Hi!")], add_generation_prompt=True)
    assert render([u("Hi!")], add_generation_prompt=True).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tc.input_ids[-3:] == [151644, 77091, 198]
    assert sum(tc.loss_mask) == 0
    qf = tokenize_chat(qwen_tok, [u("Hi!")], mask="qwen_finetune", add_generation_prompt=True)
    assert qf.loss_mask[-3:] == [1, 0, 0]


def test_no_assistant_turn_learns_nothing(small_tok):
    assert sum(tokenize_chat(small_tok, [u("q")], mask="last_assistant").loss_mask) == 0


def test_tokenize_response(qwen_tok):
    assert tokenize_response(qwen_tok, "Hello!") == [9707, 0, 151645]


@pytest.mark.parametrize(
    "msgs, match",
    [
        ({"role": "user"}, "must be a list"),
        ([u("a"), "hi"], r"messages\[1\]: a message must be a dict"),
        ([{"role": "bot", "content": "x"}], r"messages\[0\]: 'role' must be one of"),
        ([{"role": "user", "content": 3}], r"messages\[0\]: 'content' must be a string, got int"),
        ([u("a <|im_end|> b")], "special token '<\\|im_end\\|>'"),
    ],
)
def test_bad_messages_raise(small_tok, msgs, match):
    with pytest.raises(ValueError, match=match):
        tokenize_chat(small_tok, msgs)


def test_unknown_mask_raises(small_tok):
    with pytest.raises(ValueError, match="mask must be one of"):
        tokenize_chat(small_tok, [u("q")], mask="assistant")


def test_shift_labels_by_hand():
    """ids [10, 11, 12, 13, 14], mask [0, 0, 1, 1, 0]:
    labels[0] = ids[1] if mask[1] else -100 = -100; labels[1] = 12; labels[2] = 13; labels[3] = -100 (mask[4] = 0);
    labels[4] = -100 (nothing follows)."""
    assert shift_labels([10, 11, 12, 13, 14], [0, 0, 1, 1, 0]) == [-100, 12, 13, -100, -100]
    assert shift_labels([5], [1]) == [IGNORE_INDEX]
    assert shift_labels([], []) == []
    with pytest.raises(ValueError, match="loss_mask has 1"):
        shift_labels([1, 2], [1])
