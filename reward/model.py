"""Reward model = Qwen backbone + scalar head, read at the dedicated "<|reward|>" end token (Qwen sec. 3.2.1: "a
pooling layer ... based on a specific end token").

The data layer appends <|reward|> to every scored sequence (build_preference_examples(reward_token=True)). The score
is read exactly there, never at a guessed "last non-pad" position (docs/PITFALLS.md#reward-position), and
position ids are counted from the attention mask, so a pair's scores do not depend on batch composition, padding
side or padding length.
"""

from __future__ import annotations

import math

import torch

from data.chatml import IM_END, REWARD_TOKEN, special_id
from data.tokenizer import load_tokenizer  # noqa: F401  (re-exported for trainers)

STATS_FILE = "reward_stats.json"  # mean/std of scores on a reference set, saved beside the model for PPO


def add_reward_token(tokenizer) -> bool:
    """Give a tokenizer without <|reward|> (Qwen2's, Qwen2.5's or Qwen3's own: they have <|im_start|> but not our
    token) that special token at the next free id; True if it was added. Nothing else in the tokenizer changes."""
    try:
        special_id(tokenizer, REWARD_TOKEN)
        return False
    except ValueError:
        pass
    tokenizer.add_special_tokens({"extra_special_tokens": [REWARD_TOKEN]}, replace_extra_special_tokens=False)
    special_id(tokenizer, REWARD_TOKEN)  # now a single special token
    return True


def fit_embeddings(model, tokenizer, reward_id: int, added: bool) -> str | None:
    """Make the model's embedding hold every id of the tokenizer; returns a line for the log, or None.

    A <|reward|> token just added to the tokenizer (`added`) may need one more row: the embedding grows by one
    (config.vocab_size follows). When the head is new (training starts from a causal LM), the <|reward|> row starts
    at the mean of the other tokens' rows: a padding row of the checkpoint may hold anything. Any other tokenizer
    larger than the model is an error (ValueError)."""
    emb = model.get_input_embeddings()
    n, size = emb.num_embeddings, len(tokenizer)
    if size > n and not (added and size == n + 1):
        raise ValueError(f"tokenizer has {size} tokens but the model's vocab is {n}")
    if not added:
        return None
    notes = [f"added {REWARD_TOKEN} to the tokenizer as id {reward_id}"]
    if size > n:
        model.resize_embeddings(size)
        emb = model.get_input_embeddings()
        notes.append(f"embedding resized from {n} to {size} rows")
    if model.fresh_head:
        others = torch.cat([emb.weight[:reward_id], emb.weight[reward_id + 1:size]])
        with torch.no_grad():
            emb.weight[reward_id] = others.float().mean(0).to(emb.weight.dtype)
        notes.append("its embedding row starts at the mean of the other tokens' rows")
    return "; ".join(notes)


def reward_token_id(tokenizer) -> int:
    """Id of <|reward|>; a tokenizer without it cannot be used for reward modelling (clear error)."""
    try:
        return special_id(tokenizer, REWARD_TOKEN)
    except ValueError as e:
        raise ValueError(f"reward model needs the {REWARD_TOKEN} token: {e}") from None


def reward_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, reward_id: int) -> torch.Tensor:
    """(B,) index of the single <|reward|> token of each row; a row with none (or several) cannot be scored.

    input_ids, attention_mask: (B, T).
    """
    hits = (input_ids == reward_id) & attention_mask.bool()  # (B, T)
    counts = hits.sum(-1)  # (B,)
    bad = (counts != 1).nonzero().flatten().tolist()
    if bad:
        r = bad[0]
        raise ValueError(f"row {r} of the batch has {int(counts[r])} {REWARD_TOKEN} tokens (id {reward_id}), needs "
                         f"exactly 1: build reward examples with build_preference_examples(..., reward_token=True)")
    return hits.float().argmax(-1)  # (B,)


