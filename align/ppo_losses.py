"""PPO maths (Qwen report sec. 3.2.2): pure functions of tensors, no model, no data, no vLLM.

Shapes: B responses in the rollout batch, R response length (right padded); `mask` (B, R) is 1 on the response's
real tokens (the sampled tokens, the stop token included) and 0 on padding.

Reductions are named and explicit. `token_mean` divides by a token count and `sequence_mean` by a sequence count;
pass `total=` the count of the GLOBAL batch (all ranks, all micro batches) and the per-shard losses add up to the
whole-batch loss, which is what data-parallel training needs (tests/test_ppo_losses.py shows it).
"""

from __future__ import annotations

import math

import torch


# ---------------------------------------------------------------------------------------------------- reductions
def token_mean(x: torch.Tensor, mask: torch.Tensor, total: float | None = None) -> torch.Tensor:
    """sum(x * mask) / total; total defaults to mask.sum() (this shard's tokens). x, mask: (B, R)."""
    denom = mask.sum() if total is None else torch.as_tensor(total, dtype=x.dtype, device=x.device)
    return torch.where(mask > 0, x, 0.0).sum() / denom.clamp(min=1)  # where, not x * mask: inf * 0 is NaN


def sequence_mean(x: torch.Tensor, mask: torch.Tensor, total: float | None = None) -> torch.Tensor:
    """Mean over sequences of each sequence's token mean; total defaults to B (this shard's sequences)."""
    per_seq = torch.where(mask > 0, x, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
    denom = per_seq.new_tensor(float(x.shape[0] if total is None else total))
    return per_seq.sum() / denom.clamp(min=1)


def _stat(x: torch.Tensor, mask: torch.Tensor, total: float | None = None) -> torch.Tensor:
    """Token mean without gradient; with `total` (the mini batch's tokens) shards' stats add up to the batch's."""
    return token_mean(x.detach().float(), mask, total)


# ---------------------------------------------------------------------------------------------------- losses
def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2, reduce=token_mean, total: float | None = None, n_tokens: float | None = None):
    """Clipped surrogate (Schulman et al. 2017): max(-A r, -A clip(r, 1-e, 1+e)), r = exp(logp - old_logp).

    logp (B, R) with gradient; old_logp, advantages (B, R) fixed; `reduce(x, mask, total)` aggregates the loss
    (token_mean, or a sequence reduction whose `total` counts responses). Returns (loss, stats): clip_frac = share
    of tokens where the clipped term is the active one, approx_kl = mean((r - 1) - log r) (>= 0, Schulman's k3),
    both token means over `n_tokens` (the mini batch's tokens; default `total` under token_mean, else this shard's).
    """
    log_ratio = torch.where(mask > 0, logp - old_logp, 0.0)  # (B, R); padding masked before exp (no inf)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = reduce(torch.maximum(unclipped, clipped), mask, total)
    n_tokens = n_tokens if n_tokens is not None else total if reduce is token_mean else None
    stats = {"policy_clip_frac": _stat((clipped > unclipped).float(), mask, n_tokens),
             "approx_kl": _stat((ratio - 1.0) - log_ratio, mask, n_tokens)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.15, reduce=token_mean, total: float | None = None):
    """Clipped value loss 0.5 * max((v - G)^2, (v_clip - G)^2), v_clip = old + clip(v - old, -c, c).

    The clip keeps the value model near the values the advantages were computed with (Qwen sec. 3.2.2: value loss
    clipping 0.15). values (B, R) with gradient; old_values, returns (B, R). stats: value_clip_frac.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)  # (B, R)
    err, err_clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * reduce(torch.maximum(err, err_clipped), mask, total)
    return loss, {"value_clip_frac": _stat((err_clipped > err).float(), mask, total)}


# ---------------------------------------------------------------------------------------------------- advantages
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation (Schulman et al. 2016) over each response, by a reverse loop over R.

    rewards, values, mask (B, R); values after a response's last token count as 0 (the episode ends there).
    Returns (advantages, returns), both (B, R) and 0 on padding; returns = advantages + values.
    """
    rewards, values = rewards * mask, values * mask
    B, R = rewards.shape
    adv = torch.zeros_like(rewards)  # (B, R)
    last = rewards.new_zeros(B)  # (B,) A_{t+1}
    for t in reversed(range(R)):
        next_v = values[:, t + 1] if t + 1 < R else rewards.new_zeros(B)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(3,) float64 [count, sum, sum of squares] of x over the mask; all-reduce with "sum" to get global moments."""
    x, m = x.double(), mask.double()
    return torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()])


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, moments: torch.Tensor | None = None,
           eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (population variance), 0 on padding. x, mask (B, R).

    moments: global [count, sum, sumsq] from masked_moments summed over ranks; None = this tensor's own.
    shift_mean=False keeps the mean (used for rewards, whose sign carries meaning).
    """
    n, s, ss = (masked_moments(x, mask) if moments is None else moments.double()).tolist()
    if n < 2:
        raise ValueError(f"whiten: need at least 2 masked values, got {n:g}")
    mean = s / n
    var = max(ss / n - mean * mean, 0.0)
    out = (x - mean) / math.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ---------------------------------------------------------------------------------------------------- KL, rewards
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || ref) estimate on tokens sampled from pi (Schulman, "Approximating KL divergence").

    k1 = logp - ref_logp (unbiased, can be negative per token); k3 = exp(r) - 1 - r with r = ref_logp - logp
    (unbiased, never negative: docs/PITFALLS.md#ppo-stability). logp, ref_logp (B, R) -> (B, R).
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        r = ref_logp - logp
        return torch.expm1(r) - r
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")


def shape_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, coef: float,
                  has_eos: torch.Tensor, eos_missing_penalty: float = 0.0) -> torch.Tensor:
    """Per-token rewards (B, R): -coef * kl on every response token, plus on the last real token the (normalised)
    score minus `eos_missing_penalty` when the response did not end with a stop token (Ziegler et al. 2019;
    the penalty discourages max-length rambling, docs/PITFALLS.md#ppo-stability).

    score (B,), kl (B, R), mask (B, R), has_eos (B,) bool.
    """
    lengths = mask.long().sum(-1)  # (B,)
    if (lengths < 1).any():
        raise ValueError(f"shape_rewards: response {int((lengths < 1).nonzero()[0])} has no tokens")
    rewards = -coef * kl * mask  # (B, R)
    final = score - eos_missing_penalty * (~has_eos.bool()).to(score.dtype)  # (B,)
    return rewards.scatter_add(1, (lengths - 1)[:, None], final[:, None].to(rewards.dtype))


