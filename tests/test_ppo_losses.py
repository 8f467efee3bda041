"""PPO maths against values computed by hand (align/ppo_losses.py)."""

from __future__ import annotations

import math

import pytest
import torch

from align.ppo_losses import (AdaptiveKLController, FixedKLController, RunningMeanStd, gae, kl_penalty,
                              masked_moments, ppo_policy_loss, sequence_mean, shape_rewards, token_mean,
                              value_loss, whiten)

LN2 = math.log(2.0)
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])


def test_policy_loss_by_hand():
    """old_logp = 0, clip 0.2; tokens (ratio, A): (2, +1) (0.5, +1) (0.5, -1) (2, -1), padding holds 100s.
    per token max(-A r, -A clip(r)): max(-2, -1.2) = -1.2 [clipped]; max(-0.5, -0.8) = -0.5;
    max(0.5, 0.8) = 0.8 [clipped]; max(2, 1.2) = 2.  token mean = (-1.2 - 0.5 + 0.8 + 2) / 4 = 0.275.
    clip_frac = 2/4. approx_kl = mean((r-1) - ln r) = (2 (1 - ln2) + 2 (ln2 - 0.5)) / 4 = 0.25.
    gradient d/dlogp: clipped tokens 0; unclipped -A r / 4: token 2 -> -0.5/4 = -0.125, token 4 -> 2/4 = 0.5."""
    logp = torch.tensor([[LN2, -LN2, 100.0], [-LN2, LN2, 100.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 1.0, 100.0], [-1.0, -1.0, 100.0]])
    loss, stats = ppo_policy_loss(logp, old, adv, MASK, clip=0.2)
    assert loss.item() == pytest.approx(0.275, abs=1e-6)
    assert stats["policy_clip_frac"].item() == pytest.approx(0.5)
    assert stats["approx_kl"].item() == pytest.approx(0.25, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.125, 0.0], [0.0, 0.5, 0.0]]))


def test_value_loss_by_hand():
    """old values 0, clip 0.15. (v, G): (0.5, 1): v_clip 0.15, max(0.25, 0.7225) = 0.7225 [clipped];
    (-0.5, 0): v_clip -0.15, max(0.25, 0.0225) = 0.25; (0.1, 1): v_clip = v, 0.81 (equal terms: not clipped).
    loss = 0.5 * (0.7225 + 0.25 + 0.81) / 3 = 0.29708333; clip_frac = 1/3."""
    values = torch.tensor([[0.5, -0.5, 0.1, 7.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 0.0, 1.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, torch.zeros(1, 4), returns, mask, clip=0.15)
    assert loss.item() == pytest.approx(0.2970833, abs=1e-6)
    assert stats["value_clip_frac"].item() == pytest.approx(1 / 3)
    loss.backward()  # clipped token: no gradient; others (v - G) / 3
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.5 / 3, -0.9 / 3, 0.0]]))


def test_gae_by_hand():
    """R = 3, rewards [0, 0, 1], values 0.5 each, gamma 1, lambda 0.95:
    delta_2 = 1 + 0 - 0.5 = 0.5 -> A_2 = 0.5; delta_1 = 0 -> A_1 = 0.95 * 0.5 = 0.475; A_0 = 0.95 * 0.475 = 0.45125.
    returns = A + V = [0.95125, 0.975, 1.0]. Row 2 has length 2 (last token padding): delta_1 = 1 - 0.5 = 0.5, ...
    With lambda = 1 every return equals the sum of the remaining rewards (here 1)."""
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.full((2, 3), 0.5)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.45125, 0.475, 0.5], [0.475, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.95125, 0.975, 1.0], [0.975, 1.0, 0.0]]))
    _, ret1 = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret1, mask)


