"""Tool calls in ChatML: byte for byte Qwen2.5-Instruct's real chat template (tests/fixtures/qwen2.5-instruct/),
ids by construction == tokenising the whole string on the real Qwen2 tokenizer, and masks that learn the
assistant's tool-call text but never the tool results."""

import json
from pathlib import Path

import pytest

from data.chatml import (
    QWEN25_DEFAULT_SYSTEM,
    MASK_STRATEGIES,
    assistant_body,
    render,
    tokenize_chat,
    tokenize_response,
)

TEMPLATE = (Path(__file__).parent / "fixtures" / "qwen2.5-instruct" / "chat_template.jinja").read_text(encoding="utf-8")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time <now>.",
                                         "parameters": {"type": "object", "properties": {}}}}


def u(c):
    return {"role": "user", "content": c}


def a(c):
    return {"role": "assistant", "content": c}


def s(c):
    return {"role": "system", "content": c}


def tool(c):
    return {"role": "tool", "content": c}


def call(name, args, wrap=True):
    return {"type": "function", "function": {"name": name, "arguments": args}} if wrap else {"name": name,
                                                                                             "arguments": args}


def calls(*cs, content=None, key=True):
    m = {"role": "assistant", "tool_calls": list(cs)}
    if key:
        m["content"] = content
    return m


CASES = [  # (messages, tools)
    ([u("Weather in Taipei?")], [WEATHER]),
    ([s("Be brief."), u("Weather in Taipei?")], [WEATHER, TIME]),
    ([u("Weather in Taipei?"), calls(call("get_weather", {"city": "Taipei"})), tool('{"temp": 31, "sky": "晴"}'),
      a("31 °C and sunny.")], [WEATHER]),
    ([u("天氣？"), calls(call("get_weather", {"city": "臺北"}), content="我查一下。"), tool("晴，31度")], [WEATHER]),
    ([u("Both?"), calls(call("get_weather", {"city": "Paris"}), call("get_time", {}), content=""),
      tool("rain"), tool("14:00"), a("Rain; it is 14:00.")], [WEATHER, TIME]),
    ([u("x"), calls(call("get_weather", '{"city": "Paris"}'), key=False), tool("sun")], [WEATHER]),  # string args
    ([u("x"), calls(call("get_time", {}, wrap=False)), tool("")], [TIME]),  # no "function" wrapper, empty result
    ([tool("result first"), u("and?")], [TIME]),
    ([s("sys"), tool("after system"), tool("two"), a("ok"), u("again"),
      calls(call("get_time", {"tz": "Asia/Taipei", "fmt": ["%H", 24], "n": None})), tool(" \n spaced\n")], None),
    ([u("no tools, but a call"), calls(call("get_time", {})), tool("12:00"), a("Noon.")], None),
    ([u("hi"), {"role": "assistant", "content": "plain", "tool_calls": []}], [WEATHER]),  # empty list: plain turn
    ([u("\nleading newline"), calls(call("f", {"x": "\n"}), content="\nThinking"), tool("\n")], None),
]


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_render_equals_qwen25_template(qwen_tok, case, gen):
    msgs, tools = CASES[case]
    want = qwen_tok.apply_chat_template(msgs, tools=tools, chat_template=TEMPLATE, tokenize=False,
                                        add_generation_prompt=gen)
    assert render(msgs, add_generation_prompt=gen, default_system=QWEN25_DEFAULT_SYSTEM, tools=tools) == want


@pytest.mark.parametrize("gen", [False, True])
def test_ids_by_construction_equal_whole_string(qwen_tok, gen):
    for msgs, tools in CASES:
        text = render(msgs, add_generation_prompt=gen, default_system=QWEN25_DEFAULT_SYSTEM, tools=tools)
        whole = qwen_tok(text, add_special_tokens=False)["input_ids"]
        for mask in MASK_STRATEGIES:
            tc = tokenize_chat(qwen_tok, msgs, mask=mask, add_generation_prompt=gen,
                               default_system=QWEN25_DEFAULT_SYSTEM, tools=tools)
            assert tc.input_ids == whole and len(tc.loss_mask) == len(whole), (msgs, mask)


def learned_text(tok, tc):
    """Decoded runs of learned tokens."""
    runs, cur = [], []
    for tid, m in zip(tc.input_ids, tc.loss_mask):
        if m:
            cur.append(tid)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def test_masks_learn_tool_calls_not_tool_results(qwen_tok):
    """all_assistant: one learned run per assistant turn = its body (content, then each <tool_call> block) and
    <|im_end|>; the tool results (rendered as a user turn) and the tools system block are never learned."""
    for msgs, tools in CASES:
        tc = tokenize_chat(qwen_tok, msgs, default_system=QWEN25_DEFAULT_SYSTEM, tools=tools)
        bodies = [assistant_body(m) for m in msgs if m["role"] == "assistant"]
        runs = learned_text(qwen_tok, tc)
        assert len(runs) == len(bodies), msgs
        for run, body in zip(runs, bodies):
            assert run in (body + "<|im_end|>", "\n" + body + "<|im_end|>"), (run, body)  # "\n": straddling token
        assert not any("<tool_response>" in r or "# Tools" in r for r in runs)


