"""The built-in rollout engine and the sync helpers (fast; the real vLLM engine is in test_vllm.py).

Every fast path is checked against the slow obvious one: the KV-cache greedy loop against a no-cache loop, top-p
against a per-row Python loop, sampler log-probs against the policy's own token_logprobs.
"""

import math
import subprocess
import sys

import pytest
import torch
from numerics import SequenceLogprobs64, assert_within

from data.chatml import ENDOFTEXT, IM_END, special_id, tokenize_chat
from model.logprobs import token_logprobs
from model.qwen import QwenConfig, QwenForCausalLM
from rollout import LENGTH, STOP, BuiltinEngine, GreedyMismatch, SamplingParams, make_engine
from rollout.builtin import inverse_cdf_sample, reference_greedy, sample_next, top_p_filter
from rollout.sync import full_state_dict, merged_lora, verify_greedy


def tiny(seed=0, tie=False, vocab=1000):
    """2 layers, hidden 64; std 0.5 makes next-token distributions peaked, so greedy has no near-ties."""
    cfg = QwenConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                     tie_word_embeddings=tie)
    return QwenForCausalLM(cfg).init_weights(std=0.5, seed=seed).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~7x faster on one thread when the 2 cores are shared; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prompts(small_tok):
    """Real ChatML prompts of different lengths, rendered with the generation prompt (ragged -> left padding)."""
    qs = ["Hi", "What is the capital of France?", "Write a haiku about rain, please, in English."]
    out = []
    for q in qs:
        ids = tokenize_chat(small_tok, [{"role": "user", "content": q}], add_generation_prompt=True).input_ids
        out.append(ids)
    assert len({len(p) for p in out}) == 3
    return out


@pytest.fixture(scope="module")
def stops(small_tok):
    return [special_id(small_tok, IM_END), special_id(small_tok, ENDOFTEXT)]


def slow_top_p(logits, top_p):
    """Per row: walk the tokens from most to least likely, keep them until the kept mass reaches top_p."""
    out = torch.full_like(logits, float("-inf"))
    for b in range(logits.shape[0]):
        probs = torch.softmax(logits[b].double(), -1).tolist()
        mass = 0.0
        for v in sorted(range(len(probs)), key=lambda v: -probs[v]):
            out[b, v] = logits[b, v]
            mass += probs[v]
            if mass >= top_p:
                break
    return out


def test_top_p_by_hand():
    """probs (0.5, 0.3, 0.15, 0.05): top_p 0.45 keeps {0}; 0.75 keeps {0, 1} (0.5 < 0.75 <= 0.8);
    0.85 keeps {0, 1, 2} (0.8 < 0.85 <= 0.95); 1.0 keeps all."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = {p: torch.isfinite(top_p_filter(logits, p))[0].tolist() for p in (0.45, 0.75, 0.85, 1.0)}
    assert kept == {0.45: [True, False, False, False], 0.75: [True, True, False, False],
                    0.85: [True, True, True, False], 1.0: [True, True, True, True]}


@pytest.mark.parametrize("k", [8, 64, 10**6])  # partial sort of k tokens decides / falls back to the full sort
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_equals_slow_version(top_p, k):
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(0)) * 4
    assert torch.equal(top_p_filter(logits, top_p, k=k), slow_top_p(logits, top_p))


def test_inverse_cdf_sample_by_hand():
    """probs (0, 0.5, 0, 0.5, 0): cdf (0, 0.5, 0.5, 1, 1); u * total = 0 -> token 1 (first cdf > 0); 0.49 -> 1;
    0.5 -> 3 (first cdf > 0.5); 1 - 2^-24 -> 3, never the zero-probability tokens 0, 2, 4."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).repeat(4, 1)
    u = torch.tensor([0.0, 0.49, 0.5, 1 - 2**-24])
    assert inverse_cdf_sample(probs, u).tolist() == [1, 1, 3, 3]


def test_inverse_cdf_sample_frequencies():
    """20,000 draws from (0.5, 0.3, 0.15, 0.05): each frequency within 0.015 (about 4 standard errors)."""
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(20000, 1)
    tok = inverse_cdf_sample(probs, torch.rand(20000, generator=g))
    freq = torch.bincount(tok, minlength=4).float() / 20000
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)


