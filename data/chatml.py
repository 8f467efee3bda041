"""ChatML rendering, tokenisation with loss masks, and the label shift: the ONE place for all three.

Rendering is byte-for-byte Qwen2-Instruct's chat template (tests render the real Jinja templates to prove it):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n      (inserted when messages[0] is not a system turn)
    <|im_start|>{role}\\n{content}<|im_end|>\\n                          (every message)
    <|im_start|>assistant\\n                                            (add_generation_prompt=True)

Each turn therefore has five parts: `<|im_start|>`, the header `{role}\\n`, the content, `<|im_end|>`, and the
separator `\\n` after `<|im_end|>`. Tokenisation is done BY CONSTRUCTION: the string is split only at the special
tokens (they are atomic added tokens, so a tokenizer never merges across them), each text piece is tokenised with
character offsets, and each token is assigned to the header or the content by its offsets. Tests prove that the ids
equal tokenising the whole rendered string, so the mask is emitted while rendering and can never drift from the ids
(PITFALLS.md #4).

Header/content boundary: the Qwen2 split regex has the alternative `\\s*[\\r\\n]+`, so when the content starts with
whitespace that contains a newline (e.g. "\\nHi" or "  \\nHi"), the header's "\\n" and the content's leading
whitespace become ONE token. Such a straddling token is assigned to the CONTENT (rule: a token is content if any of
its characters is content). So every content character is covered by a learned token when the content is learned.
Content that starts with anything else (a letter, a space followed by a letter, punctuation) never straddles.

Mask strategies (loss_mask[t] = 1 means token t is a training target; everything else is masked):
  "all_assistant" (default): for EVERY assistant turn, its content tokens and its closing <|im_end|>. Masked: system
      and user turns entirely, every <|im_start|>, the header "assistant\\n", and the "\\n" after <|im_end|>.
  "last_assistant": as "all_assistant", but only for the final assistant turn (earlier assistant turns are context).
  "qwen_finetune": Qwen's original finetune.py (QwenLM/Qwen, `preprocess`): in EVERY turn (system and user too)
      <|im_start|>, <|im_end|> and the "\\n" after it are learned; the role name and the "\\n" after it are masked;
      system/user content is masked; assistant content is learned. Qwen's script writes these as unshifted labels
      (targets[t] = input_ids[t] or IGNORE); our loss_mask marks exactly the same tokens. (Qwen's script tokenises
      header and content separately; we tokenise the whole string, so ids match what the model sees at inference.)
      The <|im_start|> of a generation prompt is learned too; its header is masked.
  "none": nothing is learned (prompt-only sequences).

Roles are "system", "user" and "assistant". Content may not contain a special token string (that would inject turn
markers); it raises ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100  # the ignore index of torch.nn.functional.cross_entropy; the only definition in the package
IM_START, IM_END, ENDOFTEXT, REWARD_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|reward|>"
SPECIAL_STRINGS = (IM_START, IM_END, ENDOFTEXT, REWARD_TOKEN)
QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
GENERATION_PROMPT = IM_START + "assistant\n"
ROLES = ("system", "user", "assistant")
MASK_STRATEGIES = ("all_assistant", "last_assistant", "qwen_finetune", "none")

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


def check_messages(messages, where: str = "messages") -> None:
    """Raise ValueError naming the message and the problem unless `messages` is a list of {role, content} dicts."""
    if not isinstance(messages, list):
        raise ValueError(f"{where}: must be a list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}[{i}]: a message must be a dict with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"{where}[{i}]: 'role' must be one of {ROLES}, got {m.get('role')!r}")
        content = m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}]: 'content' must be a string, got {type(content).__name__}")
        for special in SPECIAL_STRINGS:
            if special in content:
                raise ValueError(f"{where}[{i}]: content contains the special token {special!r}")


def _with_default_system(messages, default_system):
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": default_system}] + list(messages)
    return list(messages)


def _turns(messages, add_generation_prompt, default_system):
    """(role, content or None) per turn; None content marks the open generation-prompt turn."""
    check_messages(messages)
    turns = [(m["role"], m["content"]) for m in _with_default_system(messages, default_system)]
    if add_generation_prompt:
        turns.append(("assistant", None))
    return turns


def render(messages, add_generation_prompt: bool = False, default_system: str | None = QWEN2_DEFAULT_SYSTEM) -> str:
    """The ChatML string Qwen2's chat template renders. default_system=None inserts no system turn."""
    out = []
    for role, content in _turns(messages, add_generation_prompt, default_system):
        out.append(IM_START + role + "\n")
        if content is not None:
            out.append(content + IM_END + "\n")
    return "".join(out)