# ---------------------------------------------------------------------------------------------------- controllers
class FixedKLController:
    """A constant KL coefficient (Qwen sec. 3.2.2 uses 0.04)."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019 (sec. 2.2): beta <- beta * (1 + K * e), e = clip(KL / target - 1, -0.2, 0.2),
    K = n_steps / horizon: the coefficient rises while KL is above target and falls while below, never below
    `min_value` (0: as published; a floor keeps an early low-KL phase from switching the penalty off)."""

    def __init__(self, value: float, target: float, horizon: int, min_value: float = 0.0):
        super().__init__(value)
        if target <= 0 or horizon <= 0 or min_value < 0:
            raise ValueError(f"adaptive KL needs target > 0, horizon > 0, min_value >= 0, got {target}, {horizon}, "
                             f"{min_value}")
        self.target, self.horizon, self.min_value = float(target), int(horizon), float(min_value)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value = max(self.value * (1.0 + error * n_steps / self.horizon), self.min_value)


# ---------------------------------------------------------------------------------------------------- normalisation
class RunningMeanStd:
    """Running mean and variance of scalar rewards over all batches seen (Chan et al. parallel update).

    normalise(): (x - mean), divided by std when use_std; the statistics go in the checkpoint (state_dict).
    """

    def __init__(self):
        self.count, self.mean, self.var = 0, 0.0, 1.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        b_mean, b_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta * delta * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    def normalise(self, x: torch.Tensor, use_std: bool = False, eps: float = 1e-8) -> torch.Tensor:
        out = x - self.mean
        return out / math.sqrt(self.var + eps) if use_std else out

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.var = int(state["count"]), float(state["mean"]), float(state["var"])


