"""Show what the model learns from one record: `python -m data.show FILE [--index N] [--tokenizer qwen2|small|PATH]
[--mask STRATEGY] [--kind KIND] [--ids]`.

Learned tokens (training targets) are printed in green on a terminal and inside ⟦ ⟧ otherwise, followed by counts.
SFT records use the chosen mask strategy; for preference / unpaired records the reply tokens after the generation
prompt are the learned part; prompt records learn nothing; text records learn every token.
"""

from __future__ import annotations

import sys

from common.config import ArgumentParser, ConfigError, InputError, error_text
from data.chatml import ENDOFTEXT, MASK_STRATEGIES, special_id, tokenize_chat, tokenize_response
from data.tokenizer import load_tokenizer
from data.datasets import (
    KINDS,
    load_records,
    preference_parts,
    prompt_messages,
    sft_messages,
    text_of,
    unpaired_parts,
)


def sequences(rec: dict, kind: str, tok, mask: str) -> list[tuple[str, list[int], list[int]]]:
    """(title, input_ids (T,), loss_mask (T,)) for each sequence a record of `kind` trains on."""
    tools = rec.get("tools")
    if kind == "sft":
        tc = tokenize_chat(tok, sft_messages(rec), mask=mask, tools=tools)
        return [(f"sft, mask={mask}", tc.input_ids, tc.loss_mask)]
    if kind == "text":
        ids = tok(text_of(rec), add_special_tokens=False)["input_ids"] + [special_id(tok, ENDOFTEXT)]
        return [("text", ids, [1] * len(ids))]
    if kind == "prompt":
        ids = tokenize_chat(tok, prompt_messages(rec), mask="none", add_generation_prompt=True, tools=tools).input_ids
        return [("prompt", ids, [0] * len(ids))]
    if kind == "preference":
        prompt, *replies = preference_parts(rec)
        titles = ["chosen", "rejected"]
    else:
        prompt, reply, label = unpaired_parts(rec)
        replies, titles = [reply], [f"completion, label={label}"]
    prompt_ids = tokenize_chat(tok, prompt, mask="none", add_generation_prompt=True, tools=tools).input_ids
    out = []
    for title, reply in zip(titles, replies):
        reply_ids = tokenize_response(tok, reply)
        out.append((title, prompt_ids + reply_ids, [0] * len(prompt_ids) + [1] * len(reply_ids)))
    return out


def highlight(tok, ids: list[int], loss_mask: list[int], color: bool) -> str:
    """Decode runs of equal mask together (so multi-byte characters split over tokens stay readable)."""
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or loss_mask[t] != loss_mask[start]:
            text = tok.decode(ids[start:t], skip_special_tokens=False)
            if loss_mask[start]:
                text = f"\x1b[32m{text}\x1b[0m" if color else f"⟦{text}⟧"
            out.append(text)
            start = t
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m data.show", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help=".jsonl/.json(.gz), .parquet, .arrow or a saved HF dataset folder")
    parser.add_argument("--index", type=int, default=0, help="which record (0-based)")
    parser.add_argument("--tokenizer", default="qwen2", help="qwen2, small, or a tokenizer folder")
    parser.add_argument("--mask", default="all_assistant", choices=MASK_STRATEGIES, help="SFT mask strategy")
    parser.add_argument("--kind", default=None, choices=KINDS, help="record kind (default: detected)")
    parser.add_argument("--ids", action="store_true", help="also list every token: position, id, learned, text")
    args = parser.parse_args(argv)
    try:
        records, kind = load_records(args.file, kind=args.kind)
        if not 0 <= args.index < len(records):
            raise ConfigError(f"{args.file} has {len(records)} records; --index {args.index} is out of range")
        try:
            tok = load_tokenizer(args.tokenizer)
        except ValueError as e:
            raise ConfigError(f"--tokenizer: {e}") from None
        try:
            seqs = sequences(records[args.index], kind, tok, args.mask)
        except ValueError as e:
            raise InputError(f"{args.file} record {args.index}: {e}") from None
    except (ConfigError, InputError) as e:
        print(error_text(e), file=sys.stderr)  # one paragraph, exit status 2
        return 2
    color = sys.stdout.isatty()
    print(f"{args.file} record {args.index} ({kind}), tokenizer {args.tokenizer}")
    for title, ids, loss_mask in seqs:
        print(f"--- {title} ---")
        print(highlight(tok, ids, loss_mask, color))
        if args.ids:
            for t, (tid, m) in enumerate(zip(ids, loss_mask)):
                print(f"{t:6d} {tid:8d} {'L' if m else '.'} {tok.decode([tid])!r}")
        n = sum(loss_mask)
        print(f"tokens: {len(ids)}, learned: {n}, masked: {len(ids) - n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
