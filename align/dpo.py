"""Direct preference optimisation (Rafailov et al. 2023) on prompt / chosen / rejected pairs, from an SFT model.

    accelerate launch align/dpo.py --config configs/dpo.yaml [--field value ...]
    python align/dpo.py --config configs/dpo.yaml

The loop, in numbered phases:
  1. config, accelerator, seed, resume point     2. tokenizer and pairs (data.datasets.build_preference_examples)
  3. policy (custom or transformers; optional LoRA), optimizer, warmup+cosine schedule
  4. reference: summed response log-probs of every pair computed once and cached (default, saved in each
     checkpoint), or a reference forward per micro batch; with LoRA the reference is the base model with the
     adapter disabled, so no second copy of the weights is held
  5. resume    6. train: chosen and rejected in one forward -> DPO / cDPO / IPO loss (+ optional chosen NLL)
  7. NaN guard, clip, optimizer step, log, checkpoint    8. final HF model (LoRA merged) + curves
Log-probs come from the chunked kernel (model.logprobs) and only response positions go through the 151,936-wide
output layer: the prompt tokens' logits are never computed (docs/PITFALLS.md#logits-memory).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from align.dpo_losses import chosen_nll_loss, conservative_dpo_loss, ipo_loss, sigmoid_dpo_loss
from align.models import LORA_TARGETS, build_base_model, build_model, save_model
from align.sequences import SequenceLogprobs, reference_mode, score_sequences, sequence_batch
from common.config import ConfigError, cfg
from common.run import RUN_CONTROL, run_main
from data.template import load_chat_tokenizer
from data.tokenizer import load_tokenizer  # noqa: F401  (used by tests)

LOSS_TYPES = ("sigmoid", "conservative", "ipo")


@dataclass
class DPOConfig:
    # --- model (the policy starts from, and the reference is, this model) ---
    model_path: Optional[str] = cfg(None, "HF causal-LM folder to start from: the SFT model (Qwen2ForCausalLM, "
                                          "or any causal LM with model_impl=hf)")
    init_config: Optional[str] = cfg(None, "instead of model_path: a Qwen2 config.json for a randomly initialised "
                                           "custom model (demos, no hub)")
    model_impl: str = cfg("custom", "'custom' = model.qwen (Qwen2 folders), 'hf' = transformers AutoModelForCausalLM")
    tokenizer: Optional[str] = cfg(None, "None = the model folder's own (its vocabulary, special tokens and chat "
                                         "template); or 'qwen2', 'small' (tiny test BPE), 'demo' or a tokenizer "
                                         "folder (needed with init_config)")
    dropout: float = cfg(0.0, "dropout while training; the reference is always computed without dropout")
    gradient_checkpointing: bool = cfg(False, "recompute activations in the backward to save memory")
    # --- LoRA (peft); the reference is then the base model with the adapter disabled ---
    lora_r: int = cfg(0, "LoRA rank; 0 = full finetuning")
    lora_alpha: float = cfg(16.0, "LoRA scaling alpha")
    lora_dropout: float = cfg(0.0, "dropout on the LoRA input")
    lora_target_modules: list[str] = cfg(LORA_TARGETS, "module names that get LoRA adapters")
    # --- data ---
    train_files: list[str] = cfg([], "preference files (prompt/chosen/rejected JSONL, JSON, parquet, arrow)",
                                 required=True)
    seq_len: int = cfg(2048, "longest prompt + response in tokens")
    truncation: str = cfg("drop", "pairs longer than seq_len: 'drop' or 'truncate' (the prompt is cut from the left)")
    # --- loss ---
    loss_type: str = cfg("sigmoid", "'sigmoid' (DPO), 'conservative' (cDPO, needs label_smoothing > 0) or 'ipo'")
    beta: float = cfg(0.1, "strength of the KL constraint to the reference (DPO beta; IPO tau)")
    label_smoothing: float = cfg(0.0, "cDPO: probability that a preference label is flipped, in (0, 0.5)")
    sft_coef: float = cfg(0.0, "weight of the token-mean NLL of the chosen replies added to the loss; 0 = none")
    # --- reference ---
    reference: str = cfg("cached", "'cached': reference log-probs computed once before training; 'online': a "
                                   "reference forward per micro batch")
    ref_batch_size: int = cfg(8, "pairs per forward when caching the reference log-probs")
    # --- batch (mini batch = micro x grad_accum x ranks; counted in pairs) ---
    micro_batch_size_per_rank: int = cfg(4, "pairs per forward/backward on each rank (2x sequences: chosen + rejected)")
    grad_accum_steps: int = cfg(16, "micro batches per optimizer step on each rank (64 pairs with 1 rank, DPO paper)")
    # --- optimisation (DPO paper sec. 6: lr 1e-6, batch 64, 150 warmup steps) ---
    lr: float = cfg(1e-6, "peak learning rate")
    min_lr_ratio: float = cfg(1.0, "final LR of the cosine decay as a fraction of lr; 1.0 = constant after warmup")
    warmup_steps: int = cfg(150, "linear warmup steps")
    max_steps: Optional[int] = cfg(None, "optimizer steps; None = num_epochs passes over the pairs")
    num_epochs: int = cfg(1, "passes over the pairs when max_steps is None")
    betas: tuple[float, float] = cfg((0.9, 0.95), "AdamW betas")
    eps: float = cfg(1e-8, "AdamW epsilon")
    weight_decay: float = cfg(0.0, "AdamW weight decay (not on biases and norms)")
    grad_clip: float = cfg(1.0, "max global gradient norm; 0 = no clipping")
    precision: str = cfg("auto", "'auto' (bf16 on a GPU that has it, else fp32), 'bf16' or 'fp32'")
    chunk_size: Optional[int] = cfg(None, "rows of logits per chunk in the log-prob kernel (memory vs speed: a row "
                                          "is 151,936 fp32 logits, 0.6 MB); None = 2 x hidden size within [256, 512] "
                                          "(model.logprobs.auto_chunk); a micro batch whose response tokens fit in "
                                          "one chunk also skips the backward's logits recompute")
    # --- run ---
    output_dir: str = cfg("runs/dpo", "checkpoints, metrics.jsonl, tb/, curves.png and the final model go here")
    report_to: str = cfg("tensorboard", "trackers besides metrics.jsonl (always written): comma-separated "
                                        "tensorboard, wandb, mlflow (or any accelerate tracker), or none")
    save_every: int = cfg(0, "checkpoint every this many steps; 0 = only at the end")
    keep_last: int = cfg(1, "complete checkpoints kept")
    resume: bool = cfg(True, "continue the run in output_dir from its latest checkpoint (the config must match); "
                             "false: start a new run (refused if output_dir holds one)")
    overwrite_output_dir: bool = cfg(False, "with resume false: delete the run already in output_dir first")
    stop_at_step: Optional[int] = cfg(None, "checkpoint and stop after this step (time-limited jobs)")
    log_every: int = cfg(1, "log metrics every this many steps")
    seed: int = cfg(0, "seed for the data order, model init and dropout")

    # fields that may change when a run is resumed (they only decide when to save, log or stop)
    RESUME_MAY_CHANGE = RUN_CONTROL

    def validate(self):
        if (self.model_path is None) == (self.init_config is None):
            raise ConfigError("set exactly one of model_path (the SFT model) or init_config (random init)")
        if self.model_impl not in ("custom", "hf") or (self.init_config is not None and self.model_impl != "custom"):
            raise ConfigError(f"model_impl must be 'custom' or 'hf' (init_config needs 'custom'), "
                              f"got {self.model_impl!r}")
        if self.init_config is not None and not self.tokenizer:
            raise ConfigError("init_config builds a model with no tokenizer of its own: name one with --tokenizer "
                              "(qwen2, small, demo or a tokenizer folder)")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {list(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.loss_type == "conservative" and not 0 < self.label_smoothing < 0.5:
            raise ConfigError(f"loss_type 'conservative' needs 0 < label_smoothing < 0.5, got {self.label_smoothing}")
        if self.loss_type != "conservative" and self.label_smoothing != 0:
            raise ConfigError(f"label_smoothing={self.label_smoothing} only applies to loss_type 'conservative'; "
                              f"set loss_type: conservative or label_smoothing: 0")
        if self.reference not in ("cached", "online"):
            raise ConfigError(f"reference must be 'cached' or 'online', got {self.reference!r}")
        if self.precision not in ("auto", "bf16", "fp32") or self.truncation not in ("drop", "truncate"):
            raise ConfigError(f"precision must be auto/bf16/fp32 and truncation drop/truncate, got "
                              f"{self.precision!r}, {self.truncation!r}")
        for name in ("seq_len", "micro_batch_size_per_rank", "grad_accum_steps", "num_epochs", "keep_last",
                     "log_every", "chunk_size", "ref_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:  # None: chunk_size's auto
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.beta <= 0 or self.lr <= 0 or self.sft_coef < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ConfigError("need beta > 0, lr > 0, sft_coef >= 0, grad_clip >= 0 and warmup_steps >= 0")
        if self.lora_r < 0 or not 0 <= self.dropout < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("need lora_r >= 0, 0 <= dropout < 1 and 0 <= min_lr_ratio <= 1")


# ----------------------------------------------------------------------------------------------------------------
# Pieces used by the loop.

def pair_batch(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one padded batch of 2B sequences [chosen_1..B, rejected_1..B], labels on the responses only."""
    return sequence_batch([(p["prompt_ids"], p[key]) for key in ("chosen_ids", "rejected_ids") for p in pairs], pad_id)


