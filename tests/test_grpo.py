"""Critic-free RL in align/ppo.py (`advantage: grpo | rloo | reinforce_pp`, align/rl.py) and reward functions:
no value model is loaded, the advantages of one step by hand, exact resume, a verifiable reward alone, and user
reward functions that fail stop the run in one line naming the function and the sample."""

from __future__ import annotations

import math
import textwrap
from types import SimpleNamespace

import pytest
import torch

import align.ppo as ppo
import align.rl as rl
from common.config import ConfigError
from test_ppo import _weights, make_config, world  # noqa: F401  (world: the tiny policy / reward / prompts fixture)

REWARDS = textwrap.dedent('''
    """Reward functions as a user writes them: f(messages, reply_text) -> float."""
    calls = []

    def short(messages, reply):
        return -len(reply) / 10.0

    def count_a(messages, reply):
        assert messages[-1]["role"] == "user"
        return float(reply.count("a"))

    def raising(messages, reply):
        raise ValueError("no score for this one")

    def nan(messages, reply):
        return float("nan")

    def text(messages, reply):
        return "high"

    def flag(messages, reply):
        return True
    ''')


@pytest.fixture(scope="module")
def rewards(tmp_path_factory):
    """A user's reward-function file; specs are 'path/to/rewards.py:function'."""
    path = tmp_path_factory.mktemp("funcs") / "rewards.py"
    path.write_text(REWARDS)
    return lambda name: f"{path}:{name}"


def test_config_errors(world, tmp_path, rewards):  # noqa: F811
    with pytest.raises(ConfigError, match="samples_per_prompt must be >= 2"):
        make_config(world, tmp_path, advantage="grpo", samples_per_prompt=1, micro_batch_size=2)
    make_config(world, tmp_path, advantage="reinforce_pp", samples_per_prompt=1, micro_batch_size=2)  # no groups
    with pytest.raises(ConfigError, match="advantage must be one of"):
        make_config(world, tmp_path, advantage="ppo")
    with pytest.raises(ConfigError, match="dr_grpo .* needs advantage grpo"):
        make_config(world, tmp_path, advantage="rloo", dr_grpo=True)
    with pytest.raises(ConfigError, match="dr_grpo .* loss_reduction sequence_mean_token_sum"):
        make_config(world, tmp_path, advantage="grpo", dr_grpo=True, loss_reduction="token_mean")
    with pytest.raises(ConfigError, match="trains no value model: remove value_path"):
        make_config(world, tmp_path, advantage="grpo", value_path=str(world / "reward"))
    with pytest.raises(ConfigError, match="no reward: give reward_path"):
        make_config(world, tmp_path, advantage="grpo", reward_path=None)
    with pytest.raises(ConfigError, match="initialises the value model from the reward model"):
        make_config(world, tmp_path, reward_path=None, reward_funcs=[rewards("short")])
    with pytest.raises(ConfigError, match="2 weights for 1 reward_funcs"):
        make_config(world, tmp_path, advantage="grpo", reward_funcs=[rewards("short")], reward_func_weights=[1, 2])
    with pytest.raises(ConfigError, match="loss_reduction must be one of"):
        make_config(world, tmp_path, loss_reduction="sum")
    assert rl.loss_reduction(make_config(world, tmp_path, advantage="grpo", dr_grpo=True)) == \
        "sequence_mean_token_sum"


