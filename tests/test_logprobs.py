"""Chunked log-probs against the obvious `log_softmax(...).gather(...)`: values and gradients to 1e-6 in fp32
(absolute, plus 1e-6 relative: a 1-row matmul rounds differently from the full one, about 1 ulp of a log-prob ~ -5)."""

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from data.chatml import IGNORE_INDEX
from model.logprobs import causal_lm_logprobs, reference_logprobs, token_logprobs
from model.qwen import QwenConfig, QwenForCausalLM


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
    ref = reference_logprobs(h @ w.t(), labels, temperature)
    gh_ref, gw_ref = torch.autograd.grad((ref * upstream).sum(), (h, w))
    got = token_logprobs(h, w, labels, temperature=temperature, chunk_size=chunk)
    gh, gw = torch.autograd.grad((got * upstream).sum(), (h, w))
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gh, gh_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gw, gw_ref, atol=1e-6, rtol=1e-6)
    assert (got[labels == IGNORE_INDEX] == 0).all()


def test_entropy_equals_full_softmax_entropy():
    h, w, labels = inputs()
    logp_full = torch.log_softmax((h @ w.t()).float() / 0.8, -1)
    ent_ref = -(logp_full.exp() * logp_full).sum(-1)
    _, ent = token_logprobs(h, w, labels, temperature=0.8, chunk_size=4, return_entropy=True)
    labelled = labels != IGNORE_INDEX  # unlabelled positions are skipped: entropy 0 there
    assert labelled.any() and not labelled.all()
    torch.testing.assert_close(ent, torch.where(labelled, ent_ref, 0.0).detach(), atol=1e-6, rtol=1e-6)


def test_bf16_inputs():
    """bf16 hidden and weight: fp32 results equal the reference on the same bf16 logits; grads come back in bf16."""
    h, w, labels = inputs(dtype=torch.bfloat16)
    ref = reference_logprobs(h @ w.t(), labels)
    got = token_logprobs(h, w, labels, chunk_size=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    gh_ref, gw_ref = torch.autograd.grad(ref.sum(), (h, w))
    gh, gw = torch.autograd.grad(got.sum(), (h, w))
    assert gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(gh.float(), gh_ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gw.float(), gw_ref.float(), atol=2e-2, rtol=2e-2)


def _tiny_models():
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)).eval()
    ours = QwenForCausalLM(QwenConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)).init_weights(seed=0).eval()
    return hf, ours


@pytest.mark.parametrize("which", [0, 1])
def test_causal_lm_logprobs_for_custom_and_transformers_models(which):
    model = _tiny_models()[which]
    ids = torch.randint(0, 97, (2, 6))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], 1)
    with torch.no_grad():
        logits = model(ids)
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        ref = reference_logprobs(logits, labels)
        got = causal_lm_logprobs(model, ids, labels, chunk_size=5)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_weighted_sum_equals_slow_version(chunk, temperature):
    """weighted_logprob_sum computes its gradient in the forward pass; value and grads must equal
    (coef * log_softmax(...).gather(...)).sum(), including through a non-unit upstream gradient (x 3)."""
    from model.logprobs import weighted_logprob_sum
    h, w, labels = inputs()
    coef = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2))
    ref = (coef * reference_logprobs(h @ w.t(), labels, temperature)).sum()
    gh_ref, gw_ref = torch.autograd.grad(3 * ref, (h, w))
    got = weighted_logprob_sum(h, w, labels, coef, temperature=temperature, chunk_size=chunk)
    gh, gw = torch.autograd.grad(3 * got, (h, w))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(gh, gh_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gw, gw_ref, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # no gradient work (and no error) without grad mode
        torch.testing.assert_close(weighted_logprob_sum(h, w, labels, coef, temperature), ref.detach(), atol=1e-5, rtol=1e-6)
