"""The chunked log-prob kernels' memory paths (model/logprobs.py): the one-chunk case keeps the forward's softmax
for the backward instead of recomputing it, a second backward recomputes, and the fused weighted sum hands its
gradient over once. Each against a float64 evaluation within the derived rounding bound (tests/numerics.py)."""

import pytest
import torch
from numerics import assert_within, logprob_bounds

from data.chatml import IGNORE_INDEX
from model.logprobs import token_logprobs, weighted_logprob_sum

pytestmark = pytest.mark.numerics


def inputs(N=12, H=16, V=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = IGNORE_INDEX
    return h, w, labels


@pytest.mark.parametrize("chunk", [64, 5])  # one chunk (kept softmax) and several (recomputed)
@pytest.mark.parametrize("entropy", [False, True])
def test_kept_and_recomputed_backward_and_a_second_backward(chunk, entropy):
    h, w, labels = inputs()
    up = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    ref64, bound = logprob_bounds(h, w, labels, up, temperature=0.7)
    out = token_logprobs(h, w, labels, temperature=0.7, chunk_size=chunk, return_entropy=entropy)
    logp = out[0] if entropy else out
    assert_within(logp, ref64["logp"], bound["logp"], "logp")
    if entropy:
        assert_within(out[1], ref64["entropy"], bound["entropy"], "entropy")
    loss = (logp * up).sum()
    for attempt in ("first", "second (retain_graph: recomputed)"):
        gh, gw = torch.autograd.grad(loss, (h, w), retain_graph=True)
        assert_within(gh, ref64["grad_hidden"], bound["grad_hidden"], f"{attempt} d/dh")
        assert_within(gw, ref64["grad_weight"], bound["grad_weight"], f"{attempt} d/dw")


def test_no_labelled_rows_give_zero_gradients():
    h, w, _ = inputs()
    labels = torch.full((h.shape[0],), IGNORE_INDEX)
    for fn in (lambda: token_logprobs(h, w, labels).sum(), lambda: weighted_logprob_sum(h, w, labels, -torch.ones(12))):
        gh, gw = torch.autograd.grad(fn(), (h, w))
        assert not gh.any() and not gw.any()


def test_backward_twice_through_weighted_logprob_sum_is_refused():
    """weighted_logprob_sum hands its forward-computed gradient to autograd once (no copy)."""
    h, w, labels = inputs()
    loss = weighted_logprob_sum(h, w, labels, torch.full(labels.shape, -0.25))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