def _gae_python(rewards, values, gamma, lam):
    """The obvious per-response loop over Python lists: A_t = sum_k (gamma lam)^k delta_{t+k}."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]


def test_gae_equals_python_loop():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 7]
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for b, n in enumerate(lengths):
        want = _gae_python(rewards[b, :n].tolist(), values[b, :n].tolist(), 0.9, 0.8)
        torch.testing.assert_close(adv[b, :n], torch.tensor(want))
        torch.testing.assert_close(ret[b, :n], torch.tensor(want) + values[b, :n])
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def test_whiten_by_hand():
    """x = [1, 2, 3] (+ a padded 100): mean 2, population var 2/3, std 0.81650 -> [-1.22474, 0, 1.22474, 0];
    shift_mean=False adds the mean back: [0.77526, 2, 3.22474, 0]. Global moments from two halves give the same."""
    x, mask = torch.tensor([[1.0, 2.0], [3.0, 100.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(whiten(x, mask), torch.tensor([[-1.224744, 0.0], [1.224744, 0.0]]))
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), torch.tensor([[0.775256, 2.0], [3.224744, 0.0]]))
    moments = masked_moments(x[:1], mask[:1]) + masked_moments(x[1:], mask[1:])
    torch.testing.assert_close(whiten(x[1:], mask[1:], moments=moments), torch.tensor([[1.224744, 0.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        whiten(x, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_kl_estimators_by_hand():
    """(logp, ref) = (-1, -2): k1 = 1, k3 with r = -1: e^-1 - 1 + 1 = 0.367879.
    (logp, ref) = (-2, -1): k1 = -1 (negative!), k3 with r = 1: e - 1 - 1 = 0.718282. k3 is never negative."""
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([0.367879, 0.718282]))
    g = torch.Generator().manual_seed(1)
    assert (kl_penalty(torch.randn(1000, generator=g) * 5, torch.randn(1000, generator=g) * 5, "k3") >= 0).all()
    with pytest.raises(ValueError, match="'k1' or 'k3'"):
        kl_penalty(logp, ref, "k2")


def test_shape_rewards_by_hand():
    """coef 0.1, eos penalty 1. Row 0 (2 tokens, ended with EOS, score 1): [-0.05, -0.1 + 1, 0] = [-0.05, 0.9, 0].
    Row 1 (1 token, no EOS, score 2): [-0.2 + 2 - 1, 0, 0] = [0.8, 0, 0]. KL on padding (9) is ignored."""
    out = shape_rewards(torch.tensor([1.0, 2.0]), torch.tensor([[0.5, 1.0, 9.0], [2.0, 9.0, 9.0]]),
                        torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), coef=0.1,
                        has_eos=torch.tensor([True, False]), eos_missing_penalty=1.0)
    torch.testing.assert_close(out, torch.tensor([[-0.05, 0.9, 0.0], [0.8, 0.0, 0.0]]))


def test_kl_controllers_by_hand():
    """Adaptive (Ziegler et al.): beta 0.1, target 6, horizon 10000, 256 steps per update.
    KL 9: e = clip(0.5) = 0.2 -> beta * (1 + 0.2 * 256 / 10000) = 0.100512; then KL 6.6: e = 0.1 -> x 1.00256;
    KL 3 from 0.1: e = clip(-0.5) = -0.2 -> 0.099488. Fixed never moves."""
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(9.0, 256)
    assert c.value == pytest.approx(0.100512)
    c.update(6.6, 256)
    assert c.value == pytest.approx(0.100512 * 1.00256)
    d = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    d.update(3.0, 256)
    assert d.value == pytest.approx(0.099488)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value
    e = AdaptiveKLController(0.1, target=6.0, horizon=10, min_value=0.09)  # 0.1 x (1 - 0.2 x 32/10) = 0.036 < 0.09
    e.update(0.0, 32)
    assert e.value == 0.09
    e.update(12.0, 32)  # 0.09 x (1 + 0.2 x 3.2) = 0.1476
    assert e.value == pytest.approx(0.1476)
    f = FixedKLController(0.04)
    f.update(100.0, 256)
    assert f.value == 0.04


def test_running_mean_std_by_hand():
    """[1, 3] -> mean 2, var 1; then [5]: all of [1, 3, 5] -> mean 3, population var 8/3.
    normalise(5) = 2 (mean only) or 2 / sqrt(8/3) = 1.224745 (with std). state_dict round-trips."""
    rms = RunningMeanStd()
    rms.update(torch.tensor([1.0, 3.0]))
    assert (rms.count, rms.mean, rms.var) == (2, pytest.approx(2.0), pytest.approx(1.0))
    rms.update(torch.tensor([5.0]))
    assert (rms.count, rms.mean, rms.var) == (3, pytest.approx(3.0), pytest.approx(8 / 3))
    assert rms.normalise(torch.tensor(5.0)).item() == pytest.approx(2.0)
    assert rms.normalise(torch.tensor(5.0), use_std=True).item() == pytest.approx(1.224745, abs=1e-6)
    other = RunningMeanStd()
    other.load_state_dict(rms.state_dict())
    assert other.state_dict() == rms.state_dict()


@pytest.mark.parametrize("reduce,total_of", [(token_mean, lambda m: m.sum()), (sequence_mean, lambda m: m.shape[0])])
def test_two_data_parallel_shards_equal_the_whole_batch(reduce, total_of):
    """Split B = 4 responses of unequal lengths into two ranks of 2. With total = the GLOBAL count each rank's loss is
    its share, and the sum over ranks (what DDP's mean x world size gives) equals the whole-batch loss, in value and
    gradient. The mean of per-rank token means does not (the shards hold different token counts)."""
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 6, generator=g).requires_grad_()
    old, adv = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in (6, 1, 2, 3)])
    full, _ = ppo_policy_loss(logp, old, adv, mask, reduce=reduce)
    (g_full,) = torch.autograd.grad(full, logp)
    total = total_of(mask)
    shards = [ppo_policy_loss(logp[s], old[s], adv[s], mask[s], reduce=reduce, total=total)[0]
              for s in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(shards[0] + shards[1], full)
    (g_shards,) = torch.autograd.grad(shards[0] + shards[1], logp)
    torch.testing.assert_close(g_shards, g_full)
    vl = [value_loss(logp[s], old[s], adv[s], mask[s], reduce=reduce, total=total)[0] for s in (slice(0, 2),
                                                                                                slice(2, 4))]
    torch.testing.assert_close(vl[0] + vl[1], value_loss(logp, old, adv, mask, reduce=reduce)[0])
    if reduce is token_mean:
        naive = sum(ppo_policy_loss(logp[s], old[s], adv[s], mask[s])[0] for s in (slice(0, 2), slice(2, 4))) / 2
        assert not torch.allclose(naive, full)


# ------------------------------------------------------------------------------------------ critic-free estimators
from align.ppo_losses import (discounted_returns, grpo_advantages, kl_loss, reinforce_pp_advantages,  # noqa: E402
                              rloo_advantages, sequence_mean_token_sum)

# One prompt, a group of G = 4 replies scored [1, 2, 3, 6], then a second prompt whose 4 replies all score 1.
SCORES = torch.tensor([1.0, 2.0, 3.0, 6.0, 1.0, 1.0, 1.0, 1.0])


def test_grpo_advantages_by_hand():
    """Group 1: mean 3, deviations [-2, -1, 0, 3], unbiased variance (4 + 1 + 0 + 9) / 3 = 14/3, std 2.160247:
    GRPO = [-0.925820, -0.462910, 0, 1.388730]. Dr. GRPO (no std): [-2, -1, 0, 3]. Group 2 (all equal): zeros,
    not 0/0. A batch that is not whole groups of >= 2 is refused."""
    torch.testing.assert_close(grpo_advantages(SCORES, 4),
                               torch.tensor([-0.925820, -0.462910, 0.0, 1.388730, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(grpo_advantages(SCORES, 4, scale=False),
                               torch.tensor([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="group_size >= 2 dividing the 8 responses"):
        grpo_advantages(SCORES, 3)
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(SCORES, 1)


def test_rloo_advantages_by_hand():
    """Leave-one-out baselines of group 1: (2+3+6)/3 = 11/3, (1+3+6)/3 = 10/3, (1+2+6)/3 = 3, (1+2+3)/3 = 2:
    advantages [1 - 11/3, 2 - 10/3, 3 - 3, 6 - 2] = [-8/3, -4/3, 0, 4] (= 4/3 x the deviations from the mean).
    Group 2: zeros."""
    torch.testing.assert_close(rloo_advantages(SCORES, 4),
                               torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0]))


def test_reinforce_pp_advantages_by_hand():
    """The 4 replies of group 1 with lengths [1, 2, 2, 3], KL 1 on every token, coef 0.5: shape_rewards gives
    [[0.5], [-0.5, 1.5], [-0.5, 2.5], [-0.5, -0.5, 5.5]] (score on the last token). Returns (gamma 1, reverse sums):
    [[0.5], [1.0, 1.5], [2.0, 2.5], [4.5, 5.0, 5.5]]. Over the 8 tokens: mean 22.5 / 8 = 2.8125, population variance
    89.25 / 8 - 2.8125^2 = 3.246094, std 1.801692: advantages (x - 2.8125) / 1.801692 =
    [[-1.283516], [-1.005999, -0.728482], [-0.450965, -0.173448], [0.936620, 1.214137, 1.491653]].
    gamma 0.5 discounts: row 3 returns [-0.5 - 0.25 + 1.375, -0.5 + 2.75, 5.5] = [0.625, 2.25, 5.5]."""
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1]])
    rewards = shape_rewards(SCORES[:4], torch.ones(4, 3), mask, coef=0.5, has_eos=torch.ones(4, dtype=torch.bool))
    adv, ret = reinforce_pp_advantages(rewards, mask)
    torch.testing.assert_close(ret, torch.tensor([[0.5, 0, 0], [1.0, 1.5, 0], [2.0, 2.5, 0], [4.5, 5.0, 5.5]]))
    torch.testing.assert_close(adv, torch.tensor([[-1.283516, 0, 0], [-1.005999, -0.728482, 0],
                                                  [-0.450965, -0.173448, 0], [0.936620, 1.214137, 1.491653]]))
    torch.testing.assert_close(discounted_returns(rewards, mask, gamma=0.5)[3], torch.tensor([0.625, 2.25, 5.5]))
    moments = masked_moments(ret[:2], mask[:2]) + masked_moments(ret[2:], mask[2:])  # two ranks' shares
    torch.testing.assert_close(reinforce_pp_advantages(rewards[2:], mask[2:], moments=moments)[0], adv[2:])


def test_k3_kl_loss_by_hand():
    """Tokens (logp, ref) = (-1, -2), (-2, -1) and a padded 50: k3 = [e^-1 - (-1) - 1, e - 1 - 1] =
    [0.367879, 0.718282], token mean 0.543081, x coef 0.1 = 0.0543081. d/d logp = coef (1 - e^(ref - logp)) / 2 =
    [0.05 (1 - e^-1), 0.05 (1 - e)] = [0.031606, -0.085914]: the loss pulls logp towards ref from both sides."""
    logp = torch.tensor([[-1.0, -2.0, 50.0]], requires_grad=True)
    loss = kl_loss(logp, torch.tensor([[-2.0, -1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]]), coef=0.1)
    assert loss.item() == pytest.approx(0.0543081, abs=1e-7)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.031606, -0.085914, 0.0]]))


def test_sequence_mean_token_sum_by_hand():
    """x = [[1, 2, (9)], [3, (9), (9)]]: per-sequence sums [3, 3]; mean over 2 sequences / scale 4 = 0.75 (Dr. GRPO
    with a budget of 4 tokens). token_mean = 6 / 3 = 2 and sequence_mean = (1.5 + 3) / 2 = 2.25 weigh the short reply
    more per token. With total = the global sequence count, two shards add up to the whole."""
    x, mask = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert sequence_mean_token_sum(x, mask, scale=4).item() == 0.75
    assert token_mean(x, mask).item() == 2.0 and sequence_mean(x, mask).item() == 2.25
    shards = [sequence_mean_token_sum(x[s], mask[s], total=2, scale=4) for s in (slice(0, 1), slice(1, 2))]
    assert (shards[0] + shards[1]).item() == 0.75


def test_policy_loss_with_a_sequence_reduction_by_hand():
    """test_policy_loss_by_hand's tokens, reduced Dr. GRPO's way (align.rl.reduction): per-token terms
    [-1.2, -0.5 | 0.8, 2.0], per-reply sums [-1.7, 2.8], / (2 replies x budget 3) = 1.1 / 6 = 0.183333. The stats
    stay token means, over `n_tokens` (the mini batch's tokens: 8 here, so clip_frac 2/8); without n_tokens, this
    shard's 4 tokens (never the reply count). Gradient: unclipped tokens -A r / 6: -0.5 / 6 and 2 / 6."""
    import functools

    from align.rl import reduction

    logp = torch.tensor([[LN2, -LN2, 100.0], [-LN2, LN2, 100.0]], requires_grad=True)
    old, adv = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 100.0], [-1.0, -1.0, 100.0]])
    reduce, total = reduction("sequence_mean_token_sum", n_sequences=2, n_tokens=8.0, max_new_tokens=3)
    assert isinstance(reduce, functools.partial) and total == 2
    loss, stats = ppo_policy_loss(logp, old, adv, MASK, 0.2, reduce=reduce, total=total, n_tokens=8.0)
    assert loss.item() == pytest.approx(1.1 / 6, abs=1e-6)
    assert stats["policy_clip_frac"].item() == pytest.approx(0.25)
    assert stats["approx_kl"].item() == pytest.approx(0.125, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 6, 0.0], [0.0, 2.0 / 6, 0.0]]))
    _, stats = ppo_policy_loss(logp, old, adv, MASK, 0.2, reduce=reduce, total=total)
    assert stats["policy_clip_frac"].item() == pytest.approx(0.5)
    assert reduction("token_mean", 2, 8.0, 3) == (token_mean, 8.0)
    assert reduction("sequence_mean", 2, 8.0, 3) == (sequence_mean, 2)
