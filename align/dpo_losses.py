"""DPO-family losses: pure functions of per-sequence summed log-probs (no model, no data).

Every preference loss takes the policy's and the reference's summed response log-probs of the chosen and the
rejected reply of each pair, all (B,), and returns (loss, stats): the loss is the mean over the B pairs and stats
(detached) are the DPO implicit rewards r = beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, sec. 5):
  accuracy        share of pairs with r_chosen > r_rejected (ties count as wrong)
  chosen_reward   mean r_chosen            rejected_reward   mean r_rejected
  margin          mean r_chosen - r_rejected
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Stats = dict[str, torch.Tensor]


def _check(*logps: torch.Tensor) -> None:
    shape = logps[0].shape
    if len(shape) != 1 or any(t.shape != shape for t in logps):
        raise ValueError(f"expected four (B,) log-prob tensors, got shapes {[tuple(t.shape) for t in logps]}")


def implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """r_chosen, r_rejected (B,) = beta * (policy - reference) summed log-probs, in fp32 (DPO eq. 5)."""
    _check(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    r_c = beta * (policy_chosen.float() - ref_chosen.float())  # (B,)
    r_r = beta * (policy_rejected.float() - ref_rejected.float())  # (B,)
    return r_c, r_r


def reward_stats(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> Stats:
    """accuracy, chosen_reward, rejected_reward, margin: means over the pairs, detached."""
    r_c, r_r = r_chosen.detach(), r_rejected.detach()
    return {"accuracy": (r_c > r_r).float().mean(), "chosen_reward": r_c.mean(), "rejected_reward": r_r.mean(),
            "margin": (r_c - r_r).mean()}


def sigmoid_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                     beta: float = 0.1) -> tuple[torch.Tensor, Stats]:
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(r_chosen - r_rejected), mean over pairs. All inputs (B,)."""
    r_c, r_r = implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    loss = -F.logsigmoid(r_c - r_r).mean()  # logsigmoid is stable for large |margin|
    return loss, reward_stats(r_c, r_r)


def conservative_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
                          label_smoothing: float = 0.1) -> tuple[torch.Tensor, Stats]:
    """Conservative DPO (cDPO, Mitchell 2023): each label is taken to be flipped with probability eps =
    label_smoothing, so -(1 - eps) log sigmoid(m) - eps log sigmoid(-m), m = r_chosen - r_rejected; mean over pairs.
    The optimum is a finite margin log((1 - eps) / eps) instead of an unbounded one. All inputs (B,)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    r_c, r_r = implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    m = r_c - r_r  # (B,)
    loss = (-(1.0 - label_smoothing) * F.logsigmoid(m) - label_smoothing * F.logsigmoid(-m)).mean()
    return loss, reward_stats(r_c, r_r)


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
             chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, Stats]:
    """IPO (Azar et al. 2023, eq. 17): (h - 1 / (2 beta))^2, h = chosen log-ratio - rejected log-ratio; mean over
    pairs. beta is the paper's tau. With lengths (B,) each log-ratio is divided by its response's token count first:
    the per-token form the IPO authors used for their results (as TRL does); without them, summed log-ratios.
    Stats are the usual summed-log-prob implicit rewards."""
    r_c, r_r = implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    lr_c, lr_r = r_c / beta, r_r / beta  # (B,) log-ratios
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None:
        lr_c = lr_c / chosen_lengths.to(lr_c).clamp(min=1)
        lr_r = lr_r / rejected_lengths.to(lr_r).clamp(min=1)
    loss = ((lr_c - lr_r - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, reward_stats(r_c, r_r)


def chosen_nll_loss(policy_chosen: torch.Tensor, n_tokens: int | torch.Tensor) -> torch.Tensor:
    """SFT term on the chosen replies (RPO, Pang et al. 2024; Qwen sec. 3.1 NLL): -sum(policy_chosen) / n_tokens.

    policy_chosen (B,) summed log-probs; n_tokens = chosen response tokens the mean is over (pass the count of the
    whole mini batch so micro batches and ranks add up to the token mean of the mini batch)."""
    if policy_chosen.ndim != 1:
        raise ValueError(f"expected a (B,) tensor of summed log-probs, got shape {tuple(policy_chosen.shape)}")
    return -policy_chosen.float().sum() / max(float(n_tokens), 1.0)
