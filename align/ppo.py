"""PPO (Qwen report sec. 3.2.2): policy from SFT, frozen reference, frozen reward model, value model initialised
from the reward model; per-token KL penalty, clipped policy and value losses, GAE, PPO-ptx. With --lora_r the policy
trains a LoRA adapter and the reference is the same model with the adapter disabled (one copy of the weights).
The same loop runs the critic-free estimators (`--advantage grpo | rloo | reinforce_pp`: no value model, no warmup;
align/rl.py) with reward functions (`--reward_funcs module:function`) beside or instead of the reward model.

    accelerate launch align/ppo.py --config configs/ppo.yaml [--field value ...]     # the demo (make demo first)
    accelerate launch align/ppo.py --config configs/grpo.yaml   # GRPO with the demo's rule as a verifiable reward
    accelerate launch align/ppo.py --policy_path SFT_FOLDER --reward_path RM_FOLDER --prompt_files prompts.jsonl \
        [--pretrain_files text.jsonl] [--heldout_files heldout.jsonl]                 # your own models and data
No data file defaults to the demo's: without pretrain_files the run has no PPO-ptx term (it says so), without
heldout_files it measures no alignment tax (it says so).

One PPO step (iteration), in numbered phases:
  1. rollout: the engine samples n responses per prompt (top-p 0.9); after each policy update the engine gets the
     new weights (sync time logged)
  2. score: reward model on prompt + response + <|reward|> and/or reward functions, weighted; the demo's true
     reward where the data has one
  3. log-probs of the policy (old) and the reference recomputed by the TRAINING models on the sampled tokens with
     the sampler's temperature (the engine's own log-probs are only compared: docs/PITFALLS.md#sampler-log-probs);
     values
  4. KL-shaped rewards (score normalised by a running mean), GAE, advantage whitening; critic-free: group
     (grpo, rloo) or batch (reinforce_pp) normalised advantages, the KL in the reward or as a k3 loss term
  5. PPO epochs over mini batches: policy loss + value loss (+ k3 KL loss) (+ ptx coef x LM loss on pretraining
     text); with gae, during the first value_warmup_steps steps only the value model is updated
  6. log (JSONL, TensorBoard, PNG), alignment tax (LM loss on held-out pretraining text), NaN guard, checkpoint
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from align.ppo_losses import (AdaptiveKLController, FixedKLController, RunningMeanStd, kl_loss, kl_penalty,
                              ppo_policy_loss, token_mean, value_loss)
from align.experience import (eos_ids, gather_rows, heldout_loss, label_count, lm_loss, response_logprobs,
                              rollout_tensors, stop_ids)
from align.models import LORA_TARGETS, save_model
from align.zero import Models
from align.rl import (OptimizerPair, advantages, check_estimator, describe_score, load_reward_func, loss_reduction,
                      reduction, response_values, reward_model_scores, total_score)
from align.rl_setup import (build_engine, check_start, folder_tokenizer, load_data, load_models, start_notes,
                             tokenizers_match, use_true_reward)
from common.config import ConfigError, cfg
from common.run import RUN_CONTROL, run_main


@dataclass
class PPOConfig:
    # --- models (four: policy, reference = frozen policy copy, reward, value) ---
    policy_path: str = cfg("", "SFT model folder (Qwen2ForCausalLM): the policy and the frozen reference",
                           required=True)
    model_impl: str = cfg("custom", "policy and reference: 'custom' = model.qwen (Qwen2/Qwen3 folders), 'hf' = "
                                    "transformers AutoModelForCausalLM (any causal LM; the built-in engine runs it "
                                    "on transformers' KV cache)")
    reward_path: Optional[str] = cfg(None, "reward-model folder (reward/train.py), read at <|reward|>; None: "
                                           "reward_funcs only (one of the two is needed)")
    value_path: Optional[str] = cfg(None, "value-model init (advantage gae only); None = the reward model (sec. 3.2.2)")
    lora_r: int = cfg(0, "LoRA rank of the policy; 0 = full finetuning. With LoRA the reference is the policy with its "
                         "adapter disabled (no second copy of the weights); no LoRA dropout, so the sampled and the "
                         "trained log-probs come from the same function")
    lora_alpha: float = cfg(16.0, "LoRA scaling alpha")
    lora_target_modules: list[str] = cfg(LORA_TARGETS, "module names that get LoRA adapters")
    tokenizer: Optional[str] = cfg(None, "policy tokenizer: None = the one saved in policy_path, else 'qwen2'/'small'/folder")
    reward_tokenizer: Optional[str] = cfg(None, "reward tokenizer: None = the one saved in reward_path, else as above")
    tokenizer_mismatch: str = cfg("refuse", "policy and reward tokenizers differ: 'refuse' or 'retokenize' the decoded "
                                            "text (docs/PITFALLS.md#tokenizer-mismatch)")
    # --- data ---
    prompt_files: list[str] = cfg([], "prompt-only files ({'prompt': [msgs]})", required=True)
    max_prompt_len: int = cfg(256, "prompts longer than this (tokens) are dropped")
    true_reward: Optional[bool] = cfg(None, "log data.demo.true_reward of each response; None = only if every prompt file is in data/demo")
    pretrain_files: list[str] = cfg([], "pretraining text ({'text'}) for the PPO-ptx LM loss; none = no ptx term "
                                        "(the run says so)")
    heldout_files: list[str] = cfg([], "held-out pretraining text: the alignment tax; none = not measured (the run "
                                       "says so)")
    ptx_seq_len: int = cfg(256, "tokens per packed pretraining row")
    heldout_rows: int = cfg(32, "held-out rows (of ptx_seq_len tokens) scored for the alignment tax")
    # --- rollout ---
    engine: str = cfg("builtin", "'builtin' (KV-cache engine on the custom model) or 'vllm'")
    verify_sync_every: int = cfg(10, "after every k-th weight sync, check the engine's greedy tokens and log-probs "
                                     "equal the policy's on 4 prompts (docs/PITFALLS.md#weight-sync); 0 = never")
    rollout_batch_prompts: int = cfg(16, "prompts per PPO step; responses = prompts x samples_per_prompt")
    samples_per_prompt: int = cfg(2, "responses sampled per prompt (sec. 3.2.2: two)")
    temperature: float = cfg(1.0, "sampling temperature; the training log-probs divide by the same value")
    top_p: float = cfg(0.9, "nucleus sampling (sec. 3.2.2: 0.9)")
    max_new_tokens: int = cfg(64, "response length limit R; responses hitting it get eos_missing_penalty")
    # --- rewards and KL ---
    kl_coef: float = cfg(0.04, "KL penalty coefficient (sec. 3.2.2: 0.04); the start value when adaptive")
    kl_adaptive: bool = cfg(False, "adapt the coefficient towards kl_target (Ziegler et al. 2019)")
    kl_target: float = cfg(6.0, "adaptive KL: target KL per response (nats)")
    kl_horizon: int = cfg(10000, "adaptive KL: horizon in responses")
    kl_min_coef: float = cfg(0.0, "adaptive KL: the coefficient never falls below this (0 = Ziegler et al. as published)")
    kl_estimator: str = cfg("k1", "per-token KL in the reward: 'k1' (log ratio) or 'k3' (never negative)")
    reward_norm_std: bool = cfg(False, "also divide the score by the running std (the mean is always subtracted)")
    eos_missing_penalty: float = cfg(1.0, "subtracted from the normalised score of a response without a stop token")
    # --- PPO ---
    value_warmup_steps: int = cfg(50, "first steps that train only the value model, the policy frozen (sec. 3.2.2)")
    ppo_epochs: int = cfg(1, "passes over each rollout batch")
    num_mini_batches: int = cfg(1, "optimizer steps per PPO epoch (mini batch = responses / num_mini_batches)")
    micro_batch_size: int = cfg(8, "responses per forward/backward")
    clip: float = cfg(0.2, "PPO ratio clip")
    value_clip: float = cfg(0.15, "value clip around the rollout-time values (sec. 3.2.2: 0.15)")
    gamma: float = cfg(1.0, "GAE discount")
    lam: float = cfg(0.95, "GAE lambda")
    whiten_advantages: bool = cfg(True, "whiten advantages over the rollout batch (docs/PITFALLS.md#ppo-stability)")
    ptx_coef: float = cfg(0.1, "PPO-ptx: weight of the LM loss on pretraining text; 0 or no pretrain_files = off")
    ptx_rows: int = cfg(4, "pretraining rows per policy optimizer step")
    # --- optimisation ---
    policy_lr: float = cfg(1e-6, "policy learning rate (sec. 3.2.2: 1e-6)")
    value_lr: float = cfg(5e-6, "value learning rate (sec. 3.2.2: 5e-6)")
    betas: tuple[float, float] = cfg((0.9, 0.95), "AdamW betas")
    weight_decay: float = cfg(0.0, "AdamW weight decay")
    grad_clip: float = cfg(1.0, "max gradient norm per model; 0 = none")
    precision: str = cfg("auto", "'auto' (bf16 on a GPU that has it, else fp32), 'bf16' or 'fp32'")
    chunk_size: Optional[int] = cfg(None, "rows of logits per chunk in the log-prob kernel (memory vs speed: a row "
                                          "is 151,936 fp32 logits, 0.6 MB); None = 2 x hidden size within [256, 512] "
                                          "(model.logprobs.auto_chunk)")
    # --- run ---
    max_steps: int = cfg(200, "PPO steps (rollout + update)")
    output_dir: str = cfg("runs/ppo", "checkpoints, metrics.jsonl, tb/, ppo.png and final/ (policy) go here")
    report_to: str = cfg("tensorboard", "trackers besides metrics.jsonl (always written): comma-separated "
                                        "tensorboard, wandb, mlflow (or any accelerate tracker), or none")
    tax_every: int = cfg(10, "measure the alignment tax every this many steps (also before and after)")
    save_every: int = cfg(0, "checkpoint every this many steps; 0 = only at the end")
    keep_last: int = cfg(1, "complete checkpoints kept")
    resume: bool = cfg(True, "continue the run in output_dir from its latest checkpoint (the config must match); "
                             "false: start a new run (refused if output_dir holds one)")
    overwrite_output_dir: bool = cfg(False, "with resume false: delete the run already in output_dir first")
    stop_at_step: Optional[int] = cfg(None, "checkpoint and stop after this step (time-limited jobs)")
    seed: int = cfg(0, "seed for prompt order, sampling and mini-batch order")
    # --- advantage estimator and rewards (align/rl.py); critic-free modes load no value model and have no warmup ---
    advantage: str = cfg("gae", "'gae': PPO with a value model (value_path, value_warmup_steps, value_lr, lam, "
                                "whiten_advantages); critic-free, the group = samples_per_prompt: 'grpo' (score minus "
                                "the group mean, over the group std), 'rloo' (minus the mean of the other replies), "
                                "'reinforce_pp' (REINFORCE++: KL-shaped returns normalised over the whole batch)")
    dr_grpo: bool = cfg(False, "grpo: Dr. GRPO (Liu et al. 2025): no division by the group std and no per-length "
                               "normalisation (loss_reduction sequence_mean_token_sum)")
    kl_in: str = cfg("reward", "the KL to the reference: 'reward' (kl_coef x per-token kl_estimator penalty, as PPO) "
                               "or 'loss' (kl_coef x k3 loss term beside the policy loss, as GRPO)")
    loss_reduction: Optional[str] = cfg(None, "policy and KL loss aggregation over a mini batch: 'token_mean', "
                                              "'sequence_mean' (mean of each reply's token mean) or "
                                              "'sequence_mean_token_sum' (token sum / (replies x max_new_tokens)); "
                                              "None = token_mean (sequence_mean_token_sum with dr_grpo)")
    reward_funcs: list[str] = cfg([], "reward functions 'module:function' (or file.py:function), each f(messages, "
                                      "reply_text) -> float, beside or instead of the reward model")
    reward_func_weights: list[float] = cfg([], "one weight per reward function; [] = 1.0 each")
    reward_model_weight: float = cfg(1.0, "weight of the reward model's score in the total score")

    # fields that may change when a run is resumed (when to save, stop or measure the alignment tax)
    RESUME_MAY_CHANGE = RUN_CONTROL + ("tax_every",)

    def validate(self):
        choices = {"engine": ("builtin", "vllm"), "kl_estimator": ("k1", "k3"), "model_impl": ("custom", "hf"),
                   "tokenizer_mismatch": ("refuse", "retokenize"), "precision": ("auto", "bf16", "fp32")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.model_impl == "hf" and self.engine == "vllm":
            raise ConfigError("model_impl hf runs its rollouts on the built-in engine (the vLLM weight sync speaks the "
                              "custom model's names): use --engine builtin, or model_impl custom for a Qwen2/Qwen3 "
                              "policy")
        for name in ("max_prompt_len", "ptx_seq_len", "heldout_rows", "rollout_batch_prompts", "samples_per_prompt",
                     "max_new_tokens", "ppo_epochs", "num_mini_batches", "micro_batch_size", "ptx_rows",
                     "max_steps", "tax_every", "keep_last", "chunk_size", "kl_horizon"):
            if getattr(self, name) is not None and getattr(self, name) < 1:  # None: chunk_size's auto
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        n = self.rollout_batch_prompts * self.samples_per_prompt
        if n % self.num_mini_batches or (n // self.num_mini_batches) % self.micro_batch_size:
            raise ConfigError(f"{n} responses per step (rollout_batch_prompts x samples_per_prompt) must split into "
                              f"num_mini_batches ({self.num_mini_batches}) mini batches of whole micro batches "
                              f"({self.micro_batch_size}); change one of them")
        if not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise ConfigError(f"need 0 < top_p <= 1 and temperature > 0, got {self.top_p}, {self.temperature}")
        if min(self.kl_coef, self.kl_min_coef, self.eos_missing_penalty, self.ptx_coef, self.value_warmup_steps,
               self.grad_clip) < 0:
            raise ConfigError("kl_coef, kl_min_coef, eos_missing_penalty, ptx_coef, value_warmup_steps, grad_clip must "
                              "be >= 0")
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0 (0 = full finetuning), got {self.lora_r}")
        if self.policy_lr <= 0 or self.value_lr <= 0 or self.clip <= 0 or self.value_clip <= 0:
            raise ConfigError("policy_lr, value_lr, clip and value_clip must be > 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        check_estimator(self)

    @property
    def ptx_on(self) -> bool:
        """PPO-ptx needs a coefficient and pretraining text; without pretrain_files it is off (said at start)."""
        return self.ptx_coef > 0 and bool(self.pretrain_files)


# ----------------------------------------------------------------------------------------------------------------
# Pieces used by the loop.

def reference_logprobs(run, batch: dict) -> torch.Tensor:
    """log pi_ref(response tokens) (N, R): the frozen SFT copy, or with LoRA the policy with its adapter disabled."""
    if run.ref is not None:
        return run.call(run.zero.ref_engine, run.ref, response_logprobs, batch, run.c.temperature, run.c.chunk_size)
    return run.policy_call(lora_disabled_logprobs, batch, run.c.temperature, run.c.chunk_size)


def lora_disabled_logprobs(policy, batch: dict, temperature: float, chunk_size: int | None) -> torch.Tensor:
    with policy.disable_adapter():
        return response_logprobs(policy, batch, temperature, chunk_size)


@dataclass
class Run:
    """Everything the phases share: the four models, optimizers, tokenizers, data, engine and running statistics."""
    c: PPOConfig
    acc: object
    policy: torch.nn.Module
    ref: torch.nn.Module | None  # None with LoRA: the policy with its adapter disabled
    reward: torch.nn.Module | None  # None: reward functions only
    value: torch.nn.Module | None  # None: a critic-free advantage
    opt: OptimizerPair
    engine: object
    tok: object
    rtok: object
    same_tokenizer: bool
    pad_id: int
    reward_pad_id: int
    reward_id: int
    stop_ids: list
    prompts: list
    ptx_rows: list
    heldout_rows: list
    kl_ctl: FixedKLController
    reward_stats: RunningMeanStd
    true_reward: bool
    tax_start: float | None = None
    value_emb_grad: object = None  # common.optim.SparseEmbeddingGrad of the value model (None: dense gradient)
    folder: object = None  # common.run.RunDir: the output folder's run (lock, checkpoints, metrics)
    eos_ids: list = None  # stop ids that end a reply with an EOS (stop_ids without <|reward|>)
    reward_funcs: list = None  # [(name, callable)] from reward_funcs
    zero: Models = None  # the DeepSpeed engines (align/zero.py); all None without DeepSpeed

    @staticmethod
    def call(engine, model, fn, *args, **kwargs):
        """fn(model, *args): inside `engine`'s forward under DeepSpeed (ZeRO-3 gathers the weights it reads)."""
        return fn(model, *args, **kwargs) if engine is None else engine(fn, *args, **kwargs)

    def policy_call(self, fn, *args, **kwargs):
        return self.call(self.zero.policy_engine, self.policy, fn, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
def make_experience(run: Run, step: int) -> tuple[dict, dict]:
    """Phases 1-4 for PPO step `step` (0-based): sample, score, recompute log-probs, shape rewards, GAE.

    With W ranks each samples, scores and recomputes log-probs for its contiguous share of the step's prompts
    (prompt i's random stream is seeded by (step, i), so the split does not change the samples); the per-row results
    are gathered in rank order, and phase 4 runs on the whole batch on every rank, as one process would."""
    from common.loop import mini_batch_rows
    from rollout.base import SamplingParams

    c, dev, t = run.c, run.acc.device, {}
    W, rank = run.acc.num_processes, run.acc.process_index
    # 1. rollout: prompts of this step are a function of (step, seed), so a resumed run samples the same ones
    idx = mini_batch_rows(step, len(run.prompts), c.rollout_batch_prompts, c.seed)
    per = c.rollout_batch_prompts // W
    mine = idx[rank * per:(rank + 1) * per]  # this rank's prompts; seeds continue across ranks
    params = SamplingParams(n=c.samples_per_prompt, temperature=c.temperature, top_p=c.top_p,
                            max_tokens=c.max_new_tokens, stop_token_ids=run.stop_ids,
                            seed=(c.seed * 100003 + step) * 65536 + rank * per)
    t0 = time.perf_counter()
    ro = run.engine.generate([run.prompts[i]["prompt_ids"] for i in mine], params)
    t["time_rollout"] = time.perf_counter() - t0
    messages = [run.prompts[mine[i]]["messages"] for i in ro.prompt_index]
    if any(len(r) == 0 for r in ro.response_ids):
        raise RuntimeError("the engine returned an empty response; max_new_tokens must be >= 1")

    # 2. score: reward model at <|reward|> (raw score) and/or reward functions, weighted; the demo's true reward
    t0 = time.perf_counter()
    n = len(ro.response_ids)
    b = {k: v.to(dev) for k, v in rollout_tensors(ro.prompt_ids, ro.response_ids, run.pad_id).items()}
    with torch.no_grad(), run.acc.autocast():
        score = reward_model_scores(run, ro, messages, [run.prompts[mine[i]].get("tools") for i in ro.prompt_index])
        # 3. old / reference log-probs and values from the training models on the sampled tokens
        parts = []
        for s in range(0, n, c.micro_batch_size):
            mb = {k: v[s:s + c.micro_batch_size] for k, v in b.items()}
            old, ent = run.policy_call(response_logprobs, mb, c.temperature, c.chunk_size, entropy=True)
            values = response_values(run.value, mb) if run.value is not None else torch.zeros_like(old)
            parts.append((old, ent, reference_logprobs(run, mb), values))
        old_logp, entropy, ref_logp, values = (torch.cat(x).float().cpu() for x in zip(*parts))  # (n, R_rank)
    replies = [run.tok.decode(r, skip_special_tokens=True) for r in ro.response_ids]
    rm_score, (score, funcs) = score, total_score(c, run.reward_funcs, score, messages, replies,
                                                  [mine[i] for i in ro.prompt_index])
    true = []
    if run.true_reward:
        from data.demo_reward import true_reward

        true = [true_reward(msgs, r) for msgs, r in zip(messages, replies)]
    t["time_score"] = time.perf_counter() - t0

    # every rank's rows (one process: its own), in the order one process would have produced them
    g = gather_rows(run.acc, dict(prompt_ids=ro.prompt_ids, response_ids=ro.response_ids, finish=ro.finish_reason,
                                  sampler_lp=ro.sampler_logprobs, true=true, rm_score=rm_score.cpu(),
                                  score=score.cpu(), old_logp=old_logp, entropy=entropy, ref_logp=ref_logp,
                                  values=values, **{f"reward/{k}": v for k, v in funcs.items()}))
    N = len(g["response_ids"])
    b = {k: v.to(dev) for k, v in rollout_tensors(g["prompt_ids"], g["response_ids"], run.pad_id).items()}
    mask = b["mask"]  # (N, R)
    R = mask.shape[1]
    rm_score, score, old_logp, entropy, ref_logp, values = (g[k].to(dev) for k in  # (N,) twice, then (N, R) each
                                                            ("rm_score", "score", "old_logp", "entropy", "ref_logp",
                                                             "values"))

    # 4. advantages (align.rl.advantages): the score minus its running mean (sec. 3.2.2), the KL in the reward or
    # not, then GAE + whitening (gae), batch-normalised returns (reinforce_pp) or group baselines (grpo, rloo).
    # ended with <|im_end|> / <|endoftext|>; a sampled <|reward|> also stops a row, but counts as no EOS
    has_eos = torch.tensor([f == "stop" and r[-1] in run.eos_ids for f, r in
                            zip(g["finish"], g["response_ids"])], device=dev)  # (N,)
    run.reward_stats.update(score)
    norm_score = run.reward_stats.normalise(score, use_std=c.reward_norm_std)
    kl = kl_penalty(old_logp, ref_logp, c.kl_estimator)  # (N, R)
    adv, returns = advantages(c, norm_score, kl, mask, run.kl_ctl.value, has_eos, values)
    gap = (old_logp - torch.tensor([x + [0.0] * (R - len(x)) for x in g["sampler_lp"]], device=dev)).abs() * mask
    seq_sum = lambda x: float((x * mask).sum(-1).mean())  # noqa: E731  mean over responses of a per-response sum
    m = {"score": float(score.mean()), "score_normalised": float(norm_score.mean()),
         "kl_k1": seq_sum(kl_penalty(old_logp, ref_logp, "k1")), "kl_k3": seq_sum(kl_penalty(old_logp, ref_logp, "k3")),
         "kl_coef": run.kl_ctl.value, "entropy": float(token_mean(entropy, mask)),
         "response_length": float(mask.sum(-1).mean()), "eos_rate": float(has_eos.float().mean()),
         "logprob_gap_max": float(gap.max()), "logprob_gap_mean": float(gap.sum() / mask.sum()), **t}
    m |= {k: sum(g[k]) / N for k in g if k.startswith("reward/")}  # each reward function's mean
    if run.reward is not None:
        m["rm_score"] = float(rm_score.mean())
    if returns is not None:
        m["returns_mean"] = float(token_mean(returns, mask))
    if run.value is not None:
        m["values_mean"] = float(token_mean(values, mask))
    if run.true_reward:
        m["true_reward"] = sum(g["true"]) / N
    exp = dict(b, old_logp=old_logp, advantages=adv)
    if run.value is not None:
        exp |= {"values": values, "returns": returns}
    if c.kl_in == "loss":
        exp["ref_logp"] = ref_logp
    return exp, m


def ppo_update(run: Run, exp: dict, step: int) -> dict:
    """Phase 5: PPO epochs over shuffled mini batches; policy (+ k3 KL loss) (+ ptx) only after the value warmup
    (gae; critic-free advantages have no value model and no warmup).

    Every rank holds the whole experience and the same mini-batch order; rank r backpropagates rows r, r + W, ... of
    each mini batch with losses divided by the mini batch's token (or response) count, and the gradients are summed
    over ranks, so the step equals one process's. Under DeepSpeed each engine takes its model's backward and reduces
    the gradients itself (align/zero.py)."""
    from align.experience import lm_loss_tensor
    from align.zero import backward as zero_backward
    from common.guard import check_finite
    from common.loop import mini_batch_rows, sum_gradients, sum_over_ranks

    c, N = run.c, exp["mask"].shape[0]
    W, rank = run.acc.num_processes, run.acc.process_index
    critic = run.value is not None
    warmup = critic and step < c.value_warmup_steps  # sec. 3.2.2: the value model learns first, the policy frozen
    mini = N // c.num_mini_batches
    sums: dict[str, float] = {}
    n_updates = 0
    for epoch in range(c.ppo_epochs):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(c.seed * 7919 + step * 131 + epoch))
        for k in range(c.num_mini_batches):
            rows = order[k * mini:(k + 1) * mini]
            n_tok = float(exp["mask"][rows].sum())  # token_mean over the whole MINI batch, not per micro batch
            reduce, total = reduction(loss_reduction(c), len(rows), n_tok, c.max_new_tokens)
            mine = rows[rank::W]  # this rank's share of the mini batch
            keys = (["value_loss", "value_clip_frac"] if critic else []) + \
                ([] if warmup else ["policy_loss", "policy_clip_frac", "approx_kl"]) + \
                (["kl_loss"] if c.kl_in == "loss" and not warmup else [])
            stats = dict.fromkeys(keys, 0.0)
            for s in range(0, len(mine), c.micro_batch_size):
                mb = {key: v[mine[s:s + c.micro_batch_size].to(v.device)] for key, v in exp.items()}
                with run.acc.autocast():
                    vloss, ploss, add = None, None, {}
                    if critic:
                        v_new = response_values(run.value, mb)  # (n, R)
                        vl, vstats = value_loss(v_new.float(), mb["values"], mb["returns"], mb["mask"], c.value_clip,
                                                total=n_tok)
                        vloss, add = vl, {"value_loss": vl.item(), **{k2: x.item() for k2, x in vstats.items()}}
                    if not warmup:
                        logp = run.policy_call(response_logprobs, mb, c.temperature, c.chunk_size).float()  # (n, R)
                        pl, pstats = ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], c.clip,
                                                     reduce=reduce, total=total, n_tokens=n_tok)
                        ploss = pl
                        add |= {"policy_loss": pl.item(), **{k2: x.item() for k2, x in pstats.items()}}
                        if c.kl_in == "loss":  # GRPO: kl_coef x k3 to the reference, reduced like the policy loss
                            kll = kl_loss(logp, mb["ref_logp"], mb["mask"], run.kl_ctl.value, reduce, total)
                            ploss, add["kl_loss"] = ploss + kll, kll.item()
                loss = sum(x for x in (vloss, ploss) if x is not None)
                check_finite(step + 1, {"loss": loss}, run.folder.last_ckpt)
                if run.zero.deepspeed:  # each engine its own backward (the graphs are disjoint)
                    for engine, x in ((run.zero.value_engine, vloss), (run.zero.policy_engine, ploss)):
                        if x is not None:
                            zero_backward(engine, x, W)
                else:
                    loss.backward()
                for k2, x in add.items():
                    stats[k2] += x
            if not warmup and c.ptx_on:  # PPO-ptx: coef x LM loss on a pretraining batch (InstructGPT)
                ptx_step = (step * c.ppo_epochs + epoch) * c.num_mini_batches + k
                rows_ptx = [run.ptx_rows[i] for i in mini_batch_rows(ptx_step, len(run.ptx_rows), c.ptx_rows, c.seed)]
                if run.zero.deepspeed:  # ptx_rows >= ranks (setup): every rank one forward and backward
                    ptx = run.policy_call(lm_loss_tensor, rows_ptx[rank::W], run.pad_id, c.chunk_size, c.ptx_coef,
                                          label_count(rows_ptx))
                    zero_backward(run.zero.policy_engine, ptx, W)
                    stats["ptx_loss"] = float(ptx.detach()) / c.ptx_coef
                else:
                    stats["ptx_loss"] = lm_loss(run.policy, rows_ptx[rank::W], run.pad_id, c.chunk_size,
                                                coef=c.ptx_coef, n_tokens=label_count(rows_ptx))
            stats = dict(zip(stats, sum_over_ranks(run.acc, list(stats.values()))))
            if run.value_emb_grad is not None:
                run.value_emb_grad.densify()
            if critic and not run.zero.deepspeed:  # under DeepSpeed the engines reduce the gradients
                sum_gradients(run.acc, run.value.parameters())
            if not warmup and not run.zero.deepspeed:
                sum_gradients(run.acc, run.policy.parameters())
            stats |= optimizer_steps(run, warmup, step)
            for k2, x in stats.items():
                sums[k2] = sums.get(k2, 0.0) + x
            n_updates += 1
    return {k2: x / n_updates for k2, x in sums.items()} | {"value_warmup": float(warmup)}


