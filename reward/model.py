"""Reward model = Qwen backbone + scalar head, read at the dedicated "<|reward|>" end token (Qwen sec. 3.2.1: "a
pooling layer ... based on a specific end token").

The data layer appends <|reward|> to every scored sequence (build_preference_examples(reward_token=True)). The score
is read exactly there, never at a guessed "last non-pad" position (PITFALLS 5: TRL #3750, reward-bench #137), and
position ids are counted from the attention mask, so a pair's scores do not depend on batch composition, padding
side or padding length.
"""

from __future__ import annotations

import math

import torch

from data.chatml import REWARD_TOKEN, special_id
from data.tokenizer import load_tokenizer  # noqa: F401  (re-exported for trainers)

STATS_FILE = "reward_stats.json"  # mean/std of scores on a reference set, saved beside the model for PPO


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
    values = model(input_ids, attention_mask=attention_mask, position_ids=position_ids)  # (B, T)
    return values.gather(1, pos[:, None]).squeeze(1)  # (B,)


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


def score_pairs(model, examples: list[dict], pad_id: int, reward_id: int, batch_size: int = 8,
                device: str | torch.device = "cpu", desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (N,), (N,) of chosen and rejected for every example, without gradients, with a progress bar."""
    from tqdm.auto import tqdm

    chosen, rejected = [], []
    with torch.no_grad():
        for s in tqdm(range(0, len(examples), batch_size), desc=desc or "scoring", disable=desc is None,
                      leave=False, dynamic_ncols=True):
            part = examples[s:s + batch_size]
            ids, mask = pair_batch(part, pad_id)
            r = score(model, ids.to(device), mask.to(device), reward_id).float().cpu()  # (2b,)
            chosen.append(r[:len(part)])
            rejected.append(r[len(part):])
    return torch.cat(chosen), torch.cat(rejected)


def normalisation_stats(scores: torch.Tensor) -> dict[str, float]:
    """Mean and (population) std of reference scores; PPO uses (r - mean) / std. A zero std is an error."""
    mean, std = scores.double().mean().item(), scores.double().std(unbiased=False).item()
    if not math.isfinite(mean) or not std > 0:
        raise ValueError(f"reference scores give mean {mean}, std {std}: cannot normalise rewards")
    return {"mean": mean, "std": std, "n": int(scores.numel())}


def load_reward_model(path: str, dtype: torch.dtype = torch.float32, head_seed: int = 0):
    """A ScalarHeadModel from a reward-model folder, or from a causal-LM folder (same-size LM init, new head)."""
    from model.heads import ScalarHeadModel

    return ScalarHeadModel.from_pretrained(path, dtype=dtype, head_seed=head_seed)
