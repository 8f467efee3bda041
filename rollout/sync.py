"""Weight sync helpers and the greedy check that makes every sync verifiable (docs/PITFALLS.md: #weight-sync,
#tied-output-layer, #lora-in-the-sync).

- `full_state_dict(model)`: the policy's weights under Hugging Face Qwen2 / Qwen3 names, ALWAYS with `lm_head.weight`
  (a tied output layer left out stays stale inside vLLM on CPU, with only a log warning), LoRA merged into the base
  weights.
- `run_with_timeout(fn, timeout_s, what)`: a sync that hangs raises `SyncTimeout` instead of blocking the trainer.
- `verify_greedy(model, prompts, rollout)`: the engine's greedy tokens and log-probs against the policy's own, on one
  teacher-forced forward; raises `GreedyMismatch` naming the first differing prompt and position.
- `load_buckets(target, model, bucket_bytes)`: the weights of a DeepSpeed ZeRO-3 model (each rank holds a shard of
  every weight) copied into a plain model one size-capped bucket at a time (common.gather.sharded_buckets: LoRA merged
  per layer inside that one gather, never the whole model and never a gather nested in another;
  docs/PITFALLS.md#lora-in-the-sync).
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch

from common.gather import DEFAULT_BUCKET_BYTES, hf_name, sharded_buckets, unwrap
from rollout.base import Rollout


class SyncTimeout(TimeoutError):
    """A weight sync did not finish in time; the engine's weights are in an unknown state. `thread` is the sync
    still running in the background (join it before trusting the engine again)."""

    def __init__(self, message: str, thread: threading.Thread | None = None):
        super().__init__(message)
        self.thread = thread


class GreedyMismatch(AssertionError):
    """The engine's greedy output differs from the policy's: the engine does not hold the policy's weights."""


def full_state_dict(model, clone: bool = False) -> dict[str, torch.Tensor]:
    """Every weight vLLM's Qwen2 / Qwen3 loader knows (Qwen3: q_norm / k_norm too), detached, `lm_head.weight`
    included even when tied (docs/PITFALLS.md#tied-output-layer).

    Call inside `merged_lora(model)` for a peft model, so the adapter is folded into the base weights
    (docs/PITFALLS.md#lora-in-the-sync).
    clone=True copies the tensors, so the caller may change the model while the copy is being sent.
    """
    base = unwrap(model)
    sd = {}
    for k, v in base.state_dict().items():
        name = hf_name(k)
        if name is not None:
            sd[name] = v.detach().clone() if clone else v.detach()
    if "lm_head.weight" not in sd:
        emb = sd.get("model.embed_tokens.weight")
        if emb is None:
            raise KeyError(f"policy state dict has neither lm_head.weight nor model.embed_tokens.weight "
                           f"(keys: {sorted(sd)[:5]} ...)")
        sd["lm_head.weight"] = emb  # tied: the output layer IS the embedding, and vLLM must be told so
    return sd


@contextlib.contextmanager
def merged_lora(model):
    """Fold the LoRA adapter into the base weights for the duration of the block, then unfold it (peft
    merge_adapter / unmerge_adapter). A model without an adapter passes through unchanged."""
    inner = getattr(model, "module", model)
    if not hasattr(inner, "merge_adapter"):
        yield model
        return
    with torch.no_grad():
        inner.merge_adapter()
    try:
        yield model
    finally:
        with torch.no_grad():
            inner.unmerge_adapter()


