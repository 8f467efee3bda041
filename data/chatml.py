"""ChatML rendering, tokenisation with loss masks, and the label shift: the ONE place for all three.

Rendering is byte-for-byte Qwen2-Instruct's chat template, and with tools Qwen2.5-Instruct's (tests render the real
Jinja templates, kept in tests/fixtures/, to prove it):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n      (inserted when messages[0] is not a system turn)
    <|im_start|>{role}\\n{content}<|im_end|>\\n                          (every message)
    <|im_start|>assistant\\n                                            (add_generation_prompt=True)

Tool use (Qwen2.5's template, `tools=[json schema, ...]`):
  - the system turn is the system message (or `default_system`) + "\\n\\n# Tools ... <tools>\\n{tool json}...</tools>
    ... </tool_call>" (TOOLS_PREAMBLE / TOOLS_POSTAMBLE); with default_system=None and no system message the tools
    block alone (our extension: Qwen2.5's template always writes its default system text);
  - an assistant message with `tool_calls` renders each call as "<tool_call>\\n{"name": ..., "arguments": ...}
    \\n</tool_call>" after its content (content may then be empty or missing);
  - consecutive `tool` messages render as ONE user turn of "<tool_response>\\n{content}\\n</tool_response>" blocks.
JSON inside (`tool | tojson`, `arguments | tojson`) is json.dumps(x, ensure_ascii=False), as transformers' chat
template environment defines `tojson`. A string `arguments` renders as a JSON string, as the template does.

Each turn therefore has five parts: `<|im_start|>`, the header `{role}\\n`, the body, `<|im_end|>`, and the separator
`\\n` after `<|im_end|>`. Tokenisation is done BY CONSTRUCTION: the string is split only at the special tokens (they
are atomic added tokens, so a tokenizer never merges across them), each text piece is tokenised with character
offsets, and each token is assigned to the header or the body by its offsets. Tests prove that the ids equal
tokenising the whole rendered string, so the mask is emitted while rendering and can never drift from the ids
(docs/PITFALLS.md#chat-template-and-loss-masks).

Header/body boundary: the Qwen2 split regex has the alternative `\\s*[\\r\\n]+`, so when the body starts with
whitespace that contains a newline (e.g. "\\nHi" or "  \\nHi"), the header's "\\n" and the body's leading whitespace
become ONE token. Such a straddling token is assigned to the BODY (rule: a token is body if any of its characters
is body). So every body character is covered by a learned token when the body is learned.

Mask strategies (loss_mask[t] = 1 means token t is a training target; everything else is masked):
  "all_assistant" (default): for EVERY assistant turn, its body (content and tool calls) and its closing <|im_end|>.
      Masked: system, user and tool-result turns entirely, every <|im_start|>, the header "assistant\\n", and the
      "\\n" after <|im_end|>.
  "last_assistant": as "all_assistant", but only for the final assistant turn (earlier assistant turns are context).
  "qwen_finetune": Qwen's original finetune.py (QwenLM/Qwen, `preprocess`): in EVERY turn (system and user too)
      <|im_start|>, <|im_end|> and the "\\n" after it are learned; the role name and the "\\n" after it are masked;
      system/user/tool-result content is masked; assistant content is learned. Qwen's script writes these as
      unshifted labels (targets[t] = input_ids[t] or IGNORE); our loss_mask marks exactly the same tokens. The
      <|im_start|> of a generation prompt is learned too; its header is masked.
  "none": nothing is learned (prompt-only sequences).
An assistant message with "weight": 0 (OpenAI's fine-tuning convention) is context in every strategy: its body and
<|im_end|> are never learned (in qwen_finetune it is treated like a user turn). weight 1 or no weight: as above.

Roles are "system", "user", "assistant" and "tool". No rendered text (content, tool names, arguments, tool
schemas) may contain special-token text such as "<|im_start|>" (it would inject turn markers): ValueError. Records
read with data.datasets.load_records or imported by data.feedback have it escaped first (data/validate.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

IGNORE_INDEX = -100  # the ignore index of torch.nn.functional.cross_entropy; the only definition in the package
IM_START, IM_END, ENDOFTEXT, REWARD_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|reward|>"
SPECIAL_STRINGS = (IM_START, IM_END, ENDOFTEXT, REWARD_TOKEN)
# Text shaped like a Qwen control token: ours above, and Qwen2.5's <|fim_prefix|>, <|vision_start|>, ...
SPECIAL_TEXT = re.compile(r"<\|[A-Za-z0-9_]{1,64}\|>")
QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
GENERATION_PROMPT = IM_START + "assistant\n"
ROLES = ("system", "user", "assistant", "tool")
MASK_STRATEGIES = ("all_assistant", "last_assistant", "qwen_finetune", "none")
TOOLS_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_POSTAMBLE = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                   "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                   "\"arguments\": <args-json-object>}\n</tool_call>")

# Qwen2-Instruct's chat_template (tokenizer_config.json), set on the tokenizers built in data/tokenizer.py.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class TokenizedChat:
    input_ids: list[int]  # (T,)
    loss_mask: list[int]  # (T,) 1 where the token is a training target (see the module docstring)


@dataclass
class Turn:
    role: str  # the header role: "system", "user" (also for tool results) or "assistant"
    body: str | None  # None: the open generation-prompt turn
    learnable: bool = False  # an assistant turn whose weight is not 0
    tool: bool = False  # a user turn made of tool results


def tojson(x) -> str:
    """transformers' chat-template `tojson` filter (json.dumps, not Jinja's HTML-escaping one)."""
    return json.dumps(x, ensure_ascii=False)


def _tool_call_parts(call, where: str) -> tuple[str, object]:
    """(name, arguments) of one tool call: {"type": "function", "function": {name, arguments}} or {name, arguments}."""
    if not isinstance(call, dict):
        raise ValueError(f"{where}: a tool call must be a dict, got {type(call).__name__}")
    fn = call["function"] if "function" in call else call
    if not isinstance(fn, dict):
        raise ValueError(f"{where}.function: must be a dict with 'name' and 'arguments', got {type(fn).__name__}")
    if not isinstance(fn.get("name"), str):
        raise ValueError(f"{where}: 'name' must be a string, got {type(fn.get('name')).__name__}")
    if "arguments" not in fn:
        raise ValueError(f"{where}: has no 'arguments'")
    return fn["name"], fn["arguments"]


def render_tool_call(call) -> str:
    name, arguments = _tool_call_parts(call, "tool_call")
    return '<tool_call>\n{"name": "' + name + '", "arguments": ' + tojson(arguments) + "}\n</tool_call>"


def assistant_body(message: dict) -> str:
    """What follows "<|im_start|>assistant\\n": the content, then each tool call on its own lines (Qwen2.5)."""
    calls = message.get("tool_calls")
    if not calls:
        return message["content"]
    content = message.get("content")
    return "\n".join(([content] if content else []) + [render_tool_call(c) for c in calls])


def tools_system(system: str | None, tools: list) -> str:
    """The system turn's body when tools are given (Qwen2.5's template)."""
    block = TOOLS_PREAMBLE + "".join("\n" + tojson(t) for t in tools) + TOOLS_POSTAMBLE
    return block if system is None else system + "\n\n" + block


def _check_text(text: str, where: str) -> None:
    m = SPECIAL_TEXT.search(text) if "<|" in text else None
    if m:
        raise ValueError(f"{where}: contains the special token {m.group()!r} as text (escape it: "
                         f"data.validate.escape_special_text)")


def _check_message(m, where: str) -> None:
    if not isinstance(m, dict):
        raise ValueError(f"{where}: a message must be a dict with 'role' and 'content', got {type(m).__name__}")
    role = m.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}: 'role' must be one of {ROLES}, got {role!r}")
    calls = m.get("tool_calls")
    if calls is not None and (role != "assistant" or not isinstance(calls, list)):
        raise ValueError(f"{where}: 'tool_calls' must be a list, on an assistant message")
    content = m.get("content")
    if not isinstance(content, str) and not (calls and content is None):
        raise ValueError(f"{where}: 'content' must be a string, got {type(content).__name__}")
    for j, call in enumerate(calls or []):
        _tool_call_parts(call, f"{where}.tool_calls[{j}]")
    if "weight" in m and (role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], float)):
        raise ValueError(f"{where}: 'weight' must be 0 or 1, on an assistant message, got {m['weight']!r}")
    _check_text(assistant_body(m) if role == "assistant" else content, where)


def check_messages(messages, where: str = "messages", tools=None) -> None:
    """Raise ValueError naming the message and the problem unless `messages` is a list of valid messages (and
    `tools`, when given, a list of tool schema dicts)."""
    if not isinstance(messages, list):
        raise ValueError(f"{where}: must be a list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        _check_message(m, f"{where}[{i}]")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise ValueError(f"tools: must be a list of tool schema dicts, got {type(tools).__name__}")
        _check_text(tojson(tools), "tools")


def _turns(messages, add_generation_prompt: bool, default_system: str | None, tools=None) -> list[Turn]:
    """The turns Qwen2.5's template renders (Qwen2's when there are no tools or tool messages)."""
    check_messages(messages, tools=tools)
    msgs = list(messages)
    turns = []
    if msgs and msgs[0]["role"] == "system":
        system = msgs.pop(0)["content"]
    else:
        system = default_system
    if tools:
        turns.append(Turn("system", tools_system(system, tools)))
    elif system is not None:
        turns.append(Turn("system", system))
    for m in msgs:
        if m["role"] == "tool":
            block = "<tool_response>\n" + m["content"] + "\n</tool_response>"
            if turns and turns[-1].tool:
                turns[-1].body += "\n" + block
            else:
                turns.append(Turn("user", block, tool=True))
        elif m["role"] == "assistant":
            turns.append(Turn("assistant", assistant_body(m), learnable=m.get("weight", 1) != 0))
        else:
            turns.append(Turn(m["role"], m["content"]))
    if add_generation_prompt:
        turns.append(Turn("assistant", None))
    return turns


def render(messages, add_generation_prompt: bool = False, default_system: str | None = QWEN2_DEFAULT_SYSTEM,
           tools: list | None = None) -> str:
    """The ChatML string Qwen2's chat template renders (Qwen2.5's with tools or tool messages; pass
    default_system=QWEN25_DEFAULT_SYSTEM for Qwen2.5's default). default_system=None inserts no system turn."""
    out = []
    for turn in _turns(messages, add_generation_prompt, default_system, tools):
        out.append(IM_START + turn.role + "\n")
        if turn.body is not None:
            out.append(turn.body + IM_END + "\n")
    return "".join(out)


