"""The RL loop's pieces that are not PPO-specific (align/ppo.py is the entry point): reward functions, the total
score, the advantage switch (gae | grpo | rloo | reinforce_pp), the named loss reduction, and start-up checks on the
policy. Not an entry point.

Shapes: N responses = prompts x G (G = samples_per_prompt, rows of one prompt adjacent), R response length.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import numbers
import os
import sys
from pathlib import Path

import torch

from align.experience import reward_sequences
from align.ppo_losses import (ADVANTAGES, REDUCTIONS, gae, grpo_advantages, reinforce_pp_advantages, rloo_advantages,
                              sequence_mean_token_sum, shape_rewards, token_mean, whiten)
from common.config import ConfigError

CRITIC_FREE = ("grpo", "rloo", "reinforce_pp")


# ---------------------------------------------------------------------------------------------- reward functions
class RewardFunctionError(ConfigError):
    """A user reward function failed on a sample (raised, or returned something that is not a finite number); the
    message names the function, the prompt and the reply. A ConfigError, so common.run.run_main prints it as one
    line and exits with status 2: the fix is in the function the config names."""


def load_reward_func(spec: str):
    """'module:function' (a module importable from the working directory or the package), 'path/to/file.py:function',
    or 'module.function' -> (name, callable). Every failure is a ConfigError naming `spec`."""
    where, sep, name = spec.rpartition(":") if ":" in spec else spec.rpartition(".")
    if not where or not name:
        raise ConfigError(f"reward_funcs: {spec!r} is not 'module:function' (e.g. data.demo_reward:true_reward)")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            module_spec = importlib.util.spec_from_file_location(f"reward_funcs_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # `python align/ppo.py` puts align/ first, not the working directory
                sys.path.append(os.getcwd())
            module = importlib.import_module(where)
    except Exception as e:  # noqa: BLE001  (any import-time failure of user code is reported the same way)
        raise ConfigError(f"reward_funcs: cannot import {where!r} for {spec!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward_funcs: {where!r} has no function {name!r} ({spec!r})")
    return spec, fn


def excerpt(text: str, n: int = 60) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= n else text[:n] + "...")


def call_reward_funcs(funcs: list, weights: list[float], messages: list, replies: list[str],
                      prompt_index: list[int]) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """Each function on every (messages, reply): -> (weighted sum (n,) float64, {name: values}). A function that
    raises, or returns a bool or anything but a finite real number, stops the run with a RewardFunctionError naming
    the function, the prompt (its index among the loaded prompts, and the start of its last user turn) and the
    reply."""
    total = torch.zeros(len(replies), dtype=torch.float64)
    values: dict[str, list[float]] = {}
    for (name, fn), w in zip(funcs, weights):
        out = []
        for msgs, reply, i in zip(messages, replies, prompt_index):
            def where() -> str:
                user = next((m.get("content") for m in reversed(msgs) if m.get("role") == "user"), "")
                return f"reward function {name} on prompt {i} ({excerpt(user)}), reply {excerpt(reply)}"
            try:
                v = fn(msgs, reply)
            except Exception as e:  # noqa: BLE001  (user code: report which sample broke it)
                raise RewardFunctionError(f"{where()}: raised {type(e).__name__}: {e}") from None
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise RewardFunctionError(f"{where()}: returned {type(v).__name__} {v!r}, expected a float")
            if not math.isfinite(float(v)):
                raise RewardFunctionError(f"{where()}: returned {float(v)}, expected a finite float")
            out.append(float(v))
        values[name] = out
        total += w * torch.tensor(out, dtype=torch.float64)
    return total, values


# ---------------------------------------------------------------------------------------------- scores
def total_score(c, funcs: list, rm_score: torch.Tensor, messages: list, replies: list[str],
                prompt_index: list[int]) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """Phase 2: reward_model_weight x the reward model's raw score (n,) (zeros without one) + the weighted reward
    functions -> (score (n,) float32, {function: values}). Without functions and with weight 1 the score is the
    reward model's, bit for bit."""
    if not funcs:
        return (rm_score if c.reward_model_weight == 1.0 else c.reward_model_weight * rm_score), {}
    weights = c.reward_func_weights or [1.0] * len(funcs)
    total, values = call_reward_funcs(funcs, weights, messages, replies, prompt_index)
    return (c.reward_model_weight * rm_score.double() + total).float(), values