def test_sampled_logprob_is_under_the_truncated_renormalised_distribution():
    """probs (0.5, 0.3, 0.15, 0.05), top_p 0.75: nucleus {0, 1} renormalised to (0.625, 0.375).
    Temperature 2 on logits (0, ln 4): scaled (0, ln 2), probs (1/3, 2/3)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(200, 1)
    tok, lp = sample_next(logits, 1.0, 0.75, torch.rand(200, generator=g))
    assert set(tok.tolist()) == {0, 1}
    expected = torch.where(tok == 0, math.log(0.625), math.log(0.375))
    torch.testing.assert_close(lp, expected.float())
    tok, lp = sample_next(torch.tensor([[0.0, math.log(4)]]).repeat(200, 1), 2.0, 1.0, torch.rand(200, generator=g))
    torch.testing.assert_close(lp, torch.where(tok == 0, math.log(1 / 3), math.log(2 / 3)).float())
    assert 0.25 < (tok == 0).float().mean() < 0.42  # about 1/3 of 200 draws
    tok, lp = sample_next(torch.tensor([[0.0, math.log(4)]]), 0.0, 0.5, torch.rand(1))  # greedy: raw softmax, no top-p
    assert tok.tolist() == [1] and lp.item() == pytest.approx(math.log(0.8))


def test_greedy_equals_no_cache_loop(prompts):
    model = tiny()
    got = BuiltinEngine(model).generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=12))
    assert got.response_ids == [reference_greedy(model, p, 12) for p in prompts]
    assert got.finish_reason == [LENGTH] * 3


def test_greedy_with_stop_equals_no_cache_loop_cut_at_the_stop(prompts):
    """Stop ids chosen from the reference continuations so that rows finish at different steps: the finished rows
    leave the batch (and the cache) and the others must continue exactly as if alone."""
    model = tiny()
    refs = [reference_greedy(model, p, 12) for p in prompts]
    stop = [refs[0][2], refs[1][6]]
    got = BuiltinEngine(model).generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=12,
                                                                stop_token_ids=stop))
    for ref, resp, why in zip(refs, got.response_ids, got.finish_reason):
        cut = next((j + 1 for j, t in enumerate(ref) if t in stop), len(ref))
        assert resp == ref[:cut]
        assert why == (STOP if cut < len(ref) or ref[-1] in stop else LENGTH)
    assert got.finish_reason[0] == STOP and len(got.response_ids[0]) <= 3


def test_shapes_stop_and_finish_reasons(prompts, stops):
    """n=3 rows per prompt, adjacent; every response ends at its first stop token ("stop") or at max_tokens."""
    model = tiny()
    stop = stops + list(range(0, 990, 9))  # many stop ids so that some rows stop early
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_tokens=10, stop_token_ids=stop, seed=3)
    r = BuiltinEngine(model, pad_id=stops[1]).generate(prompts, params)
    assert len(r) == 9 and r.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert r.prompt_ids == [prompts[i] for i in r.prompt_index]
    for resp, lp, why in zip(r.response_ids, r.sampler_logprobs, r.finish_reason):
        assert len(lp) == len(resp) and 1 <= len(resp) <= 10
        assert not any(t in stop for t in resp[:-1])  # a finished row stops growing
        assert why == (STOP if resp[-1] in stop else LENGTH)
        assert why == STOP or len(resp) == 10
        assert all(x <= 0 for x in lp)
    assert {STOP, LENGTH} <= set(r.finish_reason)
    assert r.num_tokens() == sum(len(x) for x in r.response_ids)


def policy_logprobs_at(model, prompt, response, temperature):
    """The trainer's log-probs of a sampled response: token_logprobs on the policy's hidden states."""
    ids = torch.tensor([prompt + response])
    hidden = model.get_decoder()(ids)  # (1, T, H)
    h = hidden[0, len(prompt) - 1:-1]  # (R, H): the state before each response token
    return token_logprobs(h, model.lm_head.weight, torch.tensor(response), temperature)


@torch.no_grad()
@pytest.mark.numerics
def test_sampler_logprobs_equal_policy_logprobs(prompts):
    """top_p 1.0: equal to token_logprobs at the same temperature. top_p 0.9: larger by -log(nucleus mass) >= 0
    (renormalisation), strictly somewhere: the gap the trainer must not take as its own
    (docs/PITFALLS.md#sampler-log-probs).
    Both within the rounding bound of a float64 evaluation (the cached and the full forward round differently)."""
    model = tiny()
    ref64 = SequenceLogprobs64(model)
    engine = BuiltinEngine(model)
    r = engine.generate(prompts, SamplingParams(n=2, temperature=0.7, top_p=1.0, max_tokens=8, seed=0))
    for p, resp, lp in zip(r.prompt_ids, r.response_ids, r.sampler_logprobs):
        ref, bound, _ = ref64(p, resp, 0.7)
        assert_within(torch.tensor(lp), ref, bound, "sampler (KV cache, batched)")
        assert_within(policy_logprobs_at(model, p, resp, 0.7), ref, bound, "token_logprobs (full forward)")
    r = engine.generate(prompts, SamplingParams(n=2, temperature=0.7, top_p=0.9, max_tokens=8, seed=0))
    gaps, slack = [], []
    for p, resp, lp in zip(r.prompt_ids, r.response_ids, r.sampler_logprobs):
        ref, bound, mass = ref64(p, resp, 0.7)
        gaps.append(torch.tensor(lp, dtype=torch.float64) - ref)  # -log(nucleus mass) >= 0, up to rounding
        slack.append(bound + mass)
    gaps, slack = torch.cat(gaps), torch.cat(slack)
    assert (gaps >= -slack).all() and gaps.max() > 1e-3


def test_seed_reproducible(prompts):
    engine = BuiltinEngine(tiny())
    params = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=8, seed=7)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    c = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=8, seed=8))
    assert a == b
    assert a.response_ids != c.response_ids
    assert a.response_ids[0] != a.response_ids[1]  # the n samples of one prompt differ


@pytest.mark.numerics
def test_seeded_samples_do_not_depend_on_the_batch(prompts):
    """Prompt i is sampled from the stream seeded seed + i: generating prompts [0] and [1, 2] separately (the second
    call with seed + 1, as a PPO rank that holds prompts 1..2 does) gives the same rows as one call with all three."""
    engine = BuiltinEngine(tiny())
    params = dict(n=2, temperature=1.0, top_p=0.9, max_tokens=8)
    whole = engine.generate(prompts, SamplingParams(**params, seed=5))
    first = engine.generate(prompts[:1], SamplingParams(**params, seed=5))
    rest = engine.generate(prompts[1:], SamplingParams(**params, seed=6))
    assert first.response_ids + rest.response_ids == whole.response_ids
    # Top-p log-probs, log p(y) - log M over the same nucleus in both runs: each run within bound + mass of the
    # float64 value, so the two within twice that of each other.
    ref64 = SequenceLogprobs64(engine.model)
    split = first.sampler_logprobs + rest.sampler_logprobs
    for i, (p, resp) in enumerate(zip(whole.prompt_ids, whole.response_ids)):
        _, bound, mass = ref64(p, resp)
        assert_within(torch.tensor(split[i]), torch.tensor(whole.sampler_logprobs[i]), 2 * (bound + mass),
                      f"row {i}: split batches vs one batch")


@pytest.mark.numerics
def test_batch_chunks_and_train_mode_restored(prompts):
    """max_batch_rows splits the rows into several batches; greedy results do not change, and a policy in train
    mode (dropout) is sampled in eval mode and handed back in train mode. Log-probs within the rounding bound of a
    float64 evaluation: a different batch size rounds the matmuls differently."""
    model = tiny()
    want = BuiltinEngine(model).generate(prompts, SamplingParams(n=2, temperature=0.0, max_tokens=6))
    model.train()
    got = BuiltinEngine(model, max_batch_rows=4).generate(prompts, SamplingParams(n=2, temperature=0.0, max_tokens=6))
    assert got.response_ids == want.response_ids and got.finish_reason == want.finish_reason and model.training
    ref64 = SequenceLogprobs64(model)
    for i, (p, resp) in enumerate(zip(want.prompt_ids, want.response_ids)):
        ref, bound, _ = ref64(p, resp)
        assert_within(torch.tensor(got.sampler_logprobs[i]), ref, bound, f"row {i}, batches of 4")
        assert_within(torch.tensor(want.sampler_logprobs[i]), ref, bound, f"row {i}, one batch")


def test_bad_input_names_the_prompt():
    engine = BuiltinEngine(tiny())
    with pytest.raises(ValueError, match="prompt 1: expected a non-empty list"):
        engine.generate([[1, 2], []], SamplingParams())
    with pytest.raises(ValueError, match=r"prompt 0: token ids must be ints in \[0, 1000\), got \[1000\]"):
        engine.generate([[1, 1000]], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="unknown rollout engine kind 'vlm'"):
        make_engine("vlm")


def test_greedy_check_passes_on_the_policy_and_catches_other_weights(prompts):
    a, b = tiny(seed=0), tiny(seed=1)
    stats = BuiltinEngine(a).greedy_check(a, prompts, max_tokens=8)
    assert stats["tokens_compared"] == 24 and stats["max_abs_logprob_diff"] < 1e-4 and stats["ties"] == 0
    greedy_a = BuiltinEngine(a).generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=8))
    with pytest.raises(GreedyMismatch, match=r"prompt 0 position 0: the engine's greedy token is \d+ but the "
                                             r"policy's is \d+"):
        verify_greedy(b, prompts, greedy_a)


def test_full_state_dict_has_lm_head_when_tied():
    model = tiny(tie=True)
    sd = full_state_dict(model)
    assert set(sd) == set(tiny(tie=False).state_dict())
    assert sd["lm_head.weight"].data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_lora_is_merged_for_the_sync_and_unmerged_after():
    """W' = W + (alpha / r) * B @ A during the sync; W again after; names are the plain Qwen2 ones."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny()
    w = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    layer = base.model.layers[0].self_attn.q_proj
    delta = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight  # alpha / r = 2
    with merged_lora(model):
        sd = full_state_dict(model, clone=True)
    assert set(sd) == set(tiny().state_dict())
    torch.testing.assert_close(sd["model.layers.0.self_attn.q_proj.weight"], w + delta)
    torch.testing.assert_close(layer.base_layer.weight, w)  # unmerged again
    assert delta.abs().max() > 1e-3


def test_import_rollout_does_not_import_vllm():
    code = "import sys, rollout, rollout.builtin, rollout.sync; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
