"""The rollout interface shared by the vLLM engine and the built-in KV-cache engine (no vLLM import here).

A PPO iteration (Qwen report sec. 3.2.2) samples `n` responses per prompt with top-p, then recomputes every log-prob
it trains on with the policy itself; the engine's own log-probs are returned only to measure the engine-vs-trainer
gap (docs/PITFALLS.md#sampler-log-probs). Shape words: N = number of prompts x n rows, P_i / R_i the prompt /
response length of row i.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# Finish reasons, as vLLM names them.
STOP = "stop"  # the response ended with one of stop_token_ids (included in response_ids)
LENGTH = "length"  # the response reached max_tokens without a stop token


@dataclass
class SamplingParams:
    n: int = 2
    """Responses sampled per prompt (the recipe's two samples per prompt)."""
    temperature: float = 1.0
    """Logits are divided by this before top-p; 0 means greedy (argmax)."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to >= top_p (1.0 = off)."""
    max_tokens: int = 64
    """Most tokens generated per response, the stop token included."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Generation of a row ends after any of these ids (e.g. <|im_end|>, <|endoftext|>)."""
    seed: int | None = None
    """Seed of the sampling random stream; None draws fresh randomness."""

    def __post_init__(self):
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"SamplingParams: need n >= 1 and max_tokens >= 1, got n={self.n}, "
                             f"max_tokens={self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: need temperature >= 0 and 0 < top_p <= 1, got "
                             f"temperature={self.temperature}, top_p={self.top_p}")


@dataclass
class Rollout:
    """One row per sampled response; the n rows of one prompt are adjacent, prompts in input order."""

    prompt_index: list[int]  # (N,) index of the input prompt this row belongs to
    prompt_ids: list[list[int]]  # (N, P_i) ragged
    response_ids: list[list[int]]  # (N, R_i) ragged; includes the stop token when one was generated
    finish_reason: list[str]  # (N,) STOP ("stop") or LENGTH ("length")
    sampler_logprobs: list[list[float]]  # (N, R_i) engine log-prob of each sampled token (checking only)

    def __len__(self) -> int:
        return len(self.response_ids)

    def num_tokens(self) -> int:
        """Generated tokens over all rows (for tokens/s)."""
        return sum(len(r) for r in self.response_ids)


@runtime_checkable
class Engine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollout:
        """Sample params.n responses for each prompt (token ids, no padding)."""
        ...

    def sync_weights(self, model) -> float:
        """Push the training policy's current weights into the engine; return the seconds taken."""
        ...

    def greedy_check(self, model, prompts: list[list[int]], max_tokens: int = 8) -> dict:
        """Compare the engine's greedy tokens and log-probs with the policy's own; raise on a mismatch."""
        ...


def check_prompts(prompts: list[list[int]], vocab_size: int | None = None) -> None:
    """Raise naming the first bad prompt: empty, not a list of ints, or an id outside the vocabulary."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or not p:
            raise ValueError(f"prompt {i}: expected a non-empty list of token ids, got {type(p).__name__} {p!r:.60}")
        bad = [t for t in p if not isinstance(t, numbers.Integral) or t < 0
               or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise ValueError(f"prompt {i}: token ids must be ints in [0, {vocab_size}), got {bad[:5]}")