def reward_model_scores(run, ro, messages: list, tools: list) -> torch.Tensor:
    """Phase 2: the reward model's raw score (n,) at <|reward|> of each prompt + response (zeros without one)."""
    from reward.model import pad_sequences, score

    if run.reward is None:
        return torch.zeros(len(ro.response_ids))
    dev, mb = run.acc.device, run.c.micro_batch_size
    seqs = reward_sequences(ro.prompt_ids, ro.response_ids, messages, run.tok, run.rtok, run.same_tokenizer, tools)
    scores = []
    for s in range(0, len(seqs), mb):
        ids, att = pad_sequences(seqs[s:s + mb], run.reward_pad_id)  # (n, T')
        scores.append(score(run.reward, ids.to(dev), att.to(dev), run.reward_id))
    return torch.cat(scores).float().cpu()  # (n,)


def response_values(value_model, batch: dict) -> torch.Tensor:
    """V(state before response token r) (N, R) from the value model's per-position head."""
    return value_model(batch["input_ids"], attention_mask=batch["attention_mask"]).gather(1, batch["pos"]) \
        * batch["mask"]


class OptimizerPair:
    """Policy and value optimizers saved and restored as one checkpoint entry (value None: critic-free)."""

    def __init__(self, policy, value):
        self.policy, self.value = policy, value

    def state_dict(self):
        return {"policy": self.policy.state_dict()} | ({} if self.value is None else {"value": self.value.state_dict()})

    def load_state_dict(self, state):
        self.policy.load_state_dict(state["policy"])
        if self.value is not None:
            self.value.load_state_dict(state["value"])

    @property
    def param_groups(self):  # what the NaN guard checks after a step
        return self.policy.param_groups + ([] if self.value is None else self.value.param_groups)


# ---------------------------------------------------------------------------------------------- advantages
def reduction(name: str, n_sequences: int, n_tokens: float, max_new_tokens: int):
    """The named loss aggregation over a mini batch as `reduce(x, mask, total)` plus the `total` to pass it: the
    mini batch's token count (token_mean) or response count (the sequence reductions), so shards add up."""
    if name == "token_mean":
        return token_mean, n_tokens
    if name == "sequence_mean_token_sum":
        return functools.partial(sequence_mean_token_sum, scale=float(max_new_tokens)), n_sequences
    return REDUCTIONS[name], n_sequences


def loss_reduction(c) -> str:
    return c.loss_reduction or ("sequence_mean_token_sum" if c.dr_grpo else "token_mean")


def advantages(c, norm_score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
               has_eos: torch.Tensor, values: torch.Tensor | None):
    """Phase 4 for every estimator -> (advantages (N, R), returns (N, R) or None).

    norm_score (N,) the normalised total score; kl (N, R) the per-token KL estimate (kl_estimator) that goes into the
    reward when kl_in is 'reward' (with 'loss' it goes into the loss instead: the reward has none); has_eos (N,).
      gae: KL-shaped token rewards, GAE with the value model, whitened (today's PPO);
      reinforce_pp: KL-shaped token rewards, discounted returns normalised over the whole batch;
      grpo / rloo: one scalar per response (score - eos penalty - kl_coef x summed KL), group-normalised (grpo,
      without the std under dr_grpo) or minus the leave-one-out mean (rloo), on every token of the response."""
    coef = kl_coef if c.kl_in == "reward" else 0.0
    if c.advantage in ("gae", "reinforce_pp"):
        rewards = shape_rewards(norm_score, kl, mask, coef, has_eos, c.eos_missing_penalty)  # (N, R)
        if c.advantage == "reinforce_pp":
            return reinforce_pp_advantages(rewards, mask, c.gamma)
        adv, returns = gae(rewards, values, mask, c.gamma, c.lam)
        return (whiten(adv, mask) if c.whiten_advantages else adv), returns
    seq = norm_score - c.eos_missing_penalty * (~has_eos.bool()).to(norm_score.dtype) \
        - coef * (kl * mask).sum(-1)  # (N,)
    G = c.samples_per_prompt
    a = grpo_advantages(seq, G, scale=not c.dr_grpo) if c.advantage == "grpo" else rloo_advantages(seq, G)
    return a[:, None].to(mask.dtype) * mask, None


