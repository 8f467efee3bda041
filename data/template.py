"""Render conversations as the model folder's chat template does, with loss masks: the folder is the source of truth.

`chat_format(tokenizer)` decides once per tokenizer how its conversations are rendered, by a render comparison at
start-up: a set of probe conversations (no system / system, one and several turns, tools and tool results, the
generation prompt on and off) is rendered by `tokenizer.apply_chat_template` and by data/chatml.py.

- **fast path** (kind "chatml"): data/chatml.py reproduces the template byte for byte on every probe (Qwen2's and
  Qwen2.5's templates do). Its renderer is used, with the template's own default system message (Qwen2: "You are a
  helpful assistant.", Qwen2.5: "You are Qwen, created by Alibaba Cloud. ..."), and masks are emitted while rendering
  (all strategies, qwen_finetune included). When only the tool probes differ, conversations with tools take the
  template path. Our own tokenizers ('qwen2', 'small', 'demo') carry Qwen2-Instruct's template, which cannot render
  tools; for them tools render as Qwen2.5 does (data/chatml.py's documented extension).
- **template path** (kind "template", e.g. Qwen3: its think block): the template renders the whole conversation
  and the masks are derived by construction. For each learned assistant message k the template renders the
  conversation before it with the generation prompt, and that string must be a prefix of the whole render (checked:
  it is what a sampler sees before writing reply k); the reply's span runs from there to the end of the first
  end-of-turn token after it (the token the template closes an assistant turn with: <|im_end|> for Qwen, found by
  the probe). The whole render is tokenised once with character offsets; a token is learned when any of its
  characters lies in a learned span (a token straddling the boundary goes to the reply, as in data/chatml.py). So the
  ids are exactly `apply_chat_template(..., tokenize=True)`, and what is learned is the assistant text the sampler
  writes after the generation prompt, through its end-of-turn token. Strategies: all_assistant, last_assistant,
  none ("weight": 0 replies are context); qwen_finetune is ChatML's own rule and needs the fast path.

Prompts (PPO, DPO, KTO, reward) are the template's render with the generation prompt; a reply is the text the
template puts between the generation prompt and the end-of-turn token, tokenised alone, then that token (for Qwen3
the `<think>\\n\\n</think>\\n\\n` block is part of the reply, as the model writes it).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from data import chatml
from data.chatml import IM_END, IM_START, QWEN2_CHAT_TEMPLATE, QWEN2_DEFAULT_SYSTEM, TokenizedChat, check_messages

TEMPLATE = "template"  # builders' default_system: the chat template's own (anything else forces data/chatml.py)
TEMPLATE_STRATEGIES = ("all_assistant", "last_assistant", "none")

_SYS = {"role": "system", "content": "You are a careful assistant.\nAnswer briefly."}
_U1 = {"role": "user", "content": "Hello! 你好，請問"}
_A1 = {"role": "assistant", "content": "Hi. How can I help?"}
_U2 = {"role": "user", "content": "  \nWhat is 2 + 2?"}
_A2 = {"role": "assistant", "content": "4, of course.\n"}
_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                         "required": ["city"]}}}
_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "臺北"}}}
# (messages, add_generation_prompt, tools)
PLAIN_PROBES = [([_U1], True, None), ([_SYS, _U1], True, None), ([_U1, _A1], False, None),
                ([_SYS, _U1, _A1, _U2, _A2], False, None), ([_U1, _A1, _U2], True, None), ([_SYS, _U1, _A1], False, None)]
TOOL_PROBES = [([_U1], True, [_TOOL]),
               ([_SYS, _U1, {"role": "assistant", "content": "", "tool_calls": [_CALL]},
                 {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "sunny"}, _A1], False,
                [_TOOL]),
               ([_U1, {"role": "assistant", "content": "Let me check.", "tool_calls": [_CALL]},
                 {"role": "tool", "content": "sunny"}], True, [_TOOL])]


def apply_template(tokenizer, messages, add_generation_prompt: bool = False, tools=None) -> str:
    """The tokenizer's own chat template render (a string); ValueError when the template fails on it."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja2 errors, a template's raise_exception(), TypeError on None
        raise ValueError(f"the chat template cannot render this conversation: {type(e).__name__}: {e}") from None


def _has_tools(messages, tools) -> bool:
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