def test_reward_function_specs(tmp_path, monkeypatch):
    """The demo's rule by its three names; a module in the working directory; errors name the spec."""
    from data.demo_reward import true_reward

    for spec in ("data.demo_reward:true_reward", "data.demo:true_reward", "data.demo_reward.true_reward"):
        assert rl.load_reward_func(spec) == (spec, true_reward)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards_cwd.py").write_text("def ok(messages, reply):\n    return 1.5\n")
    name, fn = rl.load_reward_func("my_rewards_cwd:ok")
    assert fn([{"role": "user", "content": "x"}], "y") == 1.5
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz' for 'no_such_module_xyz:f': "
                                          "ModuleNotFoundError"):
        rl.load_reward_func("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        rl.load_reward_func("my_rewards_cwd:nope")
    with pytest.raises(ConfigError, match="cannot import .*missing.py.*no file"):
        rl.load_reward_func(str(tmp_path / "missing.py") + ":f")
    (tmp_path / "broken_rewards.py").write_text("import math\nraise RuntimeError('broken at import')\n")
    with pytest.raises(ConfigError, match="cannot import .*RuntimeError: broken at import"):
        rl.load_reward_func(str(tmp_path / "broken_rewards.py") + ":f")
    with pytest.raises(ConfigError, match="is not 'module:function'"):
        rl.load_reward_func("justaname")


def test_reward_functions_weighted_sum_by_hand(rewards):
    """score = 0.5 x short + 2 x count_a: reply 'banana' (6 chars, 3 a's) -> 0.5 x -0.6 + 2 x 3 = 5.7; reply 'xy'
    -> 0.5 x -0.2 + 0 = -0.1. Per-function values are returned too."""
    funcs = [rl.load_reward_func(rewards("short")), rl.load_reward_func(rewards("count_a"))]
    msgs = [[{"role": "user", "content": "q"}]] * 2
    total, values = rl.call_reward_funcs(funcs, [0.5, 2.0], msgs, ["banana", "xy"], [0, 1])
    torch.testing.assert_close(total, torch.tensor([5.7, -0.1], dtype=torch.float64))
    assert values == {rewards("short"): [-0.6, -0.2], rewards("count_a"): [3.0, 0.0]}


@pytest.mark.parametrize("func, says", [
    ("raising", "raised ValueError: no score for this one"),
    ("nan", "returned nan, expected a finite float"),
    ("text", "returned str 'high', expected a float"),
    ("flag", "returned bool True, expected a float"),
])
def test_failing_reward_function_stops_the_run_in_one_line(world, tmp_path, rewards, capsys, func, says):  # noqa: F811
    """Through the entry point's main: exit status 2 and one line naming the function, the prompt (index and start
    of the user turn) and the reply; no checkpoint is written."""
    args = ["--policy_path", str(world / "policy"), "--reward_path", "null", "--prompt_files",
            str(world / "prompts.jsonl"), "--pretrain_files", "", "--heldout_files", "", "--ptx_coef", "0",
            "--advantage", "grpo", "--reward_funcs", f"{rewards('short')},{rewards(func)}", "--rollout_batch_prompts",
            "4", "--max_new_tokens", "4", "--micro_batch_size", "4", "--max_steps", "2", "--true_reward", "false",
            "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        ppo.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err  # progress bars, then the one line
    line = err.rstrip("\n").split("\n")[-1]
    assert "Traceback" not in err and err.count("config error") == 1 and err.endswith(line + "\n"), err[-2000:]
    assert line.startswith(f"config error: reward function {rewards(func)} on prompt ")
    assert "('Tell me about " in line and ", reply '" in line and line.endswith(says)
    assert not (tmp_path / "out" / "checkpoints").exists() or not any((tmp_path / "out" / "checkpoints").iterdir())


def test_missing_reward_module_is_a_config_error_before_any_model_loads(world, tmp_path, monkeypatch):  # noqa: F811
    import model.heads

    monkeypatch.setattr(model.heads, "load_scalar_head", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_abc'"):
        ppo.train(make_config(world, tmp_path, advantage="grpo", reward_funcs=["no_such_module_abc:f"]))


def _count_scalar_heads(monkeypatch) -> list[str]:
    """Wrap model.heads.load_scalar_head (align/ppo.py imports it at call time) to record every folder loaded."""
    import model.heads

    loaded, real = [], model.heads.load_scalar_head
    monkeypatch.setattr(model.heads, "load_scalar_head", lambda path, *a, **k: loaded.append(str(path)) or
                        real(path, *a, **k))
    return loaded


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_runs_load_no_value_model(world, tmp_path, rewards, monkeypatch, advantage):  # noqa: F811
    """Reward functions only: no scalar-head model is loaded at all (no reward model, no value model), no value
    optimizer state and no value folder in the checkpoint, no value loss; the policy trains from step 1 although
    value_warmup_steps is 1 (no warmup without a value model)."""
    loaded = _count_scalar_heads(monkeypatch)
    c = make_config(world, tmp_path, advantage=advantage, reward_path=None, reward_funcs=[rewards("short")],
                    value_warmup_steps=1, max_steps=2, save_every=1)
    hist = ppo.train(c)
    assert loaded == []
    assert all("value_loss" not in h and "values_mean" not in h and "rm_score" not in h for h in hist)
    assert all("policy_loss" in h and h["value_warmup"] == 0.0 for h in hist)
    assert hist[0]["reward/" + rewards("short")] == pytest.approx(hist[0]["score"])
    ckpt = tmp_path / "checkpoints" / "step-00000002"
    assert (ckpt / "model").is_dir() and not (ckpt / "value").exists()
    from common.checkpoint import load_checkpoint_state

    assert set(load_checkpoint_state(ckpt)["optimizer"]) == {"policy"}
    before, after = _weights(world / "policy"), _weights(tmp_path / "final")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the policy moved at step 1


def test_grpo_with_reward_model_loads_only_the_reward_model(world, tmp_path, rewards, monkeypatch):  # noqa: F811
    """GRPO beside the reward model: the reward folder is loaded once, no value model (not from the RM either);
    the total score is reward_model_weight x rm_score + the weighted functions, logged per part."""
    loaded = _count_scalar_heads(monkeypatch)
    hist = ppo.train(make_config(world, tmp_path, advantage="grpo", reward_funcs=[rewards("short")],
                                 reward_func_weights=[2.0], reward_model_weight=0.5, max_steps=1))
    assert loaded == [str(world / "reward")]
    h = hist[0]
    assert h["score"] == pytest.approx(0.5 * h["rm_score"] + 2.0 * h["reward/" + rewards("short")], rel=1e-5)


@pytest.mark.parametrize("kw", [dict(advantage="grpo", kl_in="loss"),
                                dict(advantage="grpo", dr_grpo=True, kl_adaptive=True),
                                dict(advantage="rloo", ptx_coef=0.5),
                                dict(advantage="reinforce_pp", kl_in="reward", reward_norm_std=True)],
                         ids=["grpo-kl-loss", "dr-grpo", "rloo-ptx", "reinforce_pp"])
def test_critic_free_resume_gives_the_same_next_step(world, tmp_path, rewards, kw):  # noqa: F811
    """Stop after step 2 and resume: step 3 equals the uninterrupted run's, and so do the final weights."""
    kw = dict(max_steps=3, reward_funcs=[rewards("count_a")], **kw)
    full = ppo.train(make_config(world, tmp_path / "a", **kw))
    ppo.train(make_config(world, tmp_path / "b", stop_at_step=2, **kw))
    resumed = ppo.train(make_config(world, tmp_path / "b", **kw))
    assert len(resumed) == 1
    keys = [k for k in full[-1] if not k.startswith(("time_", "sync_share", "episodes_per_s"))]
    assert "policy_loss" in keys and ("kl_loss" in keys) == (kw.get("kl_in") == "loss")
    for k in keys:
        assert resumed[0][k] == full[-1][k], k
    a, b = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _case():
    """4 replies, 2 prompts x G = 2; R = 3. The KL and the padding hold 9s where the mask is 0 (must not count)."""
    score = torch.tensor([1.0, 0.0, 2.0, 2.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.5, 0.5, 9.0], [0.1, 0.2, 0.3], [1.0, 9.0, 9.0], [0.0, 0.0, 9.0]])
    has_eos = torch.tensor([True, False, True, True])
    return score, kl, mask, has_eos


def _c(**kw):
    return SimpleNamespace(**(dict(advantage="grpo", kl_in="reward", eos_missing_penalty=1.0, samples_per_prompt=2,
                                   dr_grpo=False, gamma=1.0, lam=0.95, whiten_advantages=True) | kw))


def test_advantage_switch_by_hand():
    """KL in the reward (coef 0.1): sequence scores = score - eos penalty - 0.1 x summed KL:
    [1 - 0.1 x 1.0, 0 - 1 - 0.1 x 0.6, 2 - 0.1 x 1.0, 2 - 0] = [0.9, -1.06, 1.9, 2.0].
    rloo: s_i minus the other reply of its prompt: [1.96, -1.96, -0.1, 0.1]. grpo: a pair is
    +-(d / 2) / (|d| / sqrt 2 + eps) (unbiased std, eps 1e-6), about +-1/sqrt 2. Dr. GRPO: minus the group mean only: [0.98, -0.98,
    -0.05, 0.05]. Each on every real token of its reply, 0 on padding; no returns (no value model)."""
    score, kl, mask, eos = _case()
    for c, want in [(_c(advantage="rloo"), [1.96, -1.96, -0.1, 0.1]),
                    (_c(), [0.98 / (0.98 * math.sqrt(2) + 1e-6), -0.98 / (0.98 * math.sqrt(2) + 1e-6),
                            -0.05 / (0.05 * math.sqrt(2) + 1e-6), 0.05 / (0.05 * math.sqrt(2) + 1e-6)]),
                    (_c(dr_grpo=True), [0.98, -0.98, -0.05, 0.05]),
                    (_c(advantage="rloo", kl_in="loss"), [2.0, -2.0, 0.0, 0.0])]:  # the KL goes to the loss
        adv, returns = rl.advantages(c, score, kl, mask, 0.1, eos, None)
        assert returns is None
        torch.testing.assert_close(adv, torch.tensor(want)[:, None] * mask, atol=2e-6, rtol=0)


def test_reinforce_pp_switch_by_hand():
    """REINFORCE++ with the KL in the loss: token rewards only at each reply's last token (score - eos penalty):
    returns (gamma 1) [1, 1 | -1, -1, -1 | 2 | 2, 2]; normalised over these 8 tokens: mean 5/8, population
    variance 17/8 - 25/64 = 1.734375, std 1.3169567 -> 1 -> 0.2847474, -1 -> -1.2339055, 2 -> 1.0440738.
    With the KL in the reward (coef 0.1) the returns carry -0.1 x the remaining KL: row 0 [1 - 0.1, 1 - 0.05]..."""
    score, kl, mask, eos = _case()
    adv, returns = rl.advantages(_c(advantage="reinforce_pp", kl_in="loss"), score, kl, mask, 0.1, eos, None)
    a, b, d = 0.2847474, -1.2339055, 1.0440738
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 0], [-1, -1, -1], [2, 0, 0], [2, 2, 0]]))
    torch.testing.assert_close(adv, torch.tensor([[a, a, 0], [b, b, b], [d, 0, 0], [d, d, 0]]), atol=1e-6, rtol=0)
    _, returns = rl.advantages(_c(advantage="reinforce_pp"), score, kl, mask, 0.1, eos, None)
    torch.testing.assert_close(returns[0], torch.tensor([0.9, 0.95, 0.0]))
    torch.testing.assert_close(returns[1], torch.tensor([-1.06, -1.05, -1.03]))