def run_with_timeout(fn, timeout_s: float, what: str) -> float:
    """Run fn() in a daemon thread; return its seconds, raise SyncTimeout if it is still running after timeout_s
    (a hung collective must not hang the trainer: docs/PITFALLS.md#weight-sync), re-raise its error otherwise."""
    box = {}

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    t0 = time.perf_counter()
    thread = threading.Thread(target=target, name=what, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise SyncTimeout(f"{what} did not finish within {timeout_s:g} s; the engine's weights are now in an unknown "
                          "state (raise sync_timeout_s if the model is large, or check the engine's log)", thread)
    if "error" in box:
        raise RuntimeError(f"{what} failed: {box['error']!r}") from box["error"]
    return time.perf_counter() - t0


@torch.no_grad()
def policy_logprobs(model, prompts: list[list[int]], responses: list[list[int]]):
    """Teacher-forced log-softmax of the policy over each response (temperature 1, no truncation).

    Returns per row (R_i,) tensors: log-prob of the given token, the best log-prob, and the argmax token.
    Left padding with position ids from the mask, so it works for the custom model and transformers' Qwen2.
    """
    base = unwrap(model)
    dev = next(base.parameters()).device
    seqs = [p + r for p, r in zip(prompts, responses)]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long, device=dev)  # (B, T)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, device=dev)
        mask[i, T - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    # Dynamic NTK (custom model): the rotary factor the sampler fixed at prefill, from the prompt's length.
    kw = {"ntk_lengths": torch.tensor([len(p) for p in prompts], device=dev)} \
        if getattr(base.config, "use_dynamic_ntk", False) else {}
    was_training = base.training
    base.eval()
    try:
        out = base.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, **kw)
    finally:
        base.train(was_training)
    hidden = out if isinstance(out, torch.Tensor) else out.last_hidden_state  # (B, T, H)
    weight = base.get_output_embeddings().weight  # (V, H)
    rows = []
    for i, r in enumerate(responses):
        R = len(r)
        h = hidden[i, T - R - 1:T - 1]  # (R, H): the state before each response token
        logp = torch.log_softmax((h @ weight.t()).float(), dim=-1)  # (R, V), R is short in a check
        tok = torch.tensor(r, device=dev)
        best, arg = logp.max(-1)
        rows.append((logp.gather(1, tok[:, None]).squeeze(1).cpu(), best.cpu(), arg.cpu()))
    return rows


def verify_greedy(model, prompts: list[list[int]], rollout: Rollout, atol: float | None = None, call=None) -> dict:
    """Check an engine's greedy rollout (n=1, temperature 0) against the policy on one teacher-forced forward.

    Each engine token must be the policy's argmax given the engine's prefix (so, by induction, the policy's own
    greedy continuation is the same sequence), and the engine's log-prob must equal the policy's within atol.
    A token whose policy log-prob is within atol of the best one counts as a tie (bf16 kernels may break ties
    differently) and ends the comparison of that row. atol None: 1e-3 for fp32 weights, 5e-2 otherwise.
    call(fn, *args): runs fn(model, *args) inside the model's DeepSpeed engine (ZeRO-3: a collective on every rank).
    """
    if atol is None:
        atol = 1e-3 if next(unwrap(model).parameters()).dtype == torch.float32 else 5e-2
    rows = policy_logprobs(model, prompts, rollout.response_ids) if call is None else \
        call(policy_logprobs, prompts, rollout.response_ids)
    max_diff, compared, ties = 0.0, 0, 0
    for i, (lp_tok, lp_best, arg) in enumerate(rows):
        eng_tok, eng_lp = rollout.response_ids[i], rollout.sampler_logprobs[i]
        for j, t in enumerate(eng_tok):
            if arg[j].item() != t:
                gap = (lp_best[j] - lp_tok[j]).item()
                if gap > atol:
                    raise GreedyMismatch(
                        f"prompt {i} position {j}: the engine's greedy token is {t} but the policy's is "
                        f"{arg[j].item()} (policy log-probs {lp_tok[j].item():.5f} vs {lp_best[j].item():.5f}); "
                        "the engine does not hold the policy's weights")
                ties += 1
                break
            diff = abs(eng_lp[j] - lp_tok[j].item())
            if diff > atol:
                raise GreedyMismatch(
                    f"prompt {i} position {j}: token {t} has engine log-prob {eng_lp[j]:.5f} but policy log-prob "
                    f"{lp_tok[j].item():.5f} (|diff| {diff:.2e} > atol {atol:g})")
            max_diff, compared = max(max_diff, diff), compared + 1
    return {"tokens_compared": compared, "max_abs_logprob_diff": max_diff, "ties": ties, "atol": atol}


@torch.no_grad()
def load_buckets(target: torch.nn.Module, model, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> dict:
    """Copy `model`'s weights (ZeRO-3 sharded or not, LoRA merged) into `target` (a plain model with the same HF
    names, e.g. the built-in engine's copy) bucket by bucket; every target weight must be written. Returns the
    sharded_buckets stats."""
    dest = dict(target.named_parameters(remove_duplicate=False))
    written, stats = set(), {}
    for bucket in sharded_buckets(model, bucket_bytes, stats):
        for name, t in bucket.items():
            if name in dest:
                dest[name].copy_(t)
                written.add(name)
    missing = sorted(set(dest) - written)
    if missing:
        raise KeyError(f"weight sync wrote no value for {len(missing)} weights of the engine's copy, e.g. {missing[:3]}")
    return stats