def special_id(tokenizer, token: str) -> int:
    """The id of a special token, or ValueError if the tokenizer does not have it as a single token."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != token:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no special token {token!r}")
    return tid


def _learned(mask: str, part: str, role: str, turn: int, last_assistant: int) -> int:
    """1 if a token of `part` ("im_start", "header", "content", "im_end", "sep") in turn `turn` is learned."""
    if mask == "none":
        return 0
    if mask == "qwen_finetune":
        return int(part in ("im_start", "im_end", "sep") or (part == "content" and role == "assistant"))
    is_target = role == "assistant" and part in ("content", "im_end")
    if mask == "all_assistant":
        return int(is_target)
    return int(is_target and turn == last_assistant)  # "last_assistant"


def tokenize_chat(
    tokenizer,
    messages,
    mask: str = "all_assistant",
    add_generation_prompt: bool = False,
    default_system: str | None = QWEN2_DEFAULT_SYSTEM,
) -> TokenizedChat:
    """Tokenise render(messages, ...) and emit the per-token loss mask of strategy `mask` (module docstring)."""
    if mask not in MASK_STRATEGIES:
        raise ValueError(f"mask must be one of {MASK_STRATEGIES}, got {mask!r}")
    turns = _turns(messages, add_generation_prompt, default_system)
    im_start, im_end = special_id(tokenizer, IM_START), special_id(tokenizer, IM_END)
    # Text pieces between special tokens: "{role}\n{content}" inside a turn, "\n" after each <|im_end|>.
    pieces = []
    for role, content in turns:
        pieces.append(role + "\n" + (content or ""))
        if content is not None:
            pieces.append("\n")
    enc = tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=True)
    closed = [t for t, (_, c) in enumerate(turns) if c is not None]
    last_assistant = max((t for t in closed if turns[t][0] == "assistant"), default=-1)

    ids, loss_mask = [], []

    def emit(tid, part, turn):
        ids.append(tid)
        loss_mask.append(_learned(mask, part, turns[turn][0], turn, last_assistant))

    k = 0  # index into pieces
    for turn, (role, content) in enumerate(turns):
        emit(im_start, "im_start", turn)
        header_end = len(role) + 1  # characters of "{role}\n"
        for tid, (_, end) in zip(enc["input_ids"][k], enc["offset_mapping"][k]):
            emit(tid, "content" if end > header_end else "header", turn)  # straddling token -> content
        k += 1
        if content is not None:
            emit(im_end, "im_end", turn)
            for tid in enc["input_ids"][k]:
                emit(tid, "sep", turn)
            k += 1
    return TokenizedChat(input_ids=ids, loss_mask=loss_mask)


def tokenize_response(tokenizer, content: str) -> list[int]:
    """Ids of an assistant reply as generated after the generation prompt: content tokens then <|im_end|>.

    The content is tokenised on its own, exactly as a sampler produces it after "<|im_start|>assistant\\n".
    """
    check_messages([{"role": "assistant", "content": content}], where="response")
    return tokenizer(content, add_special_tokens=False)["input_ids"] + [special_id(tokenizer, IM_END)]


def shift_labels(input_ids: list[int], loss_mask: list[int]) -> list[int]:
    """Next-token labels aligned with the logits: the ONLY place the label shift happens.

    labels[t] = input_ids[t + 1] if loss_mask[t + 1] else IGNORE_INDEX, and labels[T - 1] = IGNORE_INDEX,
    so logits[t] (which has seen tokens 0..t) is scored against the token it must predict.  # all (T,)
    """
    if len(input_ids) != len(loss_mask):
        raise ValueError(f"input_ids has {len(input_ids)} tokens but loss_mask has {len(loss_mask)}")
    labels = [tid if m else IGNORE_INDEX for tid, m in zip(input_ids[1:], loss_mask[1:])]
    return labels + [IGNORE_INDEX] if input_ids else []