def cache_reference(acc, seqlogp, ref, pairs: list[dict], pad_id: int, batch_size: int) -> torch.Tensor:
    """Reference summed log-probs (N, 2) [chosen, rejected] of all pairs, every rank holding the whole table
    (align.sequences.score_sequences: each rank scores its share, then they are gathered)."""
    seqs = [(p["prompt_ids"], p[key]) for p in pairs for key in ("chosen_ids", "rejected_ids")]  # pair i: 2i, 2i+1
    return score_sequences(acc, seqlogp, ref, seqs, pad_id, 2 * batch_size).view(len(pairs), 2)


def preference_loss(c: DPOConfig, pc, pr, rc, rr, n_chosen, n_rejected):
    """The configured loss on summed log-probs (B,); IPO divides each log-ratio by its response length."""
    if c.loss_type == "sigmoid":
        return sigmoid_dpo_loss(pc, pr, rc, rr, c.beta)
    if c.loss_type == "conservative":
        return conservative_dpo_loss(pc, pr, rc, rr, c.beta, c.label_smoothing)
    return ipo_loss(pc, pr, rc, rr, c.beta, n_chosen, n_rejected)


def micro_step(c: DPOConfig, acc, model, ref_fn, batch, n_tok_mini: int, scale: float):
    """Forward, loss and backward of one micro batch; returns the detached per-pair sums to log.

    ref_fn(batch) -> reference log-probs (2B,). The DPO term is a mean over the B pairs: every micro batch has B
    pairs, so accelerate's /accum and DDP's mean over ranks make it the mean over the mini batch. The NLL term is
    divided by the chosen tokens of the whole mini batch and multiplied by `scale` = ranks x accum to undo both."""
    with acc.autocast():
        logps = model(**batch)  # (2B,) chosen then rejected
    pc, pr = logps.float().chunk(2)
    rc, rr = ref_fn(batch).float().chunk(2)
    n_resp = (batch["labels"] != -100).sum(-1)  # (2B,) response tokens
    n_c, n_r = n_resp.chunk(2)
    loss, stats = preference_loss(c, pc, pr, rc, rr, n_c, n_r)
    total = loss
    if c.sft_coef > 0:
        total = loss + c.sft_coef * chosen_nll_loss(pc, n_tok_mini) * scale
    acc.backward(total)
    B = pc.shape[0]
    return torch.tensor([loss.item() * B, -pc.sum().item(), stats["accuracy"].item() * B,
                         stats["chosen_reward"].item() * B, stats["rejected_reward"].item() * B,
                         stats["margin"].item() * B], dtype=torch.float64)


