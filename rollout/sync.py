"""Weight sync helpers and the greedy check that makes every sync verifiable (docs/PITFALLS.md: #weight-sync,
#tied-output-layer, #lora-in-the-sync).

- `full_state_dict(model)`: the policy's weights under Hugging Face Qwen2 / Qwen3 names, ALWAYS with `lm_head.weight`
  (a tied output layer left out stays stale inside vLLM on CPU, with only a log warning), LoRA merged into the base
  weights.
- `run_with_timeout(fn, timeout_s, what)`: a sync that hangs raises `SyncTimeout` instead of blocking the trainer.
- `verify_greedy(model, prompts, rollout)`: the engine's greedy tokens and log-probs against the policy's own, on one
  teacher-forced forward; raises `GreedyMismatch` naming the first differing prompt and position.
- `sharded_buckets(model, bucket_bytes)` / `load_buckets(target, model, bucket_bytes)`: the weights of a DeepSpeed
  ZeRO-3 model (each rank holds a shard of every weight) gathered one size-capped bucket at a time, LoRA merged per
  layer inside that one gather, never the whole model and never a gather nested in another
  (docs/PITFALLS.md#lora-in-the-sync).
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch

from rollout.base import Rollout


class SyncTimeout(TimeoutError):
    """A weight sync did not finish in time; the engine's weights are in an unknown state. `thread` is the sync
    still running in the background (join it before trusting the engine again)."""

    def __init__(self, message: str, thread: threading.Thread | None = None):
        super().__init__(message)
        self.thread = thread


class GreedyMismatch(AssertionError):
    """The engine's greedy output differs from the policy's: the engine does not hold the policy's weights."""


def unwrap(model):
    """The module that holds the weights: strips DDP/accelerate (`.module`) and peft (`get_base_model()`) wrappers.
    peft injects its LoRA layers into the base model in place, so the base model's forward still applies them."""
    model = getattr(model, "module", model)
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _hf_name(key: str) -> str | None:
    """Map a peft-wrapped parameter name to the plain one; None for adapter-only tensors."""
    if ".lora_" in key or ".original_module." in key:
        return None
    key = key.replace(".base_layer.", ".")
    if ".modules_to_save." in key:  # "lm_head.modules_to_save.default.weight" -> "lm_head.weight"
        head, tail = key.split(".modules_to_save.", 1)
        key = head + "." + tail.split(".", 1)[1]
    return key


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
        name = _hf_name(k)
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


# ---------------------------------------------------------------------------------------------- sharded weights
DEFAULT_BUCKET_BYTES = 256 * 2**20  # gathered at once during a sync (plus at most one layer more)


def is_sharded(model) -> bool:
    """True for a model whose weights DeepSpeed ZeRO-3 has partitioned (each rank holds a shard)."""
    return any(hasattr(p, "ds_id") for p in unwrap(model).parameters())


def _full_bytes(p: torch.Tensor) -> int:
    """Bytes of the whole weight (a ZeRO-3 parameter's own data is only this rank's shard)."""
    return getattr(p, "ds_numel", p.numel()) * p.element_size()


def _is_lora_layer(module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "get_delta_weight") and hasattr(module, "lora_A")


def _sync_units(base) -> list[tuple[list[torch.nn.Parameter], object]]:
    """The model as units gathered whole: a LoRA layer (base weight, bias and adapter together, so the merge happens
    inside one gather) or one module's own weights. Each unit: (params, produce) where produce() -> {HF name:
    tensor} reads the gathered params (every alias of a tied weight named, e.g. lm_head.weight)."""
    names: dict[int, list[str]] = {}
    for n, p in base.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    units, seen, lora_prefixes = [], set(), []
    for mname, mod in base.named_modules():
        if any(mname.startswith(prefix + ".") for prefix in lora_prefixes):
            continue  # inside a LoRA layer: gathered with it
        if _is_lora_layer(mod):
            lora_prefixes.append(mname)
            params = [p for p in mod.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)

            def produce(mod=mod, mname=mname):
                w = mod.base_layer.weight
                delta = sum((mod.get_delta_weight(a) for a in mod.active_adapters if a in mod.lora_A),
                            torch.zeros_like(w))
                out = {f"{mname}.weight": (w + delta.to(w.dtype)).detach()}  # merged, the shard never touched
                if getattr(mod.base_layer, "bias", None) is not None:
                    out[f"{mname}.bias"] = mod.base_layer.bias.detach()
                return out
            units.append((params, produce))
            continue
        own = [p for p in mod.parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for p in own)

        def produce(own=own):
            out = {}
            for p in own:
                for n in names[id(p)]:
                    hf = _hf_name(n)
                    if hf is not None:
                        out[hf] = p.detach()
            return out
        units.append((own, produce))
    return units


def sharded_buckets(model, bucket_bytes: int = DEFAULT_BUCKET_BYTES, stats: dict | None = None):
    """Yield the policy's weights as {HF name: tensor} dicts, one size-capped bucket at a time: the units
    (_sync_units) of a bucket are gathered by ONE `deepspeed.zero.GatheredParameters` (never nested: a nested gather
    re-partitions early, docs/PITFALLS.md#lora-in-the-sync) and released when the consumer asks for the next bucket,
    so at most bucket_bytes + one unit are gathered at once. The yielded tensors are valid only until then: copy
    them. A model that is not ZeRO-3 partitioned passes through the same path (nothing to gather). A collective
    under ZeRO-3: every rank iterates to the end.

    stats (optional dict) gets: buckets, peak_gathered_bytes (measured inside each gather: the whole size of every
    non-persistent weight currently gathered, anywhere in the model), largest_unit_bytes, bucket_bytes."""
    import deepspeed

    base = unwrap(model)
    units = _sync_units(base)
    every = [p for p in base.parameters() if hasattr(p, "ds_id") and not getattr(p, "ds_persist", False)]
    buckets, cur, size = [], [], 0
    for params, produce in units:
        b = sum(_full_bytes(p) for p in params)
        if cur and size + b > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append((params, produce))
        size += b
    if cur:
        buckets.append(cur)
    peak = 0
    for bucket in buckets:
        params = [p for ps, _ in bucket for p in ps]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None), torch.no_grad():
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            peak = max(peak, sum(_full_bytes(p) for p in every if p.ds_status == ZeroParamStatus.AVAILABLE))
            out = {}
            for _, produce in bucket:
                out.update(produce())
            yield out
    if stats is not None:
        stats.update(buckets=len(buckets), peak_gathered_bytes=peak, bucket_bytes=bucket_bytes,
                     largest_unit_bytes=max((sum(_full_bytes(p) for p in ps) for ps, _ in units), default=0))


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
