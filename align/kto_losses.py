"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"): pure functions of
per-sequence summed log-probs (no model, no data).

Every row is one (prompt x, completion y) with a binary label: desirable (thumbs up) or undesirable (thumbs down).
With the implicit reward r = log pi(y|x) - log pi_ref(y|x) and the reference point z0 (an estimate of
KL(pi || pi_ref), detached), the loss of a row is (paper eq. 7, as TRL's KTOTrainer computes it):
  desirable     lambda_D * (1 - sigmoid(beta * (r - z0)))
  undesirable   lambda_U * (1 - sigmoid(beta * (z0 - r)))
and the batch loss is the mean over its rows. z0 comes from MISMATCHED pairs (x_i, y_j), j != i: the mean of their
log-ratios, clamped at 0 and not backpropagated (the paper's estimate; TRL does the same). The gradient pushes
desirable rewards above z0 and undesirable ones below it; rows far past z0 on the right side saturate and stop
contributing.
"""

from __future__ import annotations

import torch

Stats = dict[str, torch.Tensor]


def kl_reference_point(kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x))) over M mismatched pairs (M,), detached, fp32 (the mean
    is taken in float64, so it does not depend on how the pairs were split between ranks and micro batches)."""
    if kl_policy_logps.shape != kl_ref_logps.shape or kl_policy_logps.dim() != 1 or kl_policy_logps.numel() == 0:
        raise ValueError(f"expected two equal non-empty (M,) tensors, got {tuple(kl_policy_logps.shape)} and "
                         f"{tuple(kl_ref_logps.shape)}")
    ratio = kl_policy_logps.detach().double() - kl_ref_logps.detach().double()
    return ratio.mean().clamp(min=0).float()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor | float,
             beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, Stats]:
    """The KTO loss (mean over the B rows) and per-row stats. policy_logps, ref_logps (B,) summed completion
    log-probs; desirable (B,) bool; z0 the reference point (see kl_reference_point; used as given, no gradient).

    stats (detached, (B,)): reward = beta * r (TRL's rewards/chosen and rewards/rejected are its means over the
    desirable and the undesirable rows), weighted_loss = each row's term of the loss."""
    if policy_logps.dim() != 1 or policy_logps.shape != ref_logps.shape or desirable.shape != policy_logps.shape:
        raise ValueError(f"expected three (B,) tensors, got {tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, "
                         f"{tuple(desirable.shape)}")
    z0 = torch.as_tensor(z0, dtype=torch.float32, device=policy_logps.device).detach()
    r = policy_logps.float() - ref_logps.float()  # (B,) implicit rewards / beta
    d = desirable.to(device=r.device, dtype=torch.bool)
    value = torch.sigmoid(beta * torch.where(d, r - z0, z0 - r))  # (B,) the prospect-theory value v(x, y)
    weight = torch.where(d, torch.tensor(desirable_weight), torch.tensor(undesirable_weight)).to(r)
    per_row = weight * (1.0 - value)  # (B,)
    return per_row.mean(), {"reward": beta * r.detach(), "weighted_loss": per_row.detach()}


def weight_advice(n_desirable: int, n_undesirable: int, desirable_weight: float,
                  undesirable_weight: float) -> str | None:
    """None if the weights suit the class balance, else advice (the same check and ranges as TRL's KTOTrainer).

    The KTO paper recommends lambda_D * n_D / (lambda_U * n_U) in [1, 4/3]. Counts of 0 are taken as 1 (as TRL).
    The advice names the range for desirable_weight (undesirable_weight fixed) or the other way round."""
    n_d, n_u = max(n_desirable, 1), max(n_undesirable, 1)
    if n_desirable == n_undesirable:
        return None
    d_lo, d_hi = round(n_u * undesirable_weight / n_d, 2), round(n_u * undesirable_weight / n_d * 1.33, 2)
    u_lo, u_hi = round(n_d * desirable_weight / n_u / 1.33, 2), round(n_d * desirable_weight / n_u, 2)
    if d_lo <= desirable_weight <= d_hi or u_lo <= undesirable_weight <= u_hi:
        return None
    return (f"{n_desirable} desirable and {n_undesirable} undesirable rows with desirable_weight {desirable_weight} "
            f"and undesirable_weight {undesirable_weight}: the weighted counts are off the KTO paper's range "
            f"(lambda_D n_D / lambda_U n_U in [1, 4/3]); set EITHER desirable_weight in [{d_lo}, {d_hi}] OR "
            f"undesirable_weight in [{u_lo}, {u_hi}] (not both)")