# ---------------------------------------------------------------------------------------------------- critic-free
# Advantage estimators without a value model (the `advantage` switch of the RL loop). Shapes: N responses = prompts
# x G (group size: samples per prompt), laid out prompt-major as the rollout engines return them (rows
# [p*G, (p+1)*G) answer prompt p); `scores` (N,) is one scalar per response (reward model and/or reward functions,
# KL already subtracted when the KL is in the reward); R response length. The group estimators return (N,)
# sequence advantages: every token of response i gets advantages[i] (`advantages[:, None] * mask`).

def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """scores (N,) -> (N / G, G), checking N is a whole number of groups of >= 2."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be (N,), got shape {tuple(scores.shape)}")
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"need group_size >= 2 dividing the {scores.shape[0]} responses (prompts x samples per "
                         f"prompt), got group_size={group_size}")
    return scores.float().view(-1, group_size)


def grpo_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024, DeepSeekMath sec. 4.1.2): (s - group mean) / (group std + eps).

    The std is the unbiased one (n - 1), as veRL, OpenRLHF and TRL compute it; a group whose replies all score the
    same gets 0. scale=False is Dr. GRPO (Liu et al. 2025, sec. 3.2): no division by the std, which up-weights
    prompts that are too easy or too hard; pair it with `sequence_mean_token_sum` (no per-length normalisation).
    scores (N,) -> (N,)."""
    g = _groups(scores, group_size)  # (N/G, G)
    adv = g - g.mean(-1, keepdim=True)
    if scale:
        adv = adv / (g.std(-1, keepdim=True) + eps)
    return adv.flatten()


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, sec. 3.3; Kool et al. 2019): s_i minus the mean of the OTHER G - 1 replies to the
    same prompt, = G / (G - 1) (s_i - group mean). An unbiased baseline (it does not use s_i). scores (N,) -> (N,)."""
    g = _groups(scores, group_size)  # (N/G, G)
    return (g - (g.sum(-1, keepdim=True) - g) / (group_size - 1)).flatten()


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s within each response; rewards, mask (N, R) -> (N, R), 0 on padding."""
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])  # (N,)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            moments: torch.Tensor | None = None):
    """REINFORCE++ (Hu 2025, sec. 3): token rewards carry the KL (`shape_rewards`: -coef * KL on every token, the
    score on the last one), their discounted returns are the advantages, normalised over the WHOLE batch (every
    token of every response: mean 0, std 1; `moments` from `masked_moments` summed over ranks when the batch is
    split). rewards, mask (N, R) -> (advantages, returns), both (N, R) and 0 on padding."""
    returns = discounted_returns(rewards, mask, gamma)
    return whiten(returns, mask, moments=moments), returns


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, coef: float, reduce=token_mean,
            total: float | None = None) -> torch.Tensor:
    """KL to the reference as a loss term instead of a reward penalty (GRPO, Shao et al. 2024, eq. 4):
    coef x reduce(k3), k3 = exp(ref - logp) - (ref - logp) - 1 >= 0 per token, differentiable in logp (B, R)."""
    log_ratio = torch.where(mask > 0, ref_logp - logp, 0.0)  # (B, R); padding 0 so exp stays finite
    return coef * reduce(torch.expm1(log_ratio) - log_ratio, mask, total)


def sequence_mean_token_sum(x: torch.Tensor, mask: torch.Tensor, total: float | None = None,
                            scale: float = 1.0) -> torch.Tensor:
    """Sum over each sequence's tokens, mean over sequences (total defaults to B, this shard's sequences), divided
    by the constant `scale`. Dr. GRPO (Liu et al. 2025, sec. 3.2) with scale = the generation budget
    (max_new_tokens): no 1/|o_i| per response, so long wrong replies are not penalised less per token; TRL's
    `dr_grpo` loss is this with scale = max_completion_length. x, mask (B, R)."""
    denom = x.new_tensor(float(x.shape[0] if total is None else total)).clamp(min=1) * scale
    return torch.where(mask > 0, x, 0.0).sum() / denom


REDUCTIONS = {"token_mean": token_mean, "sequence_mean": sequence_mean,
              "sequence_mean_token_sum": sequence_mean_token_sum}
ADVANTAGES = ("gae", "grpo", "rloo", "reinforce_pp")