def build_pairs(c: DPOConfig, tokenizer) -> tuple[list[dict], str]:
    from data.datasets import build_preference_examples, load_records

    pairs, reports = [], []
    for path in c.train_files:
        records, _ = load_records(path, kind="preference")
        ex, report = build_preference_examples(records, tokenizer, c.seq_len, truncation=c.truncation)
        pairs += ex
        reports.append(f"{path}: {report.summary()}")
    return pairs, "\n".join(reports)


def check_start(c: DPOConfig) -> None:
    """Phase 0, before the accelerator and any model: output_dir, the model folder (or init_config) and every pair
    file (read and validated once; build_pairs takes the result). A mistake here fails in seconds."""
    from common.preflight import check_trainer_start
    from data.datasets import check_records

    check_trainer_start(c)
    for path in c.train_files:
        check_records(path, kind="preference")


def setup_reference(c: DPOConfig, acc, policy: SequenceLogprobs, pairs: list[dict], pad_id: int,
                    saved_cache: torch.Tensor | None, resumed: bool):
    """-> (cache (N, 2) or None, ref_fn(micro, batch) -> reference summed log-probs (2B,) [chosen, rejected]).

    The reference is the starting model. LoRA: the policy with its adapter disabled (no second copy). Full
    finetuning: the policy itself before its first step (the table of a fresh run), else a frozen copy built from
    model_path / init_config (reference 'online', or a resumed run whose checkpoint holds no table)."""
    cache = saved_cache if c.reference == "cached" else None
    ref = None
    if not hasattr(policy.lm, "peft_config") and (c.reference == "online" or (cache is None and resumed)):
        lm = build_base_model(c, c.model_path).requires_grad_(False).eval()
        ref = SequenceLogprobs(lm, c.chunk_size).to(acc.device)
    if c.reference == "cached" and cache is None:
        cache = cache_reference(acc, policy, ref, pairs, pad_id, c.ref_batch_size)  # (N, 2)
        ref = None  # the table replaces the model

    def ref_fn(micro: list[int], batch: dict) -> torch.Tensor:
        if cache is not None:
            return torch.cat([cache[micro, 0], cache[micro, 1]]).to(acc.device)  # (2B,)
        with reference_mode(policy, ref) as net, acc.autocast():
            return net(**batch)

    return cache, ref_fn


