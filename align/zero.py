"""The RL loop's models under DeepSpeed ZeRO-2 / ZeRO-3 (align/ppo.py; docs/DESIGN.md "PPO under DeepSpeed").
Not an entry point.

- The policy and the value model are each trained by their own DeepSpeed engine (accelerate's `prepare`, once per
  model): the stage, clipping and sharding come from the accelerate config. The ranks' gradients are reduced by the
  engines; `sum_gradients` (common/loop.py) remains only for plain data parallel.
- Under ZeRO-3 the reference and the reward model are ZeRO-3 inference engines (sharded, no optimizer, no
  gradients); under ZeRO-2 they stay whole on every rank (nothing to train, so nothing for ZeRO-2 to shard).
- Under ZeRO-3 a parameter is only whole inside the forward of an engine (DeepSpeed gathers a module's weights in
  its forward hook, and a weight read by another module, such as the output layer read by the fused log-prob
  kernel, only while some engine forward is running). So every computation on the policy goes through
  `Models.policy_call(fn, *args)`: `fn(policy, *args)` run as the forward of a `ModelCall` module wrapped by the
  engine. Every rank must make the same calls in the same order (each forward gathers weights collectively).
- The engines accumulate gradients over any number of `backward` calls and apply them at `step` (DeepSpeed's
  `managed_gradient_accumulation: false`), so a PPO mini batch may take micro batches plus a PPO-ptx batch. Losses
  are already divided by the whole mini batch's token count; DeepSpeed averages the ranks' gradients, so each
  backward multiplies by the number of ranks to make that average the one-process sum.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from common.config import ConfigError


class ModelCall(torch.nn.Module):
    """A module whose forward is `fn(model, *args, **kwargs)`: lets any function of the model (log-probs through
    the decoder and the output layer, the LM loss, a LoRA-disabled reference pass) run inside a DeepSpeed engine's
    forward, where ZeRO-3 gathers the weights it reads."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        out = fn(self.model, *args, **kwargs)
        # DeepSpeed's ZeRO-3 hook reads a module's output as a tensor, a list/tuple, a dict or an object: not a float
        return torch.tensor(out, dtype=torch.float64) if isinstance(out, (int, float)) else out


def is_deepspeed(acc) -> bool:
    return acc.distributed_type.value == "DEEPSPEED"


def zero_stage(acc) -> int:
    """The ZeRO stage of the accelerate config (0 without DeepSpeed)."""
    if not is_deepspeed(acc):
        return 0
    return int(acc.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])


def check_deepspeed(acc, grad_clip: float) -> None:
    """Start-up checks of a DeepSpeed launch: ZeRO-2 or ZeRO-3, and the config's gradient clipping equal to the run
    config's (DeepSpeed clips; a silent difference would change every step)."""
    if not is_deepspeed(acc):
        return
    cfg = acc.state.deepspeed_plugin.deepspeed_config
    stage = zero_stage(acc)
    if stage not in (2, 3):
        raise ConfigError(f"align/ppo.py under DeepSpeed needs ZeRO stage 2 or 3 (configs/accelerate/zero2.yaml, "
                          f"zero3.yaml), got stage {stage}")
    ds_clip = float(cfg.get("gradient_clipping", 0.0) or 0.0)
    if ds_clip != float(grad_clip):
        raise ConfigError(f"the DeepSpeed config clips gradients at {ds_clip:g} but the run config's grad_clip is "
                          f"{grad_clip:g}; DeepSpeed does the clipping, so make them equal (gradient_clipping in the "
                          f"accelerate config, or --grad_clip {ds_clip:g})")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ConfigError(f"the DeepSpeed config has an '{key}' section; align/ppo.py builds its own AdamW per "
                              f"model (policy_lr, value_lr): remove it")
    cfg["managed_gradient_accumulation"] = False  # every step() applies the backwards since the last one


@dataclass
class Models:
    """How the loop reaches its models. Without DeepSpeed every engine is None and calls are plain calls."""
    policy_engine: object = None  # DeepSpeedEngine over ModelCall(policy)
    value_engine: object = None  # DeepSpeedEngine over the value model (callable like it)
    ref_engine: object = None  # ZeRO-3 only: inference engine over ModelCall(ref)
    world: int = 1

    @property
    def deepspeed(self) -> bool:
        return self.policy_engine is not None

    def trained(self) -> dict | None:
        """{tag: engine} of the trained engines, for the checkpoint's deepspeed/<tag>/ shards (None: no DeepSpeed)."""
        if not self.deepspeed:
            return None
        return {"policy": self.policy_engine} | ({} if self.value_engine is None else {"value": self.value_engine})


def prepare_models(acc, zero: Models, policy, opt_policy, value, opt_value, ref, reward):
    """The trained models as DeepSpeed engines (the policy behind ModelCall), and under ZeRO-3 the frozen ones as
    inference engines. Returns (opt_policy, value, opt_value, reward): the value and reward engines are called like
    the models they wrap (their forward is the model's); the reference is reached through zero.ref_engine."""
    zero.policy_engine, opt_policy = prepare_trained(acc, policy, opt_policy, wrap=True)
    if value is not None:
        value, opt_value = prepare_trained(acc, value, opt_value, wrap=False)
        zero.value_engine = value
    if zero_stage(acc) == 3:
        if ref is not None:
            zero.ref_engine = prepare_frozen(acc, ref, wrap=True)
        if reward is not None:
            reward = prepare_frozen(acc, reward, wrap=False)
    return opt_policy, value, opt_value, reward


def prepare_trained(acc, model, optimizer, wrap: bool):
    """One DeepSpeed engine (accelerate's prepare; each call makes a new engine) -> (engine, optimizer)."""
    engine, opt = acc.prepare(ModelCall(model) if wrap else model, optimizer)
    return engine, opt


def prepare_frozen(acc, model, wrap: bool):
    """A ZeRO-3 inference engine (no optimizer): the model's weights sharded over the ranks, gathered one module at
    a time in its forward (as TRL and OpenRLHF prepare their reference and reward models)."""
    import deepspeed

    cfg = copy.deepcopy(acc.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler", "managed_gradient_accumulation"):
        cfg.pop(key, None)
    cfg["zero_optimization"] = {k: v for k, v in cfg["zero_optimization"].items() if not k.startswith("offload_opt")}
    engine, *_ = deepspeed.initialize(model=ModelCall(model) if wrap else model, config=cfg)
    engine.eval()
    return engine


def backward(engine, loss: torch.Tensor, world: int) -> None:
    """One more backward into `engine`'s gradients (applied at its next step). The loss is this rank's share of a
    mini-batch loss already divided by the whole mini batch's count: DeepSpeed averages the ranks' gradients, so x
    world makes the average the sum, i.e. one process's gradient."""
    engine.backward(loss * world, scale_wrt_gas=False)


def step(engine) -> float:
    """Reduce, clip (the config's gradient_clipping), update; returns the gradient norm before clipping."""
    engine.step()
    return float(engine.get_global_grad_norm())


def engine_module(engine):
    """The model an engine trains (unwrapping ModelCall)."""
    m = engine.module
    return m.model if isinstance(m, ModelCall) else m
