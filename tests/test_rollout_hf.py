"""The built-in rollout engine on transformers causal LMs (model_impl hf): Llama and Qwen2 from configs with random
weights, sampled on transformers' DynamicCache. Checked against the slow obvious loop (no cache, no padding, the
whole sequence re-run per token), with rows of different lengths (left padding) that stop at different steps.
"""

import pytest
import torch

from data.chatml import ENDOFTEXT, IM_END, special_id
from data.template import chat_format
from rollout import LENGTH, STOP, BuiltinEngine, GreedyMismatch, SamplingParams
from rollout.builtin import reference_greedy


def hf_model(arch: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.5)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    return model.float().eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prompts(small_tok):
    fmt = chat_format(small_tok)
    out = [fmt.prompt_ids([{"role": "user", "content": q}])
           for q in ["Hi", "What is the capital of France?", "Write a haiku about rain, please, in English."]]
    assert len({len(p) for p in out}) == 3  # ragged: left padding in the batch
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_no_cache_loop(arch, prompts):
    model = hf_model(arch)
    got = BuiltinEngine(model).generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=12))
    assert got.response_ids == [reference_greedy(model, p, 12) for p in prompts]
    assert got.finish_reason == [LENGTH] * 3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rows_leave_the_batch_and_the_cache(arch, prompts):
    """Stop ids taken from the reference continuations so rows finish at different steps: the others continue
    exactly as if alone (DynamicCache.batch_select_indices drops the finished rows)."""
    model = hf_model(arch, seed=1)
    refs = [reference_greedy(model, p, 12) for p in prompts]
    stop = [refs[0][2], refs[1][6]]
    got = BuiltinEngine(model).generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=12,
                                                                stop_token_ids=stop))
    for ref, resp, why in zip(refs, got.response_ids, got.finish_reason):
        cut = next((j + 1 for j, t in enumerate(ref) if t in stop), len(ref))
        assert resp == ref[:cut]
        assert why == (STOP if cut < len(ref) or ref[-1] in stop else LENGTH)
    assert got.finish_reason[0] == STOP


def test_greedy_check_and_seeded_samples(prompts, small_tok):
    """The engine's greedy tokens and log-probs equal the policy's teacher-forced ones (the check PPO runs after a
    sync), another model's weights are caught, and a seeded row does not depend on the batch it is in."""
    model, other = hf_model("llama"), hf_model("llama", seed=5)
    engine = BuiltinEngine(model)
    report = engine.greedy_check(model, prompts, max_tokens=8)
    assert report["tokens_compared"] > 0
    with pytest.raises(GreedyMismatch):
        from rollout.sync import verify_greedy

        greedy = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=8))
        verify_greedy(other, prompts, greedy)
    stops = [special_id(small_tok, IM_END), special_id(small_tok, ENDOFTEXT)]
    params = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=8, stop_token_ids=stops, seed=3)
    both = engine.generate(prompts, params)
    alone = engine.generate(prompts[1:2], SamplingParams(**{**params.__dict__, "seed": 4}))
    assert both.response_ids[2:4] == alone.response_ids
    assert all(x <= 0 for lp in both.sampler_logprobs for x in lp)


def test_ppo_model_impl_hf_rolls_out_on_the_builtin_engine():
    """A transformers policy (model_impl hf) samples on the built-in engine; vLLM is refused at parse time."""
    from align.ppo import PPOConfig
    from common.config import ConfigError, build_config

    base = dict(policy_path="p", reward_path="r", prompt_files=["x.jsonl"], model_impl="hf")
    assert build_config(PPOConfig, base).engine == "builtin"
    with pytest.raises(ConfigError, match="model_impl hf runs its rollouts on the built-in engine"):
        build_config(PPOConfig, base | {"engine": "vllm"})