@dataclass
class ChatFormat:
    """How one tokenizer's conversations are rendered and masked (see the module docstring)."""
    tokenizer: object
    fast: bool  # data/chatml.py reproduces the template on every plain probe
    fast_tools: bool  # ... and on the tool probes
    default_system: str | None  # the template's default system message (fast path)
    end_token: str | None  # the token that ends an assistant turn (template path)
    note: str = ""  # why this path: the first differing probe, or what was checked

    # ------------------------------------------------------------------------------------------ dispatch
    def _chatml(self, messages, tools) -> bool:
        return self.fast and (self.fast_tools or not _has_tools(messages, tools))

    def render(self, messages, add_generation_prompt: bool = False, tools=None) -> str:
        if self._chatml(messages, tools):
            return chatml.render(messages, add_generation_prompt, self.default_system, tools)
        check_messages(messages, tools=tools)
        return apply_template(self.tokenizer, messages, add_generation_prompt, tools)

    def tokenize(self, messages, mask: str = "all_assistant", add_generation_prompt: bool = False,
                 tools=None) -> TokenizedChat:
        """Ids and loss mask of a conversation (module docstring)."""
        if self._chatml(messages, tools):
            return chatml.tokenize_chat(self.tokenizer, messages, mask, add_generation_prompt, self.default_system,
                                        tools)
        if mask not in TEMPLATE_STRATEGIES:
            raise ValueError(f"mask {mask!r} is data/chatml.py's ChatML rule, and this tokenizer's chat template is "
                             f"not ChatML as data/chatml.py renders it ({self.note}); use one of "
                             f"{TEMPLATE_STRATEGIES}")
        full = self.render(messages, add_generation_prompt, tools)
        spans = [self._reply_span(messages, k, full, tools) for k in self._learned(messages, mask)]
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        learned = [int(any(s < b and e > a for a, b in spans)) for s, e in enc["offset_mapping"]]  # overlaps a span
        return TokenizedChat(input_ids=list(enc["input_ids"]), loss_mask=learned)

    def prompt_ids(self, messages, tools=None) -> list[int]:
        """The prompt as a sampler gets it: the conversation with the generation prompt."""
        if self._chatml(messages, tools):
            return chatml.tokenize_chat(self.tokenizer, messages, "none", True, self.default_system, tools).input_ids
        text = self.render(messages, True, tools)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def response_ids(self, prompt, reply, tools=None) -> list[int]:
        """The ids a sampler writes for `reply` (a string or an assistant message) after prompt_ids(prompt): the
        reply's text, then the end-of-turn token."""
        msg = {"role": "assistant", "content": reply} if isinstance(reply, str) else reply
        if self._chatml(list(prompt) + [msg], tools):
            return chatml.tokenize_response(self.tokenizer, msg)
        messages = list(prompt) + [msg]
        full = self.render(messages, False, tools)
        start, end = self._reply_span(messages, len(messages) - 1, full, tools)
        body = full[start:end - len(self.end_token)]
        return self.tokenizer(body, add_special_tokens=False)["input_ids"] + [self.end_id]

    def describe(self) -> str:
        """One line for the trainers' start-up log."""
        if self.fast:
            ds = "none" if self.default_system is None else repr(self.default_system)
            tools = "" if self.fast_tools else "; conversations with tools use the template"
            return (f"chat template: ChatML, reproduced byte for byte by data/chatml.py on "
                    f"{len(PLAIN_PROBES) + len(TOOL_PROBES) * self.fast_tools} probe conversations (default system "
                    f"message {ds}){tools}")
        return (f"chat template: rendered by the tokenizer's own template ({self.note}); loss masks derived by "
                f"construction, replies end at {self.end_token}")

    # ------------------------------------------------------------------------------------------ template path
    @property
    def end_id(self) -> int:
        return chatml.special_id(self.tokenizer, self.end_token)

    @staticmethod
    def _learned(messages, mask: str) -> list[int]:
        """Indices of the assistant messages the strategy learns (weight 0: context)."""
        if mask == "none":
            return []
        assistant = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        if mask == "last_assistant":
            assistant = assistant[-1:]
        return [k for k in assistant if messages[k].get("weight", 1) != 0]

    def _reply_span(self, messages, k: int, full: str, tools) -> tuple[int, int]:
        """[start, end) of assistant message k in `full`: from the end of the conversation before it rendered with
        the generation prompt, through the end-of-turn token."""
        if self.end_token is None:
            raise ValueError(f"the chat template closes an assistant turn with no special token ({self.note}); "
                             f"cannot tell where a reply ends")
        prefix = apply_template(self.tokenizer, messages[:k], True, tools)
        if not full.startswith(prefix):
            raise ValueError(f"messages[{k}]: the chat template renders the conversation before this reply "
                             f"differently when the reply follows, so its tokens cannot be located; render it "
                             f"without the later turns (one row per reply) or use a template whose earlier turns "
                             f"do not change")
        end = full.find(self.end_token, len(prefix))
        if end < 0:
            raise ValueError(f"messages[{k}]: no {self.end_token} after the reply in the chat template's render")
        content = messages[k].get("content") or ""
        if "</think>" not in content and content.strip() not in full[len(prefix):end]:
            raise ValueError(f"messages[{k}]: the chat template does not render this reply's text after the "
                             f"generation prompt")
        return len(prefix), end + len(self.end_token)


