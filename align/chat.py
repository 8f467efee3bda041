"""Talk to a model folder (a trainer's final/, or any causal-LM folder) to look at what training did.

    python -m align.chat runs/sft/final [--system "..."] [--temperature 0.7] [--top_p 0.8] [--engine vllm]
    printf 'Hello!\\nAnd in Chinese?\\n' | python -m align.chat runs/sft/final --temperature 0 --save chat.jsonl

Reads a line, prints the reply, keeps the conversation (each prompt is the whole conversation so far, rendered with the
folder's chat template and its default system message unless --system is given). Replies stop at the folder's
generation-config EOS ids; temperature and top_p default to its generation_config.json. Lines `/reset` (new
conversation) and `/exit`; end of input ends too, so it runs from a pipe. --save writes the conversations as
{"messages": [...]} lines (the SFT format). Engines: the built-in one (any model, CPU or GPU) or vLLM (Qwen2/Qwen3).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Optional

from common.config import ConfigError, cfg, parse_config, user_errors


@dataclass
class ChatConfig:
    model: str = cfg("", "model folder (positional: python -m align.chat FOLDER)")
    system: Optional[str] = cfg(None, "system message; None = the chat template's own default")
    temperature: Optional[float] = cfg(None, "None = the folder's generation_config.json (else 1.0); 0 = greedy")
    top_p: Optional[float] = cfg(None, "None = the folder's generation_config.json (else 1.0)")
    max_new_tokens: int = cfg(256, "reply length limit (tokens)")
    engine: str = cfg("builtin", "'builtin' (any causal LM) or 'vllm' (Qwen2/Qwen3 folders)")
    model_impl: str = cfg("auto", "'auto' (custom model for Qwen2/Qwen3, transformers otherwise), 'custom' or 'hf'")
    tokenizer: Optional[str] = cfg(None, "None = the folder's own; or 'qwen2', 'small', 'demo' or a folder")
    save: Optional[str] = cfg(None, "write the conversations here as {'messages': [...]} JSONL at the end")
    seed: int = cfg(0, "sampling seed (turn t uses seed + t)")

    def validate(self):
        from common.preflight import check_model_folder

        if not self.model:
            raise ConfigError("give a model folder: python -m align.chat FOLDER")
        check_model_folder(self.model, "model")
        if self.engine not in ("builtin", "vllm") or self.model_impl not in ("auto", "custom", "hf"):
            raise ConfigError("engine must be builtin or vllm; model_impl auto, custom or hf")
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be >= 1")
        if (self.temperature is not None and self.temperature < 0) or \
                (self.top_p is not None and not 0 < self.top_p <= 1):
            raise ConfigError("need temperature >= 0 and 0 < top_p <= 1")


class Chat:
    """A model, its tokenizer and chat format, an engine, and the sampling settings."""

    def __init__(self, c: ChatConfig):
        from align.experience import stop_ids
        from align.models import load_causal_lm_any
        from data.template import chat_format, load_chat_tokenizer
        from model.checkpoint import generation_eos_ids, generation_sampling
        from rollout import make_engine

        self.c = c
        self.tok = load_chat_tokenizer(c.tokenizer, c.model, "chat")
        self.fmt = chat_format(self.tok)
        self.stop = stop_ids(self.tok, None, generation_eos_ids(c.model))
        gen = generation_sampling(c.model)
        self.temperature = c.temperature if c.temperature is not None else gen.get("temperature", 1.0)
        self.top_p = c.top_p if c.top_p is not None else gen.get("top_p", 1.0)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        if c.engine == "vllm":
            try:
                self.engine = make_engine("vllm", None, c.model, max_model_len=self.tok.model_max_length
                                          if self.tok.model_max_length < 32768 else 4096, seed=c.seed)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        else:
            self.engine = make_engine("builtin", load_causal_lm_any(c.model, c.model_impl), pad_id=pad)
        print(f"[chat] {c.model}: temperature {self.temperature:g}, top_p {self.top_p:g}, stop ids {self.stop}, "
              f"engine {c.engine}", file=sys.stderr, flush=True)

    def reply(self, messages: list[dict], turn: int) -> str:
        from rollout.base import SamplingParams

        ids = self.fmt.prompt_ids(messages)
        params = SamplingParams(n=1, temperature=self.temperature, top_p=self.top_p, max_tokens=self.c.max_new_tokens,
                                stop_token_ids=self.stop, seed=self.c.seed + turn)
        out = self.engine.generate([ids], params).response_ids[0]
        return self.tok.decode([t for t in out if t not in self.stop], skip_special_tokens=True)


def run(c: ChatConfig, lines) -> list[list[dict]]:
    """Talk over `lines` (an iterable of input lines); print each reply; return the conversations."""
    from data.validate import escape_special_text

    chat = Chat(c)
    start = [{"role": "system", "content": escape_special_text(c.system)}] if c.system is not None else []
    conversations, messages, turn = [], list(start), 0
    if sys.stdin.isatty():
        print("(type a message; /reset starts over, /exit or Ctrl-D ends)", file=sys.stderr, flush=True)
    for line in lines:
        text = line.rstrip("\r\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            conversations.append(messages)
            messages = list(start)
            print("(new conversation)", file=sys.stderr, flush=True)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": escape_special_text(text)})
        answer = chat.reply(messages, turn)
        turn += 1
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)
    conversations.append(messages)
    return [m for m in conversations if any(x["role"] == "user" for x in m)]


def _typed_lines():
    """Lines typed at a terminal, with a prompt and line editing (input()); ends at Ctrl-D."""
    while True:
        try:
            yield input("> ")
        except EOFError:
            print(file=sys.stderr)
            return


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("--"):
        argv = ["--model", argv[0]] + argv[1:]
    try:
        with user_errors():  # a config mistake: one paragraph, exit status 2
            c = parse_config(ChatConfig, argv)
            conversations = run(c, _typed_lines() if sys.stdin.isatty() else sys.stdin)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    if c.save:
        from common.atomic import atomic_write_text

        atomic_write_text(c.save, "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n"
                                          for m in conversations))
        print(f"[chat] wrote {len(conversations)} conversation(s) to {c.save}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
