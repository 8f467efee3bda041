"""Datasets: load records, turn them into token examples with explicit truncation, pack, collate, mix.

Record kinds (TRL's dataset formats, tests/fixtures/formats/README.md):
  "sft"         {"messages": [msgs]}  or prompt-completion {"prompt": [msgs], "completion": [msgs]}
  "preference"  {"prompt": [msgs], "chosen": [assistant msg], "rejected": [...]}  (explicit prompt), or
                {"chosen": [whole conversation], "rejected": [...]}  (implicit prompt: the shared prefix)
  "unpaired"    {"prompt": [msgs], "completion": [assistant msg], "label": bool}  (KTO)
  "prompt"      {"prompt": [msgs]}  (PPO rollouts)
  "text"        {"text": str}  (pretraining text)
Standard (string) fields are accepted everywhere a message list is: a string prompt is one user turn and a string
reply one assistant turn, as in data/formats.py, so every example is ChatML. Implicit string pairs
{"chosen": "The sky is blue.", "rejected": "The sky is green."} split at the last whitespace before they differ.

Records may carry "tools" (tool schemas, rendered into the system turn as Qwen2.5 does) and messages with
"tool_calls", "tool" results and "weight" (0 = context, not learned; data/chatml.py). Every record that
load_records returns went through prepare_record, the validation data.feedback applies to its outputs too
(data/validate.py): special-token text escaped, multi-message replies joined, unusable records skipped with a reason.

Labels are always shifted with data.chatml.shift_labels (labels[t] is the target of logits[t]). Truncation is explicit:
"drop" drops an over-long example, "truncate" cuts the END of an SFT example, and for preference/prompt examples keeps
the LAST prompt tokens (responses are never cut: the reward and DPO losses need their <|im_end|>). Every builder returns
a DataReport that counts what was read, kept, truncated and dropped, by reason.
"""

from __future__ import annotations

import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from data.chatml import (
    ENDOFTEXT,
    QWEN2_DEFAULT_SYSTEM,
    IGNORE_INDEX,
    REWARD_TOKEN,
    check_messages,
    shift_labels,
    special_id,
    tokenize_chat,
    tokenize_response,
)
from common.config import InputError
from data.validate import IDENTICAL_REPLIES, escape_strings, join_reply, replies_identical

KINDS = ("sft", "preference", "unpaired", "prompt", "text")
TRUNCATIONS = ("drop", "truncate")


@dataclass
class DataReport:
    read: int = 0
    kept: int = 0
    truncated: int = 0  # kept examples that were cut to fit
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items()))
        dropped = sum(self.dropped.values())
        return f"read {self.read}, kept {self.kept} ({self.truncated} truncated), dropped {dropped}" + (
            f" ({reasons})" if reasons else ""
        )