# ---------------------------------------------------------------------------------------------------- probing
_FORMATS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def chat_format(tokenizer) -> ChatFormat:
    """The tokenizer's ChatFormat, decided by the probe render comparison once per tokenizer and template."""
    template = tokenizer.chat_template
    hit = _FORMATS.get(tokenizer)
    if hit is not None and hit[0] == template:
        return hit[1]
    fmt = _probe(tokenizer)
    _FORMATS[tokenizer] = (tokenizer.chat_template, fmt)
    return fmt


def chatml_format(tokenizer, default_system: str | None) -> ChatFormat:
    """data/chatml.py with a given default system message, whatever the tokenizer's template (explicit override)."""
    return ChatFormat(tokenizer, True, True, default_system, IM_END, "data/chatml.py forced")


def _has_chatml_tokens(tokenizer) -> bool:
    try:
        chatml.special_id(tokenizer, IM_START), chatml.special_id(tokenizer, IM_END)
        return True
    except ValueError:
        return False


def _template_default_system(tokenizer) -> str | None:
    head = IM_START + "system\n"
    text = apply_template(tokenizer, [_U1], True)
    if not text.startswith(head) or IM_END not in text:
        return None
    return text[len(head):text.index(IM_END)]


def _compare(tokenizer, probes, default_system) -> str | None:
    """None when data/chatml.py renders every probe as the template does, else a description of the first miss."""
    for i, (msgs, gen, tools) in enumerate(probes):
        try:
            theirs = apply_template(tokenizer, msgs, gen, tools)
        except Exception as e:  # noqa: BLE001 - a template that cannot render a probe (Qwen2's with tools)
            return f"the template cannot render probe {i}: {type(e).__name__}"
        ours = chatml.render(msgs, gen, default_system, tools)
        if ours != theirs:
            n = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            return f"probe {i} differs from ChatML at character {n}: {theirs[n:n + 30]!r}"
    return None


def _end_token(tokenizer) -> str | None:
    """The first special or added token the template writes after an assistant reply."""
    text = apply_template(tokenizer, [_U1, _A1], False)
    at = text.rfind(_A1["content"])
    if at < 0:
        return None
    after = at + len(_A1["content"])
    tokens = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    found = [(text.find(t, after), t) for t in tokens if t and text.find(t, after) >= 0]
    return min(found)[1] if found else None


def _probe(tokenizer) -> ChatFormat:
    if tokenizer.chat_template is None:
        if not _has_chatml_tokens(tokenizer):
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template and no "
                             f"ChatML tokens: give a tokenizer folder with a chat template (--tokenizer)")
        tokenizer.chat_template = QWEN2_CHAT_TEMPLATE  # saved with the outputs: what the model was trained on
        return ChatFormat(tokenizer, True, True, QWEN2_DEFAULT_SYSTEM, IM_END,
                          "the tokenizer had no chat template: Qwen2-Instruct's ChatML was set on it")
    if _has_chatml_tokens(tokenizer):
        ds = _template_default_system(tokenizer)
        miss = _compare(tokenizer, PLAIN_PROBES, ds)
        if miss is None:
            legacy = tokenizer.chat_template == QWEN2_CHAT_TEMPLATE  # ours: tools as Qwen2.5 renders them
            tool_miss = None if legacy else _compare(tokenizer, TOOL_PROBES, ds)
            return ChatFormat(tokenizer, True, tool_miss is None, ds, IM_END, tool_miss or "")
    else:
        miss = "the tokenizer has no <|im_start|> / <|im_end|> tokens"
    end = _end_token(tokenizer)
    return ChatFormat(tokenizer, False, False, None, end, miss)


def load_chat_tokenizer(name: str | None, model_path: str | None, tag: str, main: bool = True, flag="--tokenizer",
                        chat: bool = True):
    """A trainer's tokenizer: `name` when given, else the model folder's (data.tokenizer.resolve_tokenizer); its
    chat format decided now (chat=False: plain text, none) and printed once (main process) as `[tag] tokenizer ...:
    chat template: ...`. A missing tokenizer or a template that cannot be used is a common.config.ConfigError (one
    line, exit 2)."""
    from common.config import ConfigError
    from data.tokenizer import resolve_tokenizer

    try:
        tok = resolve_tokenizer(name, model_path, flag)
        note = chat_format(tok).describe() if chat else "plain text"
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if main:
        print(f"[{tag}] tokenizer {name or model_path}: {note}", flush=True)
    return tok