def optimizer_steps(run: Run, warmup: bool, step: int) -> dict:
    """NaN guard on the gradient norms, clip, step the value optimizer (and the policy's after warmup)."""
    from common.guard import check_finite

    if run.zero.deepspeed:  # DeepSpeed reduces, clips (its gradient_clipping = grad_clip) and steps
        from align.zero import step as zero_step

        out = {} if run.value is None else {"value_grad_norm": zero_step(run.zero.value_engine)}
        if not warmup:
            out["policy_grad_norm"] = zero_step(run.zero.policy_engine)
        check_finite(step + 1, out, run.folder.last_ckpt)  # after the step: the weights check below stops the run
        run.folder.check_weights(run.acc, step + 1, run.opt)
        return out
    clip = run.c.grad_clip if run.c.grad_clip > 0 else math.inf
    out = {} if run.value is None else \
        {"value_grad_norm": float(torch.nn.utils.clip_grad_norm_(run.value.parameters(), clip))}
    if not warmup:
        out["policy_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(run.policy.parameters(), clip))
    check_finite(step + 1, out, run.folder.last_ckpt)
    if run.value is not None:
        run.opt.value.step(), run.opt.value.zero_grad(set_to_none=True)
    if not warmup:
        run.opt.policy.step()
    run.opt.policy.zero_grad(set_to_none=True)
    run.folder.check_weights(run.acc, step + 1, run.opt)
    return out


# ----------------------------------------------------------------------------------------------------------------
def setup(c: PPOConfig) -> tuple[Run, int, Path | None]:
    """Accelerator, run folder (lock, run id, config check, resume point), seeds, tokenizers (mismatch check), data,
    the four models, engine, optimizers, resume state."""
    import random

    import numpy as np

    from align.zero import check_deepspeed, prepare_models, zero_stage
    from common.loop import make_accelerator, restore_run_state
    from common.optim import SparseEmbeddingGrad, build_adamw
    from common.run import open_run
    from common.preflight import check_vocab
    from data.chatml import REWARD_TOKEN, special_id
    from data.template import chat_format
    from model.checkpoint import generation_eos_ids

    check_start(c)  # 0. checks that need no model (paths, data files, vLLM shape, context extension): seconds
    reward_funcs = [load_reward_func(spec) for spec in c.reward_funcs]  # an import error stops here, in one line
    acc = make_accelerator(c.precision, 1, c.micro_batch_size)
    W, stage = acc.num_processes, zero_stage(acc)
    check_deepspeed(acc, c.grad_clip)
    if stage and c.ptx_on and c.ptx_rows < W:
        raise ConfigError(f"under DeepSpeed every rank takes part of each PPO-ptx batch: ptx_rows ({c.ptx_rows}) must "
                          f"be >= the number of processes ({W})")
    if stage == 3 and c.model_impl == "hf":
        raise ConfigError("model_impl hf is not yet synced from ZeRO-3 shards (the built-in engine's whole copy is the "
                          "custom model); under zero3.yaml use a Qwen2/Qwen3 policy with model_impl custom, or "
                          "zero2.yaml")
    n_resp = c.rollout_batch_prompts * c.samples_per_prompt
    if c.rollout_batch_prompts % W or (n_resp // c.num_mini_batches) % W:
        raise ConfigError(f"with {W} processes, rollout_batch_prompts ({c.rollout_batch_prompts}) and the mini batch "
                          f"({n_resp // c.num_mini_batches} responses) must both be multiples of {W}")
    folder = open_run(acc, c, "ppo")
    resume_dir = folder.resume_dir
    random.seed(c.seed), np.random.seed(c.seed), torch.manual_seed(c.seed)
    tok = folder_tokenizer(c.tokenizer, c.policy_path)
    rtok = tok if c.reward_path is None else folder_tokenizer(c.reward_tokenizer, c.reward_path)
    if acc.is_main_process:
        print(f"[ppo] tokenizer {c.tokenizer or c.policy_path}: {chat_format(tok).describe()}", flush=True)
    gen_eos = generation_eos_ids(c.policy_path)  # the policy folder's generation config: where replies end
    same = tokenizers_match(c, tok, rtok)
    check_vocab(tok, c.policy_path, "policy_path", c.tokenizer)  # from config.json, before the models load
    if c.reward_path is not None:
        check_vocab(rtok, c.reward_path, "reward_path", c.reward_tokenizer)
    pad = lambda t: t.pad_token_id if t.pad_token_id is not None else t.eos_token_id  # noqa: E731
    prompts, ptx, heldout, report = load_data(c, tok)
    if len(prompts) < c.rollout_batch_prompts:
        raise ConfigError(f"{', '.join(c.prompt_files)}: {len(prompts)} usable prompts, fewer than "
                          f"rollout_batch_prompts ({c.rollout_batch_prompts}): lower rollout_batch_prompts, or add "
                          f"prompts")
    policy, ref, reward, value = load_models(c, resume_dir, acc.device)
    opt_p = build_adamw(policy, c.policy_lr, c.betas, 1e-8, c.weight_decay)
    opt_v = None if value is None else build_adamw(value, c.value_lr, c.betas, 1e-8, c.weight_decay)
    zero, engine = Models(world=W), build_engine(c, policy, pad(tok), stage)
    value_emb_grad = None if value is None or stage else SparseEmbeddingGrad(value.get_input_embeddings())
    if stage:  # policy and value: one DeepSpeed engine each; ZeRO-3: reference and reward sharded too
        opt_p, value, opt_v, reward = prepare_models(acc, zero, policy, opt_p, value, opt_v, ref, reward)
    opt = OptimizerPair(opt_p, opt_v)
    kl_ctl = AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon, c.kl_min_coef) if c.kl_adaptive else \
        FixedKLController(c.kl_coef)
    run = Run(c, acc, policy, ref, reward, value, opt, engine, tok, rtok, same, pad(tok),
              pad(rtok), None if reward is None else special_id(rtok, REWARD_TOKEN),
              stop_ids(tok, rtok if same and reward is not None else None, gen_eos),
              prompts, ptx, heldout, kl_ctl, RunningMeanStd(), use_true_reward(c),  # sparse: exact, rows touched only
              value_emb_grad=value_emb_grad, folder=folder, reward_funcs=reward_funcs, zero=zero,
              eos_ids=eos_ids(tok, gen_eos))
    start = 0
    if resume_dir is not None:  # exact resume: weights above, then optimizers, statistics and RNG state
        ts = restore_run_state(acc, resume_dir, opt, None, "n_prompts", len(prompts), engines=zero.trained())
        start, run.tax_start = ts["step"], ts["tax_start"]
        kl_ctl.load_state_dict(ts["kl_ctl"]), run.reward_stats.load_state_dict(ts["reward_stats"])
    if acc.is_main_process:
        print(f"[ppo] {report}\n[ppo] {len(prompts)} prompts, {len(ptx)} ptx rows, {len(heldout)} held-out rows, "
              f"{n_resp} responses/step over {W} process(es){f' (DeepSpeed ZeRO-{stage})' if stage else ''}, "
              f"steps {start}->{c.max_steps}, "
              f"engine {c.engine}, tokenizers {'equal' if same else 'differ: re-tokenising'}, resume from "
              f"{resume_dir}\n[ppo] advantage {c.advantage}"
              f"{'' if value is not None else ' (no value model, no warmup)'}, KL in the {c.kl_in}, loss "
              f"{loss_reduction(c)}, score = {describe_score(c, reward is not None, reward_funcs)}",
              flush=True)
        for note in start_notes(c, len(ptx), len(heldout)):
            print(f"[ppo] {note}", flush=True)
    return run, start, resume_dir


def checkpoint(run: Run, step: int):
    def write_models(d: Path):
        save_model(run.policy, d, run.tok)  # LoRA: the adapter
        if run.value is not None:  # critic-free: no value model; under DeepSpeed run.value is its engine
            getattr(run.value, "module", run.value).save_pretrained(d.parent / "value")  # same atomic folder
    state = {"step": step, "n_prompts": len(run.prompts), "tax_start": run.tax_start,
             "kl_ctl": run.kl_ctl.state_dict(), "reward_stats": run.reward_stats.state_dict()}
    return run.folder.save(run.acc, step, write_models, run.opt, None, state, run.c.keep_last,
                           engines=run.zero.trained())


def train(c: PPOConfig) -> list[dict]:
    """Run PPO as configured; returns the metrics of the steps run by this call."""
    from tqdm.auto import tqdm

    from common.loop import full_weights

    run, start, resume_dir = setup(c)
    out = Path(c.output_dir)
    log = run.folder.metrics()  # resuming: cut back to the rows logged before the checkpoint
    tax = lambda: heldout_loss(run.policy, run.heldout_rows, run.pad_id, c.chunk_size, acc=run.acc,  # noqa: E731
                               call=run.policy_call if run.zero.deepspeed else None)
    if run.heldout_rows and run.tax_start is None:  # the alignment tax before PPO
        run.tax_start = tax()
        log.log(0, {"heldout_lm_loss": run.tax_start, "alignment_tax": 0.0})
    stop = min(c.max_steps, c.stop_at_step or c.max_steps)
    history, synced, n_syncs = [], start > 0, 0
    bar = tqdm(total=c.max_steps, initial=start, desc="ppo", disable=not run.acc.is_main_process, dynamic_ncols=True)
    for step in range(start, stop):
        t0 = time.perf_counter()
        sync_s = run.engine.sync_weights(run.policy) if synced else 0.0  # 1. new weights into the engine
        n_syncs += synced
        verify_s = time.perf_counter()
        if synced and c.verify_sync_every and n_syncs % c.verify_sync_every == 1 % c.verify_sync_every:
            run.engine.greedy_check(run.policy, [p["prompt_ids"] for p in run.prompts[:4]],  # raises on mismatch
                                    **({"call": run.policy_call} if run.zero.deepspeed else {}))
        verify_s = time.perf_counter() - verify_s
        exp, m = make_experience(run, step)  # 1-4
        t1 = time.perf_counter()
        m |= ppo_update(run, exp, step)  # 5
        synced = not m["value_warmup"]  # the policy moved: the engine needs its weights before the next rollout
        if not m["value_warmup"]:  # the frozen policy's KL is 0 by construction: nothing to adapt to
            run.kl_ctl.update(m["kl_k1"], c.rollout_batch_prompts * c.samples_per_prompt)
        dt = time.perf_counter() - t0
        m |= {"time_sync": sync_s, "time_verify_sync": verify_s, "time_train": time.perf_counter() - t1, "time_step": dt,
              "sync_share": sync_s / dt, "episodes_per_s": len(exp["mask"]) / dt}
        if run.heldout_rows and ((step + 1) % c.tax_every == 0 or step + 1 == c.max_steps):  # 6. alignment tax
            m["heldout_lm_loss"] = tax()
            m["alignment_tax"] = m["heldout_lm_loss"] - run.tax_start
        log.log(step + 1, m)
        history.append(m)
        bar.update(1)
        bar.set_postfix(score=f"{m['score']:.3f}", kl=f"{m['kl_k3']:.3f}",
                        **({"v": f"{m['value_loss']:.3f}"} if "value_loss" in m else {}))
        if (c.save_every and (step + 1) % c.save_every == 0) or step + 1 == stop:
            checkpoint(run, step + 1)
    bar.close()
    final = stop == c.max_steps  # ZeRO-3: every rank gathers the policy bucket by bucket (LoRA merged per layer)
    with full_weights(run.acc, run.zero.policy_engine, stage_dir=out) if final else contextlib.nullcontext():
        if final and run.acc.is_main_process:
            final_outputs(run, out)
    log.close()
    run.folder.end(run.acc, finished=stop == c.max_steps)  # waits for every rank; marks the run finished
    return history


def final_outputs(run: Run, out: Path) -> None:
    """The final policy (LoRA merged) and the curves; on the main process (under ZeRO-3 inside full_weights)."""
    from common.metrics import plot_metrics, read_jsonl

    with run.folder.writing("the final policy"):
        save_model(run.policy, out / "final", run.tok, merge=True)  # LoRA: merged into the SFT weights
        rows = read_jsonl(out / "metrics.jsonl")  # the whole run's, resumed or not
        keys = [k for k in ("true_reward", "rm_score", "score", "kl_k1", "kl_coef", "value_loss", "policy_loss",
                            "kl_loss", "entropy", "response_length", "alignment_tax") if any(k in r for r in rows)]
        title = "PPO" if run.value is not None else run.c.advantage.upper()
        plot_metrics(out / "metrics.jsonl", out / "ppo.png", keys, title=title)
    print(f"[ppo] done: policy in {out / 'final'}, curves in {out / 'ppo.png'}", flush=True)


def main(argv: list[str] | None = None) -> None:
    run_main(PPOConfig, train, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
