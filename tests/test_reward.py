"""Reward model: pairwise loss by hand, score position and invariance, training, benchmark."""

from __future__ import annotations

import math

import pytest
import torch

from reward.losses import pairwise_loss


def test_pairwise_loss_by_hand():
    """diffs = [2 - 0, 1 - 1, 0 - 3] = [2, 0, -3]
    -log sigmoid(x) = log(1 + e^-x): log(1 + e^-2) = 0.126928, log 2 = 0.693147, log(1 + e^3) = 3.048587
    loss = (0.126928 + 0.693147 + 3.048587) / 3 = 1.289554; accuracy 1/3 (the tie counts as wrong); margin -1/3."""
    rc, rr = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 3.0])
    loss, stats = pairwise_loss(rc, rr)
    assert loss.item() == pytest.approx(1.289554, abs=1e-6)
    assert stats["accuracy"].item() == pytest.approx(1 / 3) and stats["margin"].item() == pytest.approx(-1 / 3)


def test_pairwise_loss_margin_by_hand():
    """margin [1, 0]: diffs [2, 0] -> logits [1, 0]: (log(1 + e^-1) + log 2) / 2 = (0.313262 + 0.693147) / 2
    = 0.503204; the reported margin is the raw mean diff 1.0."""
    loss, stats = pairwise_loss(torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.0]), margin=torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(0.503204, abs=1e-6)
    assert stats["margin"].item() == 1.0 and stats["accuracy"].item() == 0.5


def test_pairwise_loss_is_stable_and_has_gradient():
    """diff = -200: log(1 + e^200) = 200 (to float precision), no inf; d loss / d r_chosen = -sigmoid(-diff) = -1."""
    rc = torch.tensor([-100.0], requires_grad=True)
    loss, _ = pairwise_loss(rc, torch.tensor([100.0]))
    loss.backward()
    assert loss.item() == pytest.approx(200.0) and rc.grad.item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="expected two"):
        pairwise_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    assert math.isfinite(pairwise_loss(torch.zeros(1), torch.zeros(1))[0].item())
