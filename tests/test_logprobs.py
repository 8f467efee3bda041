"""Chunked log-probs against the obvious `log_softmax(...).gather(...)`: values and gradients of both, the fast
kernel and the slow version, within a rounding bound of a float64 evaluation. The bound comes from forward error
analysis of the problem at hand (tests/numerics.py), not from one machine's results: fp32 rounding depends on the
CPU's vector path, and both paths must pass under ATEN_CPU_CAPABILITY=default as well (`make test-numerics`)."""

import math

import pytest
import torch
from numerics import assert_within, logprob_bounds
from transformers import Qwen2Config, Qwen2ForCausalLM

from data.chatml import IGNORE_INDEX
from model.logprobs import auto_chunk, causal_lm_logprobs, reference_logprobs, token_logprobs
from model.qwen import QwenConfig, QwenForCausalLM

pytestmark = pytest.mark.numerics


def inputs(B=3, T=5, H=16, V=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[2, -1] = IGNORE_INDEX
    return h, w, labels


def test_by_hand():
    """V = 2, weight rows e1, e2; hidden (ln 3, 0): logits (ln 3, 0), softmax (3/4, 1/4).
    log p(0) = ln(3/4) = -0.28768; log p(1) = ln(1/4) = -1.38629; an ignored label gives 0."""
    h = torch.tensor([[math.log(3), 0.0]] * 3)
    w = torch.eye(2)
    got = token_logprobs(h, w, torch.tensor([0, 1, IGNORE_INDEX]))
    torch.testing.assert_close(got, torch.tensor([math.log(0.75), math.log(0.25), 0.0]))


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_grads_equal_log_softmax_gather(chunk, temperature):
    h, w, labels = inputs()
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    ref64, bound = logprob_bounds(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), upstream.reshape(-1), temperature)
    slow = reference_logprobs(h @ w.t(), labels, temperature)
    fast = token_logprobs(h, w, labels, temperature=temperature, chunk_size=chunk)
    for name, got in (("slow", slow), ("fast", fast)):
        gh, gw = torch.autograd.grad((got * upstream).sum(), (h, w))
        assert_within(got.reshape(-1), ref64["logp"], bound["logp"], f"{name} logp")
        assert_within(gh.reshape(-1, h.shape[-1]), ref64["grad_hidden"], bound["grad_hidden"], f"{name} d/dh")
        assert_within(gw, ref64["grad_weight"], bound["grad_weight"], f"{name} d/dw")
    assert (fast[labels == IGNORE_INDEX] == 0).all()


def test_entropy_equals_full_softmax_entropy():
    h, w, labels = inputs()
    ref64, bound = logprob_bounds(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), torch.ones(labels.numel()), 0.8)
    logp_full = torch.log_softmax((h @ w.t()).float() / 0.8, -1)
    slow = -(logp_full.exp() * logp_full).sum(-1)
    _, fast = token_logprobs(h, w, labels, temperature=0.8, chunk_size=4, return_entropy=True)
    labelled = labels != IGNORE_INDEX  # unlabelled positions are skipped: entropy 0 there
    assert labelled.any() and not labelled.all()
    assert_within(torch.where(labelled, slow, 0.0).reshape(-1), ref64["entropy"], bound["entropy"], "slow entropy")
    assert_within(fast.reshape(-1), ref64["entropy"], bound["entropy"], "fast entropy")


def test_bf16_inputs():
    """bf16 hidden and weight: log-probs in fp32, gradients in bf16; the bound carries bf16's rounding of the logits
    (2^-8 relative) and of the gradients."""
    h, w, labels = inputs(dtype=torch.bfloat16)
    ref64, bound = logprob_bounds(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), torch.ones(labels.numel()))
    slow = reference_logprobs(h @ w.t(), labels)
    fast = token_logprobs(h, w, labels, chunk_size=4)
    assert fast.dtype == torch.float32
    for name, got in (("slow", slow), ("fast", fast)):
        gh, gw = torch.autograd.grad(got.sum(), (h, w))
        assert gh.dtype == gw.dtype == torch.bfloat16
        assert_within(got.reshape(-1), ref64["logp"], bound["logp"], f"{name} logp")
        assert_within(gh.reshape(-1, h.shape[-1]), ref64["grad_hidden"], bound["grad_hidden"], f"{name} d/dh")
        assert_within(gw, ref64["grad_weight"], bound["grad_weight"], f"{name} d/dw")


def _tiny_models():
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)).eval()
    ours = QwenForCausalLM(QwenConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)).init_weights(seed=0).eval()
    return hf, ours


@pytest.mark.parametrize("which", [0, 1])
def test_causal_lm_logprobs_for_custom_and_transformers_models(which):
    """Same hidden states (the decoder runs once either way), so the two differ only in the output layer and the
    log-softmax: both within the bound of a float64 evaluation on those hidden states."""
    model = _tiny_models()[which]
    ids = torch.randint(0, 97, (2, 6))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], 1)
    with torch.no_grad():
        logits = model(ids)
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        slow = reference_logprobs(logits, labels)
        fast = causal_lm_logprobs(model, ids, labels, chunk_size=5)
        out = model.get_decoder()(input_ids=ids)
        hidden = out if isinstance(out, torch.Tensor) else out.last_hidden_state  # (B, T, H)
    ref64, bound = logprob_bounds(hidden.reshape(-1, hidden.shape[-1]), model.get_output_embeddings().weight,
                                  labels.reshape(-1), torch.ones(labels.numel()))
    assert_within(slow.reshape(-1), ref64["logp"], bound["logp"], "slow")
    assert_within(fast.reshape(-1), ref64["logp"], bound["logp"], "fast")


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_weighted_sum_equals_slow_version(chunk, temperature):
    """weighted_logprob_sum computes its gradient in the forward pass; value and grads must equal
    (coef * log_softmax(...).gather(...)).sum(), including through a non-unit upstream gradient (x 3): both within
    the rounding bound of a float64 evaluation."""
    from model.logprobs import weighted_logprob_sum
    h, w, labels = inputs()
    coef = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2))
    ref64, bound = logprob_bounds(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), coef.reshape(-1), temperature,
                                  upstream=3.0)
    slow = (coef * reference_logprobs(h @ w.t(), labels, temperature)).sum()
    fast = weighted_logprob_sum(h, w, labels, coef, temperature=temperature, chunk_size=chunk)
    for name, got in (("slow", slow), ("fast", fast)):
        gh, gw = torch.autograd.grad(3 * got, (h, w))
        assert_within(3 * got, ref64["sum"], bound["sum"], f"{name} value")
        assert_within(gh.reshape(-1, h.shape[-1]), ref64["grad_hidden"], bound["grad_hidden"], f"{name} d/dh")
        assert_within(gw, ref64["grad_weight"], bound["grad_weight"], f"{name} d/dw")
    with torch.no_grad():  # no gradient work (and no error) without grad mode
        got = weighted_logprob_sum(h, w, labels, coef, temperature)
    assert_within(3 * got, ref64["sum"], bound["sum"], "no-grad value")


def test_default_chunk_is_twice_the_hidden_size_within_256_and_512():
    """The kernels' default rows per chunk (chunk_size None, the trainers' default): 2 x hidden, in [256, 512]."""
    assert [auto_chunk(h) for h in (32, 128, 129, 200, 256, 896, 3584)] == [256, 256, 258, 400, 512, 512, 512]