def test_golden_tool_call_conversation(qwen_tok):
    """The whole string and the learned text of one conversation, written out by hand from the template."""
    msgs = [u("Weather?"), calls(call("get_weather", {"city": "臺北"})), tool("晴"), a("Sunny.")]
    text = render(msgs, default_system=QWEN25_DEFAULT_SYSTEM, tools=[WEATHER])
    tools_json = json.dumps(WEATHER, ensure_ascii=False)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\nYou are provided with function "
        f"signatures within <tools></tools> XML tags:\n<tools>\n{tools_json}\n</tools>\n\nFor each function call, "
        "return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
        "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"臺北\"}}\n"
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n晴\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nSunny.<|im_end|>\n")
    tc = tokenize_chat(qwen_tok, msgs, default_system=QWEN25_DEFAULT_SYSTEM, tools=[WEATHER])
    assert learned_text(qwen_tok, tc) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "臺北"}}\n</tool_call><|im_end|>',
        "Sunny.<|im_end|>"]
    last = tokenize_chat(qwen_tok, msgs, mask="last_assistant", default_system=QWEN25_DEFAULT_SYSTEM, tools=[WEATHER])
    assert learned_text(qwen_tok, last) == ["Sunny.<|im_end|>"]
    qf = tokenize_chat(qwen_tok, msgs, mask="qwen_finetune", default_system=QWEN25_DEFAULT_SYSTEM, tools=[WEATHER])
    assert "晴" not in "".join(learned_text(qwen_tok, qf))  # tool results stay masked in Qwen's finetune mask too
    assert '"arguments": {"city": "臺北"}' in "".join(learned_text(qwen_tok, qf))


def test_weight_zero_turn_is_context(qwen_tok):
    """weight 0 (OpenAI's convention): that assistant turn is not learned in any strategy; weight 1 is."""
    msgs = [u("q1"), dict(a("bad answer"), weight=0), u("q2"), dict(a("good answer"), weight=1)]
    for mask in ("all_assistant", "last_assistant"):
        assert learned_text(qwen_tok, tokenize_chat(qwen_tok, msgs, mask=mask)) == ["good answer<|im_end|>"]
    assert "bad" not in "".join(learned_text(qwen_tok, tokenize_chat(qwen_tok, msgs, mask="qwen_finetune")))
    assert render(msgs) == render([{k: v for k, v in m.items() if k != "weight"} for m in msgs])


def test_tokenize_response_with_tool_call(qwen_tok):
    """A reply that is a tool call: the ids a sampler produces after "<|im_start|>assistant\\n"."""
    msg = calls(call("get_time", {}))
    body = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert tokenize_response(qwen_tok, msg) == qwen_tok(body, add_special_tokens=False)["input_ids"] + [151645]
    full = render([u("t?"), msg], default_system=None)
    assert full.endswith("<|im_start|>assistant\n" + body + "<|im_end|>\n")


def test_tools_without_default_system():
    """default_system=None and no system message: the tools block alone is the system turn (our extension)."""
    text = render([u("x")], default_system=None, tools=[TIME])
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call") and "<|im_start|>user\nx" in text


@pytest.mark.parametrize("msgs, tools, match", [
    ([{"role": "assistant", "content": None}], None, r"'content' must be a string, got NoneType"),
    ([{"role": "user", "content": "x", "tool_calls": [call("f", {})]}], None, "on an assistant message"),
    ([calls({"function": {"arguments": {}}})], None, r"tool_calls\[0\]: 'name' must be a string"),
    ([calls({"function": "f"})], None, r"tool_calls\[0\].function: must be a dict"),
    ([calls(call("f", {"q": "<|im_start|>"}))], None, "special token '<\\|im_start\\|>'"),
    ([u("x")], [{"description": "<|endoftext|>"}], r"tools: contains the special token"),
    ([u("x")], "tools", "tools: must be a list"),
    ([dict(a("x"), weight=0.5)], None, "'weight' must be 0 or 1"),
    ([{"role": "tool", "content": 3}], None, "'content' must be a string, got int"),
])
def test_bad_tool_messages_raise(small_tok, msgs, tools, match):
    with pytest.raises(ValueError, match=match):
        tokenize_chat(small_tok, msgs, tools=tools)