# ----------------------------------------------------------------------------------------------------------------
def train(c: DPOConfig) -> list[float]:
    """Run DPO as configured; returns the mini-batch losses of the steps run by this call."""
    from tqdm.auto import tqdm

    from common.guard import check_finite
    from common.loop import (batch_words, begin_run, check_warmup, full_weights, mini_batch_rows,
                             rank_micro_batches, restore_run_state, steps_per_epoch, unwrap_model)
    from common.metrics import plot_metrics
    from common.optim import build_adamw, warmup_cosine
    from common.preflight import check_vocab

    # 0. checks that need no model (paths, data files): seconds
    check_start(c)

    # 1. accelerator, run folder (lock, run id, config check, resume point), seed
    acc, run = begin_run(c, "dpo")
    out, W, rank, resume_dir = run.out, acc.num_processes, acc.process_index, run.resume_dir

    # 2. tokenizer and pairs (every rank builds the same list; the batch plan picks each rank's share)
    tokenizer = load_chat_tokenizer(c.tokenizer, c.model_path, "dpo", acc.is_main_process)
    check_vocab(tokenizer, c.model_path or c.init_config, "model_path" if c.model_path else "init_config",
                c.tokenizer)  # from config.json, before the model loads
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs, report = build_pairs(c, tokenizer)
    mini = c.micro_batch_size_per_rank * c.grad_accum_steps * W
    spe = steps_per_epoch(len(pairs), mini, source=", ".join(c.train_files), batch=batch_words(c, W))
    total = c.max_steps or c.num_epochs * spe
    check_warmup(c.warmup_steps, total)

    # 3. policy, optimizer, schedule
    lm = build_model(c, resume_dir)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab is "
                          f"{lm.get_input_embeddings().num_embeddings}")
    is_lora = hasattr(lm, "peft_config")
    optimizer = build_adamw(lm, c.lr, c.betas, c.eps, c.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, c.warmup_steps, total, c.min_lr_ratio))
    model, optimizer = acc.prepare(SequenceLogprobs(lm, c.chunk_size), optimizer)  # scheduler stays ours
    policy = unwrap_model(acc, model)

    # 4. resume: optimizer, scheduler, RNG, the cached reference table; the data position is the step
    start, state = 0, {}
    if resume_dir is not None:
        state = restore_run_state(acc, resume_dir, optimizer, scheduler, "n_pairs", len(pairs))
        start = state["step"]

    # 5. reference: cached table (computed before the first optimizer step) or a forward per micro batch
    cache, ref_fn = setup_reference(c, acc, policy, pairs, pad_id, state.get("ref_logps"), start > 0)

    if acc.is_main_process:
        print(f"[dpo] {report}\n[dpo] {len(pairs)} pairs, mini batch {mini}, steps {start}->{total}, ranks {W}, "
              f"loss {c.loss_type} beta {c.beta}, reference {c.reference}{' (LoRA: adapter disabled)' * is_lora}, "
              f"precision {acc.mixed_precision}, resume from {resume_dir}", flush=True)
    log = run.metrics()  # resuming: cut back to the rows logged before the checkpoint
    stop = min(total, c.stop_at_step or total)
    losses = []

    def checkpoint(step):
        return run.save(acc, step, lambda d: save_model(policy.lm, d, tokenizer), optimizer, scheduler,
                        {"step": step, "n_pairs": len(pairs), "ref_logps": cache}, c.keep_last)

    # 6. train
    bar = tqdm(total=total, initial=start, desc="dpo", disable=not acc.is_main_process, dynamic_ncols=True)
    for step in range(start, stop):
        t0 = time.perf_counter()
        idx = mini_batch_rows(step, len(pairs), mini, c.seed)
        n_tok = sum(len(pairs[i]["chosen_ids"]) for i in idx)  # chosen tokens of the GLOBAL mini batch
        seq_tok = sum(2 * len(pairs[i]["prompt_ids"]) + len(pairs[i]["chosen_ids"]) + len(pairs[i]["rejected_ids"])
                      for i in idx)  # every token of the mini batch's 2 x pairs sequences (padding not counted)
        sums = torch.zeros(6, dtype=torch.float64)
        for micro in rank_micro_batches(idx, c.micro_batch_size_per_rank, c.grad_accum_steps, W, rank):
            batch = {k: v.to(acc.device) for k, v in pair_batch([pairs[i] for i in micro], pad_id).items()}
            with acc.accumulate(model):
                sums += micro_step(c, acc, model, lambda b, m=micro: ref_fn(m, b), batch, n_tok,
                                   scale=W * c.grad_accum_steps)
        sums = acc.reduce(sums.to(acc.device), "sum").cpu()
        dpo_loss, acc_val, r_c, r_r, margin = (sums[[0, 2, 3, 4, 5]] / mini).tolist()
        nll = float(sums[1]) / max(n_tok, 1)
        loss = dpo_loss + c.sft_coef * nll

        # 7. NaN guard, clip, step, log, checkpoint
        check_finite(step + 1, {"loss": loss}, run.last_ckpt)
        grad_norm = acc.clip_grad_norm_(model.parameters(), c.grad_clip if c.grad_clip > 0 else math.inf)
        check_finite(step + 1, {"grad_norm": grad_norm}, run.last_ckpt)
        lr = scheduler.get_last_lr()[0]
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
        run.check_weights(acc, step + 1, optimizer)
        losses.append(loss)
        if (step + 1) % c.log_every == 0 or step + 1 == stop:
            log.log(step + 1, {"loss": loss, "dpo_loss": dpo_loss, "chosen_nll": nll, "accuracy": acc_val,
                               "chosen_reward": r_c, "rejected_reward": r_r, "margin": margin, "lr": lr,
                               "grad_norm": float(grad_norm), "pairs_per_s": mini / (time.perf_counter() - t0),
                               "tokens_per_s": seq_tok / (time.perf_counter() - t0)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc_val:.2f}", margin=f"{margin:.3f}")
        if (c.save_every and (step + 1) % c.save_every == 0) or step + 1 == stop:
            checkpoint(step + 1)
    bar.close()

    # 8. final HF model (LoRA merged) and the curves
    if stop == total:
        with full_weights(acc, stage_dir=out):  # ZeRO-3: every rank gathers, bucket by bucket; the main process writes
            if acc.is_main_process:
                with run.writing("the final model"):
                    save_model(policy.lm, out / "final", tokenizer, merge=True)
                    plot_metrics(out / "metrics.jsonl", out / "curves.png", ["loss", "accuracy", "margin"],
                                 title="DPO")
                print(f"[dpo] done: final model in {out / 'final'}, curves in {out / 'curves.png'}", flush=True)
    log.close()
    run.end(acc, finished=stop == total)  # waits for every rank; marks the run finished, frees the folder
    return losses


def main(argv: list[str] | None = None) -> None:
    run_main(DPOConfig, train, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