def special_id(tokenizer, token: str) -> int:
    """The id of a special token, or ValueError if the tokenizer does not have it as a single token."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != token:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no special token {token!r}")
    return tid


def _learned(mask: str, part: str, turn: Turn, index: int, last_assistant: int) -> int:
    """1 if a token of `part` ("im_start", "header", "body", "im_end", "sep") of turn `index` is learned."""
    if mask == "none":
        return 0
    if mask == "qwen_finetune":
        return int(part in ("im_start", "im_end", "sep") or (part == "body" and turn.learnable))
    is_target = turn.learnable and part in ("body", "im_end")
    if mask == "all_assistant":
        return int(is_target)
    return int(is_target and index == last_assistant)  # "last_assistant"


def tokenize_chat(
    tokenizer,
    messages,
    mask: str = "all_assistant",
    add_generation_prompt: bool = False,
    default_system: str | None = QWEN2_DEFAULT_SYSTEM,
    tools: list | None = None,
) -> TokenizedChat:
    """Tokenise render(messages, ...) and emit the per-token loss mask of strategy `mask` (module docstring)."""
    if mask not in MASK_STRATEGIES:
        raise ValueError(f"mask must be one of {MASK_STRATEGIES}, got {mask!r}")
    turns = _turns(messages, add_generation_prompt, default_system, tools)
    im_start, im_end = special_id(tokenizer, IM_START), special_id(tokenizer, IM_END)
    # Text pieces between special tokens: "{role}\n{body}" inside a turn, "\n" after each <|im_end|>.
    pieces = []
    for turn in turns:
        pieces.append(turn.role + "\n" + (turn.body or ""))
        if turn.body is not None:
            pieces.append("\n")
    enc = tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=True)
    last_assistant = max((t for t, turn in enumerate(turns) if turn.role == "assistant" and turn.body is not None),
                         default=-1)

    ids, loss_mask = [], []
    k = 0  # index into pieces
    for index, turn in enumerate(turns):
        ids.append(im_start)
        loss_mask.append(_learned(mask, "im_start", turn, index, last_assistant))
        header_end = len(turn.role) + 1  # characters of "{role}\n"
        for tid, (_, end) in zip(enc["input_ids"][k], enc["offset_mapping"][k]):
            ids.append(tid)  # a straddling token goes to the body
            loss_mask.append(_learned(mask, "body" if end > header_end else "header", turn, index, last_assistant))
        k += 1
        if turn.body is not None:
            ids.append(im_end)
            loss_mask.append(_learned(mask, "im_end", turn, index, last_assistant))
            for tid in enc["input_ids"][k]:
                ids.append(tid)
                loss_mask.append(_learned(mask, "sep", turn, index, last_assistant))
            k += 1
    return TokenizedChat(input_ids=ids, loss_mask=loss_mask)


def tokenize_response(tokenizer, reply: str | dict) -> list[int]:
    """Ids of an assistant reply as generated after the generation prompt: body tokens then <|im_end|>.

    `reply` is the content string or an assistant message (whose tool calls are part of the body). The body is
    tokenised on its own, exactly as a sampler produces it after "<|im_start|>assistant\n".
    """
    msg = {"role": "assistant", "content": reply} if isinstance(reply, str) else reply
    check_messages([msg], where="response")
    if msg.get("role") != "assistant":
        raise ValueError(f"response: must be an assistant message, got role {msg.get('role')!r}")
    return tokenizer(assistant_body(msg), add_special_tokens=False)["input_ids"] + [special_id(tokenizer, IM_END)]


def shift_labels(input_ids: list[int], loss_mask: list[int]) -> list[int]:
    """Next-token labels aligned with the logits: the ONLY place the label shift happens.

    labels[t] = input_ids[t + 1] if loss_mask[t + 1] else IGNORE_INDEX, and labels[T - 1] = IGNORE_INDEX,
    so logits[t] (which has seen tokens 0..t) is scored against the token it must predict.  # all (T,)
    """
    if len(input_ids) != len(loss_mask):
        raise ValueError(f"input_ids has {len(input_ids)} tokens but loss_mask has {len(loss_mask)}")
    labels = [tid if m else IGNORE_INDEX for tid, m in zip(input_ids[1:], loss_mask[1:])]
    return labels + [IGNORE_INDEX] if input_ids else []