def score(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, reward_id: int) -> torch.Tensor:
    """Scalar rewards (B,) of padded sequences (B, T), either padding side. `model`: ScalarHeadModel."""
    pos = reward_positions(input_ids, attention_mask, reward_id)  # (B,)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): left pads do not shift RoPE
    # only the reward position is computed past the last layer's keys and values (model.heads: `positions`)
    values = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, positions=pos[:, None])
    return values.squeeze(1)  # (B,)


def pad_sequences(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to (B, T) input_ids and attention_mask on `side` ("right" or "left")."""
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    T = max(len(s) for s in seqs)
    ids, mask = [], []
    for s in seqs:
        pad = [pad_id] * (T - len(s))
        ids.append(s + pad if side == "right" else pad + s)
        mask.append([1] * len(s) + [0] * len(pad) if side == "right" else [0] * len(pad) + [1] * len(s))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def pair_batch(examples: list[dict], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen sequences (rows 0..B-1) then rejected (rows B..2B-1), one forward for both: (2B, T) each."""
    seqs = [e["prompt_ids"] + e["chosen_ids"] for e in examples]
    seqs += [e["prompt_ids"] + e["rejected_ids"] for e in examples]
    return pad_sequences(seqs, pad_id, side)


def shared_prompt_batch(examples: list[dict], pad_id: int, reward_id: int) -> dict[str, torch.Tensor]:
    """One row per pair, prompt | chosen reply | rejected reply, right-padded, so the prompt runs once.

    Both replies count their positions on from the prompt's (P, P+1, ...) and branch_ids 0 | 1 | 2 let each reply
    attend to the prompt and to itself only (model.qwen.build_attention_mask): the values at the two <|reward|>
    tokens are those of the sequences prompt + chosen and prompt + rejected. Returns input_ids, attention_mask,
    position_ids, branch_ids (B, T) and positions (B, 2): the chosen and the rejected <|reward|> index."""
    rows, pos, branch, at = [], [], [], []
    for i, e in enumerate(examples):
        P = len(e["prompt_ids"])
        where = []
        for part, offset in ((e["chosen_ids"], P), (e["rejected_ids"], P + len(e["chosen_ids"]))):
            hits = [j for j, t in enumerate(part) if t == reward_id]
            if len(hits) != 1:
                raise ValueError(f"pair {i} of the batch has a reply with {len(hits)} {REWARD_TOKEN} tokens (id "
                                 f"{reward_id}), needs exactly 1: build reward examples with "
                                 f"build_preference_examples(..., reward_token=True)")
            where.append(offset + hits[0])
        C, R = len(e["chosen_ids"]), len(e["rejected_ids"])
        rows.append(e["prompt_ids"] + e["chosen_ids"] + e["rejected_ids"])
        pos.append(list(range(P + C)) + list(range(P, P + R)))
        branch.append([0] * P + [1] * C + [2] * R)
        at.append(where)
    ids, mask = pad_sequences(rows, pad_id)
    T = ids.shape[1]
    pad = [T - len(r) for r in rows]
    return {"input_ids": ids, "attention_mask": mask,
            "position_ids": torch.tensor([p + [0] * n for p, n in zip(pos, pad)], dtype=torch.long),
            "branch_ids": torch.tensor([b + [0] * n for b, n in zip(branch, pad)], dtype=torch.long),
            "positions": torch.tensor(at, dtype=torch.long)}


def shares_prompts(model) -> bool:
    """Whether `model` (possibly wrapped by DDP or DeepSpeed) can score a pair as one shared-prompt row: this
    package's ScalarHeadModel in a mode without sliding windows or dynamic NTK (QwenModel.shares_prefixes)."""
    from model.heads import ScalarHeadModel

    net = getattr(model, "module", model)
    return isinstance(net, ScalarHeadModel) and net.model.shares_prefixes()


def pair_scores(model, examples: list[dict], pad_id: int, reward_id: int,
                device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, int]:
    """Scores (b,), (b,) of the chosen and rejected replies of `examples` in one forward, and the tokens of the
    2b scored sequences (the prompt counted twice, as padded rows would hold it). Our model takes one row per pair
    (shared_prompt_batch: the prompt runs once, no padding between chosen and rejected); transformers' models
    (model_impl hf) take 2b padded rows."""
    b = len(examples)
    tokens = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    if shares_prompts(model):
        batch = {k: v.to(device) for k, v in shared_prompt_batch(examples, pad_id, reward_id).items()}
        values = model(**batch)  # (b, 2)
        return values[:, 0], values[:, 1], tokens
    ids, mask = pair_batch(examples, pad_id)
    r = score(model, ids.to(device), mask.to(device), reward_id)  # (2b,)
    return r[:b], r[b:], tokens


def score_pairs(model, examples: list[dict], pad_id: int, reward_id: int, batch_size: int = 8,
                device: str | torch.device = "cpu", desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (N,), (N,) of chosen and rejected for every example, without gradients, with a progress bar."""
    from tqdm.auto import tqdm

    chosen, rejected = [], []
    with torch.no_grad():
        for s in tqdm(range(0, len(examples), batch_size), desc=desc or "scoring", disable=desc is None,
                      leave=False, dynamic_ncols=True):
            rc, rr, _ = pair_scores(model, examples[s:s + batch_size], pad_id, reward_id, device)
            chosen.append(rc.float().cpu())
            rejected.append(rr.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def normalisation_stats(scores: torch.Tensor) -> dict[str, float]:
    """Mean and (population) std of reference scores; PPO uses (r - mean) / std. A zero std is an error."""
    mean, std = scores.double().mean().item(), scores.double().std(unbiased=False).item()
    if not math.isfinite(mean) or not std > 0:
        raise ValueError(f"reference scores give mean {mean}, std {std}: cannot normalise rewards")
    return {"mean": mean, "std": std, "n": int(scores.numel())}


def load_reward_model(path: str, dtype: torch.dtype = torch.float32, head_seed: int = 0, impl: str = "auto"):
    """A scalar-head model from a reward-model folder, or from a causal-LM folder (same-size LM init, new head).
    impl: 'custom' (ScalarHeadModel, Qwen2/Qwen3), 'hf' (HFScalarHeadModel, any transformers backbone) or 'auto'
    (custom for a Qwen2/Qwen3 folder, hf otherwise)."""
    from model.heads import load_scalar_head

    return load_scalar_head(path, impl=impl, dtype=dtype, head_seed=head_seed)


def scoring_text(tokenizer, messages: list[dict]) -> str:
    """The text a reward model scores: the conversation (ending with the assistant reply to score) rendered by the
    tokenizer's chat template, without the newline the template puts after the last <|im_end|>, then <|reward|>.
    That is the layout training uses (reply tokens, <|im_end|>, <|reward|>). Scoring without <|reward|> reads the
    score at another token and gives another number."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the conversation must end with the assistant reply to score")
    text = tokenizer.apply_chat_template(messages, tokenize=False).rstrip("\n")
    if not text.endswith(IM_END):
        raise ValueError(f"the chat template does not end the reply with {IM_END} (not a ChatML template): "
                         f"{text[-60:]!r}")
    return text + REWARD_TOKEN


def score_texts(folder_or_model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """Scores of conversations (each a list of {"role", "content"} ending with an assistant reply), for use outside
    the trainers: rendered with the tokenizer's chat template, then <|reward|> (scoring_text), read at <|reward|>.

    folder_or_model: a reward-model folder (reward/train.py's final/) or a loaded scalar-head model.
    tokenizer: the reward model's tokenizer; None loads the folder's."""
    if isinstance(folder_or_model, torch.nn.Module):
        model = folder_or_model
        if tokenizer is None:
            raise ValueError("give the reward model's tokenizer when passing a loaded model")
    else:
        model = load_reward_model(str(folder_or_model))
        if tokenizer is None:
            tokenizer = load_tokenizer(folder_or_model)
    rid = reward_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs = [tokenizer(scoring_text(tokenizer, conv), add_special_tokens=False)["input_ids"] for conv in conversations]
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for s in range(0, len(seqs), batch_size):
                ids, mask = pad_sequences(seqs[s:s + batch_size], pad)
                out += score(model, ids.to(dev), mask.to(dev), rid).float().cpu().tolist()
    finally:
        model.train(was_training)
    return out
