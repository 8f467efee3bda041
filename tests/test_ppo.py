"""PPO trainer (align/ppo.py) on a tiny random policy, reward and value model with the built-in engine:
value warmup freezes the policy and lowers the value loss, resume is exact, PPO-ptx adds the LM loss, start-up
refuses mismatched tokenizers and names the command that makes a missing model."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from launcher import accelerate_launch

import align.experience as experience
import align.ppo as ppo
from align.ppo import PPOConfig
from common.config import ConfigError, build_config
from data.chatml import IGNORE_INDEX

TINY = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "eos_token_id": 998, "pad_token_id": 996}
WORDS = "apple banana cherry dog egg fish grape house ice jam kite lemon".split()


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_tok):
    """policy/ (causal LM), reward/ (scalar head on the same backbone, a seeded head), prompts and text files."""
    from model.checkpoint import config_from_hf, save_causal_lm
    from model.heads import ScalarHeadModel
    from model.qwen import QwenForCausalLM

    d = tmp_path_factory.mktemp("ppo")
    save_causal_lm(QwenForCausalLM(config_from_hf(TINY)).init_weights(seed=0), d / "policy", small_tok)
    ScalarHeadModel.from_pretrained(d / "policy", head_seed=1).save_pretrained(d / "reward", tokenizer=small_tok)
    r = random.Random(0)
    with open(d / "prompts.jsonl", "w") as f:
        for _ in range(12):
            q = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 5)))
            f.write(json.dumps({"prompt": [{"role": "user", "content": "Tell me about " + q}]}) + "\n")
    for name, n in (("pretrain.jsonl", 40), ("heldout.jsonl", 8)):
        with open(d / name, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(r.choice(WORDS) for _ in range(20))}) + "\n")
    return d


def make_config(world, out, **kw) -> PPOConfig:
    values = dict(policy_path=str(world / "policy"), reward_path=str(world / "reward"),
                  prompt_files=[str(world / "prompts.jsonl")], pretrain_files=[str(world / "pretrain.jsonl")],
                  heldout_files=[str(world / "heldout.jsonl")], ptx_seq_len=32, heldout_rows=4,
                  rollout_batch_prompts=4, samples_per_prompt=2, max_new_tokens=6, micro_batch_size=4,
                  value_warmup_steps=1, max_steps=2, policy_lr=1e-3, value_lr=1e-3, ptx_coef=0.0, ptx_rows=2,
                  tax_every=1, true_reward=False, output_dir=str(out))
    values.update(kw)
    return build_config(PPOConfig, values)


def test_recipe_defaults_and_config_errors(world, tmp_path):
    """Sec. 3.2.2 defaults: KL 0.04, value clip 0.15, top-p 0.9, two samples, 50 value-warmup steps."""
    c = PPOConfig()
    assert (c.kl_coef, c.value_clip, c.top_p, c.samples_per_prompt, c.value_warmup_steps, c.clip, c.gamma,
            c.lam, c.policy_lr, c.value_lr) == (0.04, 0.15, 0.9, 2, 50, 0.2, 1.0, 0.95, 1e-6, 5e-6)
    with pytest.raises(ConfigError, match="must split into num_mini_batches"):
        make_config(world, tmp_path, num_mini_batches=3)
    with pytest.raises(ConfigError, match="kl_estimator must be one of"):
        make_config(world, tmp_path, kl_estimator="k2")
    with pytest.raises(ConfigError, match="policy_path .*nowhere: no such folder; create it with `accelerate launch "
                                          "align/sft.py --config configs/sft.yaml"):
        ppo.train(make_config(world, tmp_path, policy_path=str(tmp_path / "nowhere")))


def test_mismatched_tokenizers_are_refused(world, tmp_path, qwen_tok):
    """docs/PITFALLS.md#tokenizer-mismatch: a reward model saved with another vocabulary is refused at start-up,
    before any model loads."""
    import shutil

    shutil.copytree(world / "reward", tmp_path / "reward")
    qwen_tok.save_pretrained(str(tmp_path / "reward"))
    with pytest.raises(ConfigError, match="tokenizer_mismatch retokenize"):
        ppo.train(make_config(world, tmp_path / "out", reward_path=str(tmp_path / "reward")))


def test_rollout_tensors_by_hand():
    """prompt [5, 6, 7] + response [8, 9] and prompt [5] + response [4, 3, 2]: T = 4, R = 3.
    Response token r is predicted by the logits at position P - 1 + r: row 0 -> [2, 3, (pad 0)], row 1 -> [0, 1, 2].
    labels hold the next token only where it is a response token."""
    t = experience.rollout_tensors([[5, 6, 7], [5]], [[8, 9], [4, 3, 2]], pad_id=0)
    I = IGNORE_INDEX
    assert t["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 0]]
    assert t["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert t["labels"].tolist() == [[I, I, 8, 9, I], [4, 3, 2, I, I]]
    assert t["pos"].tolist() == [[2, 3, 0], [0, 1, 2]]
    assert t["mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_lm_loss_adds_coef_times_the_nll_gradient(world, small_tok):
    """PPO-ptx: lm_loss(coef) returns the token-mean NLL of the rows and leaves coef x its gradient in .grad,
    equal to F.cross_entropy on full logits."""
    from data.datasets import build_text_examples, collate, load_records
    from model.checkpoint import load_causal_lm

    rows = build_text_examples(load_records(world / "pretrain.jsonl")[0][:6], small_tok, 32)[:3]
    policy = load_causal_lm(world / "policy").train()
    nll = experience.lm_loss(policy, rows, 996, chunk_size=16, coef=0.5)
    got = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    b = collate(rows, 996)
    logits = policy(b["input_ids"], b["attention_mask"], b["position_ids"])
    want = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE_INDEX)
    (0.5 * want).backward()
    assert nll == pytest.approx(want.item(), rel=1e-5)
    for n, p in policy.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def _weights(folder):
    from model.checkpoint import read_state_dict

    return read_state_dict(folder)


def test_value_warmup_freezes_policy_and_lowers_value_loss(world, tmp_path):
    """Three warmup steps: the policy's weights stay exactly the SFT weights (and the KL to the reference is 0),
    the value loss falls, and the adaptive KL coefficient does not move (a KL of 0 there says nothing)."""
    c = make_config(world, tmp_path, value_warmup_steps=3, max_steps=3, ppo_epochs=4, value_lr=3e-3,
                    kl_adaptive=True, kl_target=1.0, kl_horizon=8)
    hist = ppo.train(c)
    assert [h["kl_coef"] for h in hist] == [0.04] * 3
    assert [h["value_warmup"] for h in hist] == [1.0, 1.0, 1.0]
    assert all("policy_loss" not in h for h in hist) and all(h["kl_k3"] == 0.0 for h in hist)
    before, after = _weights(world / "policy"), _weights(tmp_path / "final")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert hist[-1]["value_loss"] < hist[0]["value_loss"]
    assert hist[-1]["alignment_tax"] == 0.0  # a frozen policy pays no tax


def test_resume_gives_the_same_next_step(world, tmp_path):
    """Stop after step 2 and resume: step 3 (a policy step) equals the uninterrupted run's, and so do the weights."""
    kw = dict(max_steps=3, value_warmup_steps=1, ptx_coef=0.5, kl_adaptive=True, reward_norm_std=True)
    full = ppo.train(make_config(world, tmp_path / "a", **kw))
    ppo.train(make_config(world, tmp_path / "b", stop_at_step=2, **kw))
    resumed = ppo.train(make_config(world, tmp_path / "b", **kw))
    assert len(resumed) == 1
    for k in ("rm_score", "kl_k1", "policy_loss", "value_loss", "ptx_loss", "kl_coef", "score_normalised"):
        assert resumed[0][k] == full[-1][k], k
    a, b = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_policy_reference_is_the_disabled_adapter_and_resumes_exactly(world, tmp_path):
    """LoRA policy: no reference copy is loaded (the reference is the policy with its adapter disabled). At the start
    the adapter adds exactly 0, so the KL is exactly 0 until the first policy step; after it the KL is not 0. Only
    the adapted layers change in the merged final model. Stopping after step 2 and resuming from the adapter
    checkpoint gives the uninterrupted run's step 3 and the same merged weights."""
    kw = dict(lora_r=4, lora_alpha=8.0, max_steps=3, value_warmup_steps=1, ptx_coef=0.5, kl_adaptive=True)
    full = ppo.train(make_config(world, tmp_path / "a", **kw))
    assert full[0]["kl_k1"] == 0.0 and full[1]["kl_k1"] == 0.0  # warmup, then the first policy step's rollout
    assert full[2]["kl_k1"] != 0.0 and full[2]["kl_k3"] > 0.0
    ppo.train(make_config(world, tmp_path / "b", stop_at_step=2, **kw))
    assert (tmp_path / "b" / "checkpoints" / "step-00000002" / "model" / "adapter_config.json").is_file()
    resumed = ppo.train(make_config(world, tmp_path / "b", **kw))
    assert len(resumed) == 1
    for k in ("rm_score", "kl_k1", "policy_loss", "value_loss", "ptx_loss", "kl_coef"):
        assert resumed[0][k] == full[-1][k], k
    sft, a, b = _weights(world / "policy"), _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert sorted(a) == sorted(sft) and all(torch.equal(a[k], b[k]) for k in a)
    changed = {k for k in a if not torch.equal(a[k], sft[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed)  # LoRA targets only; embeddings, norms same


def test_ptx_adds_the_lm_loss(world, tmp_path):
    """One policy step with and without PPO-ptx from the same seed: identical rollouts, a logged ptx loss, and
    different updated weights; the held-out LM loss is measured before and after."""
    off = ppo.train(make_config(world, tmp_path / "off", value_warmup_steps=0, max_steps=1))
    on = ppo.train(make_config(world, tmp_path / "on", value_warmup_steps=0, max_steps=1, ptx_coef=1.0))
    assert on[0]["rm_score"] == off[0]["rm_score"] and "ptx_loss" not in off[0]
    assert 3.0 < on[0]["ptx_loss"] < 8.0  # about log(1000) for a random 1000-token model
    a, b = _weights(tmp_path / "off" / "final"), _weights(tmp_path / "on" / "final")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "heldout_lm_loss" in r] == [0, 1]


@pytest.mark.slow
def test_two_ranks_give_the_same_steps_as_one_process(world, tmp_path):
    """`accelerate launch` with 2 gloo ranks vs 1 process, same config: each rank samples and scores half the prompts,
    and backpropagates half of each of the 2 mini batches; the gathered rollouts, every logged metric of a warmup
    step and two policy steps (with ptx and adaptive KL), and the final policy and value weights agree."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [str(repo / "align" / "ppo.py"), "--policy_path", str(world / "policy"), "--reward_path",
            str(world / "reward"), "--prompt_files", str(world / "prompts.jsonl"), "--pretrain_files",
            str(world / "pretrain.jsonl"), "--heldout_files", str(world / "heldout.jsonl"), "--ptx_seq_len", "32",
            "--heldout_rows", "4", "--rollout_batch_prompts", "4", "--max_new_tokens", "6", "--micro_batch_size", "2",
            "--num_mini_batches", "2", "--value_warmup_steps", "1", "--max_steps", "3", "--policy_lr", "1e-3",
            "--value_lr", "1e-3", "--ptx_coef", "0.5", "--ptx_rows", "2", "--kl_adaptive", "true", "--tax_every",
            "1", "--true_reward", "false"]
    subprocess.run([sys.executable, *args, "--output_dir", str(tmp_path / "one")], check=True, env=env, cwd=repo)
    subprocess.run([*accelerate_launch("multi_cpu", tmp_path), *args, "--output_dir", str(tmp_path / "two")],
                   check=True, env=env, cwd=repo)
    from common.metrics import read_jsonl

    one, two = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 1, 2, 3]
    skip = ("time_", "sync_share", "episodes_per_s")
    for a, b in zip(one, two):
        keys = [k for k in a if not k.startswith(skip)]
        assert keys == [k for k in b if not k.startswith(skip)]
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    assert "policy_loss" in one[-1] and "ptx_loss" in one[-1]
    for sub in ("final", "checkpoints/step-00000003/value"):
        wa, wb = _weights(tmp_path / "one" / sub), _weights(tmp_path / "two" / sub)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4, msg=k)


def test_reward_sequences_render_the_prompts_tools(small_tok, qwen_tok):
    """Tokenizers differ (re-tokenised path): a prompt with tools is rendered for the reward model with the same tool
    list the policy's prompt had (data.datasets.build_prompt_examples keeps it), and without them it differs."""
    from data.chatml import REWARD_TOKEN, special_id, tokenize_chat

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    msgs = [{"role": "user", "content": "Weather in Taipei?"}]
    reply = small_tok("It is sunny.", add_special_tokens=False)["input_ids"]
    got = experience.reward_sequences([[1]], [reply], [msgs], small_tok, qwen_tok, False, tools=[tools])
    want = tokenize_chat(qwen_tok, msgs, mask="none", add_generation_prompt=True, tools=tools).input_ids
    rid = special_id(qwen_tok, REWARD_TOKEN)
    assert got == [want + qwen_tok("It is sunny.", add_special_tokens=False)["input_ids"] + [rid]]
    plain = experience.reward_sequences([[1]], [reply], [msgs], small_tok, qwen_tok, False)
    assert plain != got and "get_weather" not in qwen_tok.decode(plain[0])


@pytest.mark.slow
def test_grpo_two_ranks_give_the_same_steps_as_one_process(world, tmp_path):
    """GRPO (KL as a k3 loss, Dr. GRPO's reduction, a reward function beside the reward model, ptx) with 2 gloo ranks
    vs 1 process: each rank samples and scores half of the prompts (whole groups: a rank's prompts keep their
    samples together), every rank computes the group advantages on the gathered batch; every logged metric of three
    steps and the final weights agree, and neither run writes a value model."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from common.metrics import read_jsonl

    (tmp_path / "rewards.py").write_text("def count_e(messages, reply):\n    return float(reply.count('e')) / 4\n")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [str(repo / "align" / "ppo.py"), "--policy_path", str(world / "policy"), "--reward_path",
            str(world / "reward"), "--prompt_files", str(world / "prompts.jsonl"), "--pretrain_files",
            str(world / "pretrain.jsonl"), "--heldout_files", str(world / "heldout.jsonl"), "--ptx_seq_len", "32",
            "--heldout_rows", "4", "--rollout_batch_prompts", "4", "--samples_per_prompt", "4", "--max_new_tokens",
            "6", "--micro_batch_size", "2", "--num_mini_batches", "2", "--max_steps", "3", "--policy_lr", "1e-3",
            "--ptx_coef", "0.5", "--ptx_rows", "2", "--tax_every", "1", "--true_reward", "false", "--advantage",
            "grpo", "--dr_grpo", "true", "--kl_in", "loss", "--reward_funcs", f"{tmp_path / 'rewards.py'}:count_e",
            "--reward_model_weight", "0.5", "--save_every", "2"]
    subprocess.run([sys.executable, *args, "--output_dir", str(tmp_path / "one")], check=True, env=env, cwd=repo)
    subprocess.run([*accelerate_launch("multi_cpu", tmp_path), *args, "--output_dir", str(tmp_path / "two")],
                   check=True, env=env, cwd=repo)
    one, two = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 1, 2, 3]
    skip = ("time_", "sync_share", "episodes_per_s")
    for a, b in zip(one, two):
        keys = [k for k in a if not k.startswith(skip)]
        assert keys == [k for k in b if not k.startswith(skip)]
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    assert {"policy_loss", "kl_loss", "ptx_loss", "rm_score", "score"} <= set(one[1]) and "value_loss" not in one[1]
    wa, wb = _weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4, msg=k)
    for d in ("one", "two"):
        assert not list((tmp_path / d / "checkpoints").glob("step-*/value"))
