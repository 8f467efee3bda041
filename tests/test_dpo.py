"""DPO: losses against hand-computed values; the trainer's first loss against a naive full-logits computation,
exact resume, the NaN guard, LoRA with the adapter-disabled reference, cached == on-the-fly reference."""

from __future__ import annotations

import pytest
import torch

from align.dpo_losses import chosen_nll_loss, conservative_dpo_loss, ipo_loss, sigmoid_dpo_loss

# Two pairs used by the hand computations below, beta = 0.5:
#   chosen log-ratios   = policy_chosen - ref_chosen     = [-1 + 1.5, -3 + 2] = [0.5, -1]
#   rejected log-ratios = policy_rejected - ref_rejected = [-2 + 1.5, -1 + 2] = [-0.5, 1]
#   delta = [1, -2]; beta * delta = z = [0.5, -1]
PC, PR = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
RC, RR = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])


def test_sigmoid_dpo_by_hand():
    """-log sigmoid(z) = log(1 + e^-z): z = 0.5 -> 0.474077, z = -1 -> 1.313262; mean 0.893669.
    rewards chosen 0.5 * [0.5, -1] = [0.25, -0.5] (mean -0.125), rejected 0.5 * [-0.5, 1] (mean 0.125),
    margins [0.5, -1] (mean -0.25), accuracy 1/2.
    d loss / d policy_chosen_b = -(1/B) beta sigmoid(-z_b) = -0.25 * [sigmoid(-0.5), sigmoid(1)]
    = [-0.094385, -0.182765]."""
    pc = PC.clone().requires_grad_()
    loss, s = sigmoid_dpo_loss(pc, PR, RC, RR, beta=0.5)
    assert loss.item() == pytest.approx(0.893669, abs=1e-6)
    assert s["chosen_reward"].item() == pytest.approx(-0.125) and s["rejected_reward"].item() == pytest.approx(0.125)
    assert s["margin"].item() == pytest.approx(-0.25) and s["accuracy"].item() == 0.5
    loss.backward()
    assert pc.grad.tolist() == pytest.approx([-0.094385, -0.182765], abs=1e-6)


def test_sigmoid_dpo_default_beta_and_stability():
    """beta defaults to 0.1 (DPO paper); policy == reference gives margin 0 and loss log 2 = 0.693147.
    A margin of -2000 (beta 0.1 x delta -20000) stays finite: log(1 + e^2000) = 2000."""
    loss, s = sigmoid_dpo_loss(PC, PR, PC, PR)
    assert loss.item() == pytest.approx(0.693147, abs=1e-6) and s["accuracy"].item() == 0.0
    loss, _ = sigmoid_dpo_loss(torch.tensor([-10000.0]), torch.tensor([10000.0]), torch.zeros(1), torch.zeros(1))
    assert loss.item() == pytest.approx(2000.0)
    with pytest.raises(ValueError, match="four \\(B,\\) log-prob tensors"):
        sigmoid_dpo_loss(PC, PR, RC, RR[:1])


def test_conservative_dpo_by_hand():
    """eps = 0.25: -(0.75) log sigmoid(z) - 0.25 log sigmoid(-z), with -log sigmoid(-z) = z + -log sigmoid(z):
    z = 0.5: 0.75 * 0.474077 + 0.25 * 0.974077 = 0.599077; z = -1: 0.75 * 1.313262 + 0.25 * 0.313262 = 1.063262;
    mean 0.831169. eps = 0 is plain DPO (0.893669); eps = 0.5 is refused (the loss would ignore the labels)."""
    loss, s = conservative_dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.25)
    assert loss.item() == pytest.approx(0.831169, abs=1e-6) and s["margin"].item() == pytest.approx(-0.25)
    loss0, _ = conservative_dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.0)
    assert loss0.item() == pytest.approx(0.893669, abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        conservative_dpo_loss(PC, PR, RC, RR, label_smoothing=0.5)


def test_ipo_by_hand():
    """beta = 0.5 -> target 1 / (2 beta) = 1. Summed log-ratio gaps h = [1, -2]: ((1 - 1)^2 + (-2 - 1)^2) / 2 = 4.5.
    Per token with chosen lengths [2, 4] and rejected [1, 2]: h = [0.5/2 + 0.5/1, -1/4 - 1/2] = [0.75, -0.75]:
    ((0.75 - 1)^2 + (-0.75 - 1)^2) / 2 = (0.0625 + 3.0625) / 2 = 1.5625. Rewards stats stay the summed ones."""
    loss, s = ipo_loss(PC, PR, RC, RR, beta=0.5)
    assert loss.item() == pytest.approx(4.5)
    loss, s = ipo_loss(PC, PR, RC, RR, beta=0.5, chosen_lengths=torch.tensor([2, 4]),
                       rejected_lengths=torch.tensor([1, 2]))
    assert loss.item() == pytest.approx(1.5625) and s["margin"].item() == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="both chosen_lengths and rejected_lengths"):
        ipo_loss(PC, PR, RC, RR, chosen_lengths=torch.tensor([2, 4]))


def test_chosen_nll_by_hand():
    """Summed chosen log-probs [-1, -3] over 8 chosen tokens: token-mean NLL = 4 / 8 = 0.5; d/d pc = -1/8 each."""
    pc = PC.clone().requires_grad_()
    loss = chosen_nll_loss(pc, 8)
    loss.backward()
    assert loss.item() == 0.5 and pc.grad.tolist() == [-0.125, -0.125]