# ------------------------------------------------------------------------------------------- record -> messages
def _as_messages(value, name: str, role: str) -> list[dict]:
    """A message list, or a string taken as one `role` turn; ValueError naming the field otherwise."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise ValueError(f"{name!r} must be a list of messages or a string, got {type(value).__name__}")
    check_messages(value, where=name)
    return value


def _reply(value, name: str) -> dict:
    """A single assistant reply: a string or a one-message assistant list."""
    msgs = _as_messages(value, name, "assistant")
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise ValueError(f"{name!r} must be one assistant message, got roles {[m['role'] for m in msgs]}")
    return msgs[0]


def _common_prefix_at_space(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n > 0 and not a[n - 1].isspace() and n < len(a) and not a[n].isspace():
        n -= 1  # back up to a word boundary so " blue." / " green." stay whole words
    while n > 0 and a[n - 1].isspace():
        n -= 1  # the space goes with the reply, as in TRL's extract_prompt
    return n


def preference_parts(rec: dict) -> tuple[list[dict], dict, dict]:
    """(prompt messages, chosen reply, rejected reply) of any TRL preference format."""
    if "prompt" in rec:
        return _as_messages(rec["prompt"], "prompt", "user"), _reply(rec["chosen"], "chosen"), _reply(
            rec["rejected"], "rejected")
    chosen, rejected = rec["chosen"], rec["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if "\n\nHuman:" in chosen and "\n\nAssistant:" in chosen:
            raise ValueError("looks like an Anthropic HH-RLHF dialogue string; convert it to messages first with "
                             "`python -m data.feedback`")
        n = _common_prefix_at_space(chosen, rejected)
        if n == 0:
            raise ValueError("implicit-prompt 'chosen' and 'rejected' share no prompt text")
        return [{"role": "user", "content": chosen[:n]}], _reply(chosen[n:], "chosen"), _reply(rejected[n:], "rejected")
    chosen, rejected = _as_messages(chosen, "chosen", "assistant"), _as_messages(rejected, "rejected", "assistant")
    if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
        raise ValueError("implicit-prompt 'chosen' and 'rejected' must be conversations that differ only in the "
                         "final assistant message")
    return chosen[:-1], _reply(chosen[-1:], "chosen"), _reply(rejected[-1:], "rejected")


def sft_messages(rec: dict) -> list[dict]:
    if "messages" in rec:
        return _as_messages(rec["messages"], "messages", "user")
    return _as_messages(rec["prompt"], "prompt", "user") + [_reply(rec["completion"], "completion")]


def unpaired_parts(rec: dict) -> tuple[list[dict], dict, bool]:
    if not isinstance(rec["label"], bool):
        raise ValueError(f"'label' must be true or false, got {type(rec['label']).__name__}")
    return _as_messages(rec["prompt"], "prompt", "user"), _reply(rec["completion"], "completion"), rec["label"]


def prompt_messages(rec: dict) -> list[dict]:
    """The prompt of any record with one: explicit, implicit (shared prefix), or a conversation minus its reply."""
    if "chosen" in rec:
        return preference_parts(rec)[0]
    if "prompt" in rec:
        return _as_messages(rec["prompt"], "prompt", "user")
    msgs = _as_messages(rec["messages"], "messages", "user")
    while msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return msgs


def text_of(rec: dict) -> str:
    if not isinstance(rec["text"], str):
        raise ValueError(f"'text' must be a string, got {type(rec['text']).__name__}")
    return rec["text"]


_REQUIRED = {"sft": ("messages",), "preference": ("chosen", "rejected"), "unpaired": ("prompt", "completion", "label"),
             "prompt": ("prompt",), "text": ("text",)}
_PARSE = {"sft": sft_messages, "preference": preference_parts, "unpaired": unpaired_parts, "prompt": prompt_messages,
          "text": text_of}


def detect_kind(rec) -> str | None:
    """The record kind from its keys (see the module docstring), or None if it fits none."""
    if not isinstance(rec, dict):
        return None
    keys = set(rec)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    if "messages" in keys or {"prompt", "completion"} <= keys:
        return "sft"
    if "prompt" in keys:
        return "prompt"
    if "text" in keys:
        return "text"
    return None


def _check_record(rec, kind: str, where: str):
    """Raise ValueError naming `where` unless `rec` is a valid record of `kind`; returns its parsed parts."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if kind == "sft" and "messages" not in rec and {"prompt", "completion"} <= set(rec):
        pass  # prompt-completion SFT
    elif kind == "prompt" and any(k in rec for k in ("prompt", "chosen", "messages")):
        pass  # a prompt can be taken from any record that has one
    else:
        missing = [k for k in _REQUIRED[kind] if k not in rec]
        if missing:
            raise ValueError(f"{where}: {kind} record is missing {missing}; it has keys {sorted(rec)}")
    try:
        if "tools" in rec and kind != "text":
            check_messages([], tools=rec["tools"])
        return _PARSE[kind](rec)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _join_replies(rec: dict, kind: str) -> tuple[dict, str | None]:
    """Multi-message replies of explicit-prompt pairs and unpaired records as one assistant message (join_reply)."""
    keys = {"preference": ("chosen", "rejected") if "prompt" in rec else (), "unpaired": ("completion",)}.get(kind, ())
    for key in keys:
        value = rec.get(key)
        if isinstance(value, list) and len(value) > 1 and all(isinstance(m, dict) for m in value):
            joined, reason = join_reply(value)
            if reason:
                return rec, reason
            rec = {**rec, key: [joined]}
    return rec, None