# ---------------------------------------------------------------------------------------------- start-up checks
def check_estimator(c) -> None:
    """PPOConfig.validate's checks of the advantage, KL placement, loss reduction and reward fields."""
    for name, allowed in (("advantage", ADVANTAGES), ("kl_in", ("reward", "loss")),
                          ("loss_reduction", (None, *REDUCTIONS))):
        if getattr(c, name) not in allowed:
            raise ConfigError(f"{name} must be one of {list(allowed)}, got {getattr(c, name)!r}")
    if c.advantage in ("grpo", "rloo") and c.samples_per_prompt < 2:
        raise ConfigError(f"advantage {c.advantage} compares the replies to one prompt: samples_per_prompt must be "
                          f">= 2, got {c.samples_per_prompt}")
    if c.dr_grpo and (c.advantage != "grpo" or loss_reduction(c) != "sequence_mean_token_sum"):
        raise ConfigError(f"dr_grpo is a grpo variant without per-length normalisation: it needs advantage grpo and "
                          f"loss_reduction sequence_mean_token_sum (or unset), got {c.advantage}, {c.loss_reduction}")
    if c.advantage in CRITIC_FREE and c.value_path is not None:
        raise ConfigError(f"advantage {c.advantage} trains no value model: remove value_path ({c.value_path}), or "
                          f"use advantage gae")
    if c.advantage == "gae" and c.reward_path is None and c.value_path is None:
        raise ConfigError("advantage gae initialises the value model from the reward model: give reward_path (or "
                          "value_path), or use a critic-free advantage (grpo, rloo, reinforce_pp)")
    if c.reward_path is None and not c.reward_funcs:
        raise ConfigError("no reward: give reward_path (a reward model) and/or reward_funcs (module:function)")
    if c.reward_func_weights and len(c.reward_func_weights) != len(c.reward_funcs):
        raise ConfigError(f"reward_func_weights has {len(c.reward_func_weights)} weights for {len(c.reward_funcs)} "
                          f"reward_funcs; give one per function (or none: 1.0 each)")


def describe_score(c, has_reward_model: bool, funcs: list) -> str:
    """'1 x reward model + 1 x data.demo_reward:true_reward' for the start-up line."""
    weights = c.reward_func_weights or [1.0] * len(funcs)
    return " + ".join(([f"{c.reward_model_weight:g} x reward model"] if has_reward_model else [])
                      + [f"{w:g} x {name}" for (name, _), w in zip(funcs, weights)])


def check_policy_context(policy_path: str, max_len: int) -> None:
    """Refuse a policy whose sec. 2.5 context extension (dynamic NTK, LogN, layer windows: eval-only by default)
    would act on the rollouts' lengths: the sampler (dynamic NTK factor of the prompt), the trained policy (training
    mode: off) and the reference (eval mode: factor of the whole sequence) would be three different models, and the
    KL would not be 0 at step 0."""
    import json

    from model.checkpoint import config_from_hf

    cfg = config_from_hf(json.loads((Path(policy_path) / "config.json").read_text()), source=str(policy_path))
    on = []  # (what, the length from which it acts)
    if cfg.use_dynamic_ntk:
        on.append((f"dynamic NTK (training length {cfg.train_len})", cfg.train_len))
    if cfg.use_logn_attn and not cfg.extend_context_in_training:
        on.append((f"LogN attention (training length {cfg.train_len})", cfg.train_len))
    windows = [w for w in (cfg.layer_windows or []) if w is not None]
    if windows and not cfg.extend_context_in_training:
        on.append((f"layer windows (shortest {min(windows)} tokens)", min(windows)))
    on = [(what, n) for what, n in on if max_len > n]
    if on:
        raise ConfigError(f"policy_path {policy_path}: {', '.join(w for w, _ in on)} would act on rollouts of up to "
                          f"{max_len} tokens (max_prompt_len + max_new_tokens), so the sampler, the trained policy "
                          f"and the reference would compute three different models (the KL would not start at 0). "
                          f"Keep max_prompt_len + max_new_tokens <= {min(n for _, n in on)}, or turn them off in "
                          f"the policy's config.json for RL")