def test_context_extension_policy_is_refused(world, tmp_path, small_tok):  # noqa: F811
    """A policy whose dynamic NTK would act on the rollouts' lengths is refused (the sampler, the trained policy and
    the reference would differ); one whose rollouts stay within the training length runs."""
    import json
    import shutil

    shutil.copytree(world / "policy", tmp_path / "ntk")
    cfg = json.loads((tmp_path / "ntk" / "config.json").read_text())
    (tmp_path / "ntk" / "config.json").write_text(json.dumps(cfg | {"use_dynamic_ntk": True, "rope_train_len": 64}))
    with pytest.raises(ConfigError, match="dynamic NTK .* up to 262 tokens .* <= 64"):
        rl.check_policy_context(str(tmp_path / "ntk"), 262)
    rl.check_policy_context(str(tmp_path / "ntk"), 64)
    (tmp_path / "ntk" / "config.json").write_text(json.dumps(cfg | {"layer_windows": [16, None]}))
    with pytest.raises(ConfigError, match="layer windows \\(shortest 16 tokens\\)"):
        ppo.train(make_config(world, tmp_path / "out", policy_path=str(tmp_path / "ntk")))


def test_demo_pipeline_commands_parse(tmp_path):
    """Every trainer stage of `make demo` (align/pipeline.py) parses into a valid config of its entry point, the
    GRPO stage as a critic-free run on the verifiable reward alone, and the evaluation compares six policies."""
    import importlib
    from pathlib import Path

    from align.pipeline import stages
    from common.config import parse_config

    classes = {"align/sft.py": ("align.sft", "SFTConfig"), "reward/train.py": ("reward.train", "RewardConfig"),
               "align/ppo.py": ("align.ppo", "PPOConfig"), "align/dpo.py": ("align.dpo", "DPOConfig"),
               "align/kto.py": ("align.kto", "KTOConfig")}
    parsed = {}
    for name, cmd, done in stages(tmp_path, "builtin"):
        if cmd[1] in classes:
            module, cls = classes[cmd[1]]
            parsed[name] = parse_config(getattr(importlib.import_module(module), cls), cmd[2:])
            assert Path(parsed[name].output_dir) == done.parent, name
    assert {"ppo", "ppo without ptx", "dpo", "kto", "grpo"} <= set(parsed)
    g = parsed["grpo"]
    assert (g.advantage, g.reward_path, g.reward_funcs, g.kl_in, g.samples_per_prompt) == \
        ("grpo", None, ["data.demo_reward:true_reward"], "loss", 4)
    assert parsed["ppo"].advantage == "gae" and parsed["ppo without ptx"].ptx_coef == 0
    evaluate = dict((n, c) for n, c, _ in stages(tmp_path, "builtin"))["evaluate"]
    assert [evaluate[i + 1].split("=")[0] for i, x in enumerate(evaluate) if x == "--policy"] == \
        ["SFT", "PPO", "PPO without ptx", "DPO", "KTO", "GRPO"]