def prepare_record(rec, kind: str, where: str = "record") -> tuple[dict | None, str | None]:
    """The one validation between a stored record and the trainers (data/validate.py):
    -> (record ready for the builders, None), or (None, reason) for a well-formed record no trainer can use.
    Raises ValueError naming `where` for a malformed one. Special-token text is escaped; replies joined."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    try:
        rec = escape_strings(rec)
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply") from None
    rec, reason = _join_replies(rec, kind)
    if reason:
        return None, reason
    parts = _check_record(rec, kind, where)
    if kind == "preference" and replies_identical(*parts[1:]):
        return None, IDENTICAL_REPLIES
    return rec, None


# -------------------------------------------------------------------------------------------------- loading
def _read_table(path: str) -> list[tuple[str, dict]]:
    """Rows of a Parquet/Arrow file or a saved HF dataset folder, via `datasets` (imported lazily: it is slow)."""
    import datasets

    try:
        if os.path.isdir(path):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                raise InputError(f"{path}: holds splits {list(ds)}; pass the folder of one split")
        elif path.endswith(".parquet"):
            ds = datasets.Dataset.from_parquet(path)
        else:
            ds = datasets.Dataset.from_file(path)
    except InputError:
        raise
    except Exception as e:  # pyarrow / datasets raise many types for a broken or foreign file
        raise InputError(f"{path}: cannot read it as a dataset table ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(ds.to_list())]


def _read_json(path: str) -> list[tuple[str, dict]]:
    from data.io import read_rows

    rows = []
    for where, obj, error in read_rows(path):
        if error is not None:
            raise InputError(f"{where}: {error}")
        rows.append((where, obj))
    return rows


# What each kind looks like and which entry point reads it: said when a file of one kind is given for another.
_SHAPES = {"sft": "conversations {'messages': [...]} (align/sft.py)",
           "preference": "pairs {'prompt', 'chosen', 'rejected'} (align/dpo.py, align/kto.py, reward/train.py)",
           "unpaired": "rated replies {'prompt', 'completion', 'label'} (align/kto.py)",
           "prompt": "prompts {'prompt': [...]} (align/ppo.py prompt_files)",
           "text": "plain text {'text': ...} (pretraining: align/sft.py data_kind text, align/ppo.py pretrain_files)"}


def _kind_hint(rec, kind: str) -> str:
    """When the first record of a file looks like another kind than the one asked for: say which, and who reads it."""
    found = detect_kind(rec)
    if found is None or found == kind:
        return ""
    return f"; the file looks like {_SHAPES[found]}, but {kind} records are needed here: {_SHAPES[kind]}"


_CHECKED: dict[tuple, tuple[list[dict], str]] = {}  # filled by check_records, taken (once) by load_records


def _file_key(path: str, kind: str | None) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.abspath(path), kind, st.st_size, st.st_mtime_ns


def check_records(path: str | os.PathLike, kind: str | None = None) -> tuple[list[dict], str]:
    """load_records at start-up, before any model is loaded, so a bad file fails in seconds. The next
    load_records of the same unchanged file (path, kind, size, modification time) takes this result instead of
    reading the file again; it is handed out once, so nothing stays in memory after the trainer has read it."""
    out = load_records(path, kind)
    key = _file_key(str(path), kind)
    if key is not None:
        _CHECKED[key] = out
    return out


def load_records(path: str | os.PathLike, kind: str | None = None) -> tuple[list[dict], str]:
    """Read .jsonl/.json (optionally .gz), .parquet, .arrow or a saved HF dataset folder; validate every record.

    `kind` defaults to the kind of the first record (detect_kind). Errors are InputError naming the file and
    line/row. Every record goes through prepare_record: escaped, joined, and skipped (counted on stderr) when no
    trainer can use it.
    """
    path = str(path)
    hit = _CHECKED.pop(_file_key(path, kind), None)
    if hit is not None:
        return list(hit[0]), hit[1]
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or folder")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rows = _read_table(path) if os.path.isdir(path) or path.endswith((".parquet", ".arrow")) else _read_json(path)
    if not rows:
        raise InputError(f"{path}: no records")
    if kind is None:
        kind = detect_kind(rows[0][1])
        if kind is None:
            keys = sorted(rows[0][1]) if isinstance(rows[0][1], dict) else type(rows[0][1]).__name__
            raise InputError(f"{rows[0][0]}: cannot tell the record kind from keys {keys}; expected one of "
                             f"messages | prompt+chosen+rejected | prompt+completion+label | prompt | text")
    records, skipped = [], Counter()
    for i, (where, rec) in enumerate(rows):
        try:
            rec, reason = prepare_record(rec, kind, where)
        except ValueError as e:
            raise InputError(str(e) + (_kind_hint(rec, kind) if i == 0 else "")) from None
        if reason:
            skipped[reason] += 1
        else:
            records.append(rec)
    if skipped:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(skipped.items()))
        print(f"{path}: skipped {sum(skipped.values())} of {len(rows)} records ({reasons})", file=sys.stderr)
    if not records:
        raise InputError(f"{path}: none of its {len(rows)} records can be used ({reasons})")
    return records, kind


# ---------------------------------------------------------------------------------------------------- builders
def _check_truncation(truncation: str) -> None:
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")


def _parse(fn, rec, i: int):
    try:
        return fn(rec)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"record {i}: {e}") from None


def build_sft_examples(records, tokenizer, max_len: int, mask: str = "all_assistant", truncation: str = "drop",
                       default_system: str | None = QWEN2_DEFAULT_SYSTEM):
    """-> ([{input_ids (T,), labels (T,)}], DataReport). Dropped: "no_learned_tokens", "too_long"."""
    _check_truncation(truncation)
    report, out = DataReport(), []
    for i, rec in enumerate(tqdm(records, desc="sft examples", disable=None, leave=False)):
        report.read += 1
        tc = _parse(lambda r: tokenize_chat(tokenizer, sft_messages(r), mask=mask, default_system=default_system,
                                            tools=r.get("tools")), rec, i)
        ids, loss_mask = tc.input_ids, tc.loss_mask
        if len(ids) > max_len:
            if truncation == "drop":
                report.drop("too_long")
                continue
            ids, loss_mask = ids[:max_len], loss_mask[:max_len]
        # loss_mask[0] is never a target (nothing predicts the first token), so test from index 1.
        if not any(loss_mask[1:]):
            report.drop("no_learned_tokens")
            continue
        report.truncated += len(ids) < len(tc.input_ids)
        report.kept += 1
        out.append({"input_ids": ids, "labels": shift_labels(ids, loss_mask)})
    return out, report


def _prompt_ids(tokenizer, prompt: list[dict], default_system: str | None, tools=None) -> list[int]:
    return tokenize_chat(tokenizer, prompt, mask="none", add_generation_prompt=True, default_system=default_system,
                         tools=tools).input_ids


def _fit_prompt(prompt_ids, longest_reply: int, max_len: int, truncation: str, report: DataReport):
    """The prompt ids that fit `max_len` next to the longest reply, or None (counted as dropped)."""
    if len(prompt_ids) + longest_reply <= max_len:
        return prompt_ids
    if truncation == "drop":
        report.drop("too_long")
        return None
    if longest_reply >= max_len:
        report.drop("response_too_long")
        return None
    report.truncated += 1
    return prompt_ids[len(prompt_ids) + longest_reply - max_len:]  # keep the prompt's last tokens


def build_preference_examples(records, tokenizer, max_len: int, reward_token: bool = False,
                              truncation: str = "drop", default_system: str | None = QWEN2_DEFAULT_SYSTEM):
    """-> ([{prompt_ids (P,), chosen_ids (R,), rejected_ids (R,)}], DataReport).

    chosen/rejected ids are the reply tokens then <|im_end|> (tokenize_response), then <|reward|> if reward_token,
    so prompt_ids + chosen_ids is the full sequence the reward model scores at its last token. Dropped:
    "identical_replies", "too_long", "response_too_long".
    """
    _check_truncation(truncation)
    tail = []
    if reward_token:
        try:
            tail = [special_id(tokenizer, REWARD_TOKEN)]
        except ValueError as e:
            raise ValueError(f"reward_token=True but {e}; build it with data.tokenizer.qwen2_tokenizer()") from None
    report, out = DataReport(), []
    for i, rec in enumerate(tqdm(records, desc="preference examples", disable=None, leave=False)):
        report.read += 1
        prompt, chosen, rejected = _parse(preference_parts, rec, i)
        if replies_identical(chosen, rejected):
            report.drop("identical_replies")
            continue
        chosen_ids = tokenize_response(tokenizer, chosen) + tail
        rejected_ids = tokenize_response(tokenizer, rejected) + tail
        longest = max(len(chosen_ids), len(rejected_ids))
        prompt_ids = _fit_prompt(_prompt_ids(tokenizer, prompt, default_system, rec.get("tools")), longest, max_len,
                                 truncation, report)
        if prompt_ids is not None:
            report.kept += 1
            out.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    return out, report


def build_unpaired_examples(records, tokenizer, max_len: int, reward_token: bool = False, truncation: str = "drop",
                            default_system: str | None = QWEN2_DEFAULT_SYSTEM):
    """-> ([{prompt_ids (P,), completion_ids (R,), label: bool}], DataReport), as build_preference_examples."""
    _check_truncation(truncation)
    tail = [special_id(tokenizer, REWARD_TOKEN)] if reward_token else []
    report, out = DataReport(), []
    for i, rec in enumerate(tqdm(records, desc="unpaired examples", disable=None, leave=False)):
        report.read += 1
        prompt, completion, label = _parse(unpaired_parts, rec, i)
        completion_ids = tokenize_response(tokenizer, completion) + tail
        prompt_ids = _prompt_ids(tokenizer, prompt, default_system, rec.get("tools"))
        prompt_ids = _fit_prompt(prompt_ids, len(completion_ids), max_len, truncation, report)
        if prompt_ids is not None:
            report.kept += 1
            out.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": label})
    return out, report


def build_prompt_examples(records, tokenizer, max_prompt_len: int, truncation: str = "drop",
                          default_system: str | None = QWEN2_DEFAULT_SYSTEM):
    """-> ([{prompt_ids (P,), messages}], DataReport): prompts rendered with the generation prompt, for rollouts.

    "truncate" keeps the last max_prompt_len tokens. Dropped: "too_long".
    """
    _check_truncation(truncation)
    report, out = DataReport(), []
    for i, rec in enumerate(tqdm(records, desc="prompt examples", disable=None, leave=False)):
        report.read += 1
        messages = _parse(prompt_messages, rec, i)
        tools = rec.get("tools") if isinstance(rec, dict) else None
        prompt_ids = _fit_prompt(_prompt_ids(tokenizer, messages, default_system, tools), 0, max_prompt_len,
                                 truncation, report)
        if prompt_ids is not None:
            report.kept += 1
            out.append({"prompt_ids": prompt_ids, "messages": messages, **({"tools": tools} if tools else {})})
    return out, report


def build_text_examples(records, tokenizer, seq_len: int) -> list[dict]:
    """Pretraining text packed into rows of exactly seq_len tokens (the last row may be shorter).

    Each document is its tokens + <|endoftext|> (Qwen's document separator); every token after the first is a
    target. position_ids restart at 0 at each document and at each row (a document cut by a row boundary continues
    at position 0 in the next row, which cannot attend to the previous row anyway).
    """
    eos = special_id(tokenizer, ENDOFTEXT)
    ids, labels, pos = [], [], []
    for i, rec in enumerate(tqdm(records, desc="text examples", disable=None, leave=False)):
        doc = tokenizer(_parse(text_of, rec, i), add_special_tokens=False)["input_ids"] + [eos]
        ids += doc
        labels += shift_labels(doc, [1] * len(doc))
        pos += list(range(len(doc)))
    rows = []
    for start in range(0, len(ids), seq_len):
        p, offset = [], pos[start]
        for x in pos[start:start + seq_len]:
            offset = 0 if x == 0 else offset  # a new document starts at 0; a continued one is shifted to 0
            p.append(x - offset)
        rows.append({"input_ids": ids[start:start + seq_len], "labels": labels[start:start + seq_len],
                     "position_ids": p})
    return rows


# ------------------------------------------------------------------------------------------- pack, collate, mix
def pack_examples(examples: list[dict], seq_len: int) -> list[dict]:
    """Greedily pack examples, in order, into rows of at most seq_len tokens.

    position_ids restart at 0 for each document; the model keeps attention within a document. Each example's last
    label is IGNORE_INDEX (shift_labels), so no document is trained to predict the next one's first token.
    """
    rows, cur = [], None
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than seq_len={seq_len}; truncate or drop it first")
        if cur is None or len(cur["input_ids"]) + n > seq_len:
            cur = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(cur)
        cur["input_ids"] += ex["input_ids"]
        cur["labels"] += ex["labels"]
        cur["position_ids"] += list(range(n))
    return rows


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest example -> input_ids, labels, attention_mask, position_ids, all (B, T) int64.

    Pads get pad_id, label IGNORE_INDEX, attention 0 and position 0. Missing labels are all IGNORE_INDEX; missing
    position_ids are 0..n-1.
    """
    import torch

    T = max(len(ex["input_ids"]) for ex in examples)
    batch = {k: [] for k in ("input_ids", "labels", "attention_mask", "position_ids")}
    for ex in examples:
        n = len(ex["input_ids"])
        pad = T - n
        batch["input_ids"].append(list(ex["input_ids"]) + [pad_id] * pad)
        batch["labels"].append(list(ex.get("labels", [IGNORE_INDEX] * n)) + [IGNORE_INDEX] * pad)
        batch["attention_mask"].append([1] * n + [0] * pad)
        batch["position_ids"].append(list(ex.get("position_ids", range(n))) + [0] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}  # each (B, T)


def _counts(weights: list[float], n: int) -> list[int]:
    """Split n by weights with the largest-remainder rule (ties to the earlier source): exact, deterministic."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda j: (-(exact[j] - counts[j]), j))
    for j in order[: n - sum(counts)]:
        counts[j] += 1
    return counts


def mix_sources(sources: list[tuple[list[dict], float]], n: int, seed: int) -> list[dict]:
    """n records drawn from several sources in the given ratio (e.g. [(zh, 2), (en, 1)]), shuffled with `seed`.

    Each source is drawn without replacement in a seeded random order, and re-shuffled for another pass only when it
    is exhausted (so a small source is repeated evenly). The realised counts are exact: _counts(weights, n).
    """
    if not sources:
        raise ValueError("mix_sources needs at least one (records, weight) source")
    for j, (recs, w) in enumerate(sources):
        if not recs:
            raise ValueError(f"source {j} has no records")
        if not w > 0:
            raise ValueError(f"source {j} has weight {w}; weights must be > 0")
    rng = random.Random(seed)
    out = []
    for (recs, _), k in zip(sources, _counts([w for _, w in sources], n)):
        drawn = []
        while len(drawn) < k:
            order = list(range(len(recs)))
            rng.shuffle(order)
            drawn += [recs[i] for i in order[: k - len(drawn)]]
        out += drawn
    rng.shuffle(out)
    return out
