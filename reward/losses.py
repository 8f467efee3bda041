"""Reward-model losses: pure functions of score tensors (no model, no data)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                  margin: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry ranking loss, mean over pairs: -log sigmoid(r_chosen - r_rejected - margin).

    r_chosen, r_rejected: (B,) scalar rewards of the preferred and the other response.
    margin: optional (B,) or scalar required gap (Llama-2 style margin; Qwen sec. 3.2.1 uses none).
    Returns (loss, stats) with stats accuracy = share of pairs with r_chosen > r_rejected (ties count as wrong)
    and margin = mean of r_chosen - r_rejected (without the required margin), all detached.
    """
    if r_chosen.shape != r_rejected.shape or r_chosen.ndim != 1:
        raise ValueError(f"pairwise_loss: expected two (B,) tensors, got {tuple(r_chosen.shape)} "
                         f"and {tuple(r_rejected.shape)}")
    diff = r_chosen.float() - r_rejected.float()  # (B,)
    logits = diff if margin is None else diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    loss = -F.logsigmoid(logits).mean()  # logsigmoid is stable for large |diff|
    stats = {"accuracy": (diff > 0).float().mean().detach(), "margin": diff.mean().detach()}
    return loss, stats
