"""Reward-model training (Qwen report sec. 3.2.1): one trainer, two stages as configs.

    accelerate launch reward/train.py --config configs/reward_pmp.yaml   # PMP on large noisy comparisons
    accelerate launch reward/train.py --config configs/reward_ft.yaml    # finetune from the PMP model

Stage 1, preference-model pretraining (PMP), starts from the same-size language model (backbone + a fresh scalar
head); stage 2 finetunes the PMP model on the clean comparisons. Recipe defaults: constant LR, one epoch, batch 64,
sequence length 2048. The loop, in numbered phases:
  1. config, accelerator, seed    2. tokenizer and pairs (sequences end with <|reward|>)
  3. model, optimizer, schedule   4. resume    5. train: -log sigmoid(r_chosen - r_rejected), mean over pairs
  6. NaN guard, clip, step, log, checkpoint    7. eval accuracy, normalisation stats, final model + curves
"""

from __future__ import annotations

import math
import os
import sys

if __name__ == "__main__" and os.path.dirname(os.path.abspath(__file__)) == os.path.abspath(sys.path[0]):
    sys.path.pop(0)  # run as `python reward/train.py`: reward/model.py must not shadow the top-level `model` package
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from common.config import ConfigError, cfg
from common.run import RUN_CONTROL, run_main
from reward.losses import pairwise_loss
from data.template import load_chat_tokenizer
from reward.model import (STATS_FILE, add_reward_token, fit_embeddings, load_reward_model, normalisation_stats,
                          pair_scores, reward_token_id, score_pairs)


@dataclass
class RewardConfig:
    # --- model ---
    model_path: str = cfg("", "PMP: the same-size causal-LM folder; finetune: the PMP reward-model folder",
                          required=True)
    model_impl: str = cfg("custom", "'custom' = model.qwen (Qwen2/Qwen3 folders), 'hf' = any transformers backbone "
                                    "(AutoModelForSequenceClassification, e.g. Llama, GPT-NeoX, GPT-2)")
    tokenizer: Optional[str] = cfg(None, "None = the model folder's own (vocabulary, special tokens, chat template); "
                                         "or 'qwen2', 'small' (tiny test BPE), 'demo' or a tokenizer folder. "
                                         "<|reward|> is added if it lacks it (the saved tokenizer = this one + "
                                         "<|reward|>)")
    head_seed: int = cfg(0, "seed of the fresh scalar head when model_path is a causal LM")
    gradient_checkpointing: bool = cfg(False, "recompute activations in the backward to save memory")
    sparse_embedding_grad: bool = cfg(True, "embedding gradient as sparse rows; clipping and AdamW touch only the "
                                            "rows that move (exact, faster and smaller with a large vocab; ignored "
                                            "under DeepSpeed)")
    # --- data ---
    train_files: list[str] = cfg([], "preference files (prompt/chosen/rejected JSONL, JSON, parquet, arrow)",
                                 required=True)
    eval_files: list[str] = cfg([], "held-out preference files: accuracy and margin logged at eval_every and the end")
    norm_files: list[str] = cfg([], "reference set for the score mean/std saved for PPO; empty = eval_files")
    norm_max_pairs: int = cfg(1000, "at most this many reference pairs (their chosen and rejected scores)")
    seq_len: int = cfg(2048, "longest prompt + response in tokens (sec. 3.2.1)")
    truncation: str = cfg("drop", "pairs longer than seq_len: 'drop' or 'truncate' (the prompt is cut from the left)")
    # --- batch (mini batch = micro x grad_accum x ranks) ---
    micro_batch_size_per_rank: int = cfg(8, "pairs per forward/backward on each rank")
    grad_accum_steps: int = cfg(8, "micro batches per optimizer step on each rank (8 x 8 = 64 pairs, sec. 3.2.1)")
    # --- optimisation ---
    lr: float = cfg(3e-6, "learning rate, constant after warmup (sec. 3.2.1)")
    warmup_steps: int = cfg(0, "linear warmup steps before the constant LR")
    num_epochs: int = cfg(1, "passes over the data (one epoch, sec. 3.2.1)")
    max_steps: Optional[int] = cfg(None, "optimizer steps; None = num_epochs passes over the data")
    margin: float = cfg(0.0, "required gap in -log sigmoid(r_c - r_r - margin); 0 = plain Bradley-Terry")
    betas: tuple[float, float] = cfg((0.9, 0.95), "AdamW betas")
    eps: float = cfg(1e-8, "AdamW epsilon")
    weight_decay: float = cfg(0.1, "AdamW weight decay (not on biases and norms)")
    grad_clip: float = cfg(1.0, "max global gradient norm; 0 = no clipping")
    precision: str = cfg("auto", "'auto' (bf16 on a GPU that has it, else fp32), 'bf16' or 'fp32'")
    # --- run ---
    output_dir: str = cfg("runs/reward", "checkpoints, metrics.jsonl, tb/, curves.png, final/ + reward_stats.json")
    report_to: str = cfg("tensorboard", "trackers besides metrics.jsonl (always written): comma-separated "
                                        "tensorboard, wandb, mlflow (or any accelerate tracker), or none")
    eval_every: int = cfg(0, "evaluate every this many steps; 0 = only at the end")
    eval_batch_size: int = cfg(8, "pairs per forward when evaluating")
    save_every: int = cfg(0, "checkpoint every this many steps; 0 = only at the end")
    keep_last: int = cfg(1, "complete checkpoints kept")
    resume: bool = cfg(True, "continue the run in output_dir from its latest checkpoint (the config must match); "
                             "false: start a new run (refused if output_dir holds one)")
    overwrite_output_dir: bool = cfg(False, "with resume false: delete the run already in output_dir first")
    stop_at_step: Optional[int] = cfg(None, "checkpoint and stop after this step (time-limited jobs)")
    log_every: int = cfg(1, "log metrics every this many steps")
    seed: int = cfg(0, "seed for the data order and dropout")

    # fields that may change when a run is resumed (when to save, log, evaluate midway or stop)
    RESUME_MAY_CHANGE = RUN_CONTROL + ("eval_every",)

    def validate(self):
        if self.model_impl not in ("custom", "hf"):
            raise ConfigError(f"model_impl must be 'custom' or 'hf', got {self.model_impl!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.truncation not in ("drop", "truncate"):
            raise ConfigError(f"truncation must be 'drop' or 'truncate', got {self.truncation!r}")
        for name in ("seq_len", "micro_batch_size_per_rank", "grad_accum_steps", "num_epochs", "keep_last",
                     "log_every", "eval_batch_size", "norm_max_pairs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.lr <= 0 or self.grad_clip < 0 or self.warmup_steps < 0 or self.margin < 0:
            raise ConfigError("need lr > 0, grad_clip >= 0, warmup_steps >= 0 and margin >= 0")
        if not (self.norm_files or self.eval_files):
            raise ConfigError("set norm_files (or eval_files) to compute the score mean/std PPO normalises with")


def build_pairs(files: list[str], tokenizer, c: RewardConfig) -> tuple[list[dict], str]:
    """Tokenised pairs whose full sequences end with <|reward|>, with the data layer's report per file."""
    from data.datasets import build_preference_examples, load_records

    pairs, reports = [], []
    for path in files:
        records, _ = load_records(path, kind="preference")
        ex, report = build_preference_examples(records, tokenizer, c.seq_len, reward_token=True,
                                               truncation=c.truncation)
        pairs += ex
        reports.append(f"{path}: {report.summary()}")
    return pairs, "\n".join(reports)


def check_start(c: RewardConfig) -> None:
    """Phase 0, before the accelerator and any model: output_dir, the model folder and every pair file (read and
    validated once; build_pairs takes the result). A mistake here fails in seconds."""
    from common.preflight import check_model_folder, check_output_dir
    from data.datasets import check_records

    check_output_dir(c.output_dir)
    check_model_folder(c.model_path, "model_path")
    for path in dict.fromkeys(c.train_files + c.eval_files + c.norm_files):
        check_records(path, kind="preference")


def evaluate(model, pairs: list[dict], pad_id: int, reward_id: int, batch_size: int, device) -> dict[str, float]:
    """Pairwise accuracy and mean margin on held-out pairs (model switched to eval mode and back)."""
    was_training = model.training
    model.eval()
    rc, rr = score_pairs(model, pairs, pad_id, reward_id, batch_size, device)
    model.train(was_training)
    _, stats = pairwise_loss(rc, rr)
    return {"eval_accuracy": stats["accuracy"].item(), "eval_margin": stats["margin"].item()}


def save_reward_model(model, path: Path, tokenizer, stats: dict | None = None) -> None:
    model.save_pretrained(path, tokenizer=tokenizer, extra_files={STATS_FILE: stats} if stats else None)


# ----------------------------------------------------------------------------------------------------------------
def train(c: RewardConfig) -> list[float]:
    """Run one reward-model stage as configured; returns the mini-batch losses of the steps run by this call."""
    from tqdm.auto import tqdm

    from common.guard import check_finite
    from common.loop import (batch_words, begin_run, check_warmup, mini_batch_rows, rank_micro_batches,
                             restore_run_state, steps_per_epoch, unwrap_model)
    from common.optim import build_adamw, clip_grad_norm_, constant_with_warmup, sparse_embedding_for
    from common.preflight import check_vocab

    # 0. checks that need no model (paths, data files): seconds
    check_start(c)

    # 1. accelerator, run folder (lock, run id, config check, resume point), seed
    acc, run = begin_run(c, "reward")
    out, W, rank, resume_dir = run.out, acc.num_processes, acc.process_index, run.resume_dir

    # 2. tokenizer and pairs (every rank builds the same list; the batch plan picks each rank's share)
    tokenizer = load_chat_tokenizer(c.tokenizer, c.model_path, "reward", acc.is_main_process)
    check_vocab(tokenizer, c.model_path, "model_path", c.tokenizer)  # config.json, before the model loads
    added = add_reward_token(tokenizer)  # Qwen2/2.5/3's own tokenizers lack it: one new special token
    reward_id = reward_token_id(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs, report = build_pairs(c.train_files, tokenizer, c)
    eval_pairs, eval_report = build_pairs(c.eval_files, tokenizer, c) if c.eval_files else ([], "")
    mini = c.micro_batch_size_per_rank * c.grad_accum_steps * W
    spe = steps_per_epoch(len(pairs), mini, source=", ".join(c.train_files), batch=batch_words(c, W))
    total = c.max_steps or c.num_epochs * spe
    check_warmup(c.warmup_steps, total)

    # 3. model (same-size LM backbone + fresh head, or the PMP model), optimizer, constant schedule
    model = load_reward_model(str(resume_dir / "model") if resume_dir else c.model_path, head_seed=c.head_seed,
                              impl=c.model_impl)
    try:
        vocab_note = fit_embeddings(model, tokenizer, reward_id, added)  # a new <|reward|> may need one more row
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if c.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    # sparse embedding rows: the optimizer and the clip touch only the rows that move (common.optim.RowSparseAdamW)
    sparse = sparse_embedding_for(model, c.sparse_embedding_grad, acc.distributed_type.value == "DEEPSPEED")
    use_sparse = sparse is not None
    optimizer = build_adamw(model, c.lr, c.betas, c.eps, c.weight_decay, sparse_embedding=sparse)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: constant_with_warmup(s, c.warmup_steps))
    model, optimizer = acc.prepare(model, optimizer)

    # 4. resume: optimizer, scheduler, RNG; the data position is the step
    start = 0
    if resume_dir is not None:
        state = restore_run_state(acc, resume_dir, optimizer, scheduler, "n_pairs", len(pairs))
        start = state["step"]
    if acc.is_main_process:
        if vocab_note:
            print(f"[reward] {vocab_note}", flush=True)
        print(f"[reward] {report}\n[reward] eval: {eval_report or 'none'}\n[reward] {len(pairs)} pairs, mini batch "
              f"{mini}, steps {start}->{total}, ranks {W}, precision {acc.mixed_precision}, resume from "
              f"{resume_dir}, model {c.model_path}", flush=True)
    log = run.metrics()  # resuming: cut back to the rows logged before the checkpoint (a final eval row too)
    stop = min(total, c.stop_at_step or total)
    losses = []

    def checkpoint(step):
        def write_model(d):
            save_reward_model(unwrap_model(acc, model), d, tokenizer)
        return run.save(acc, step, write_model, optimizer, scheduler, {"step": step, "n_pairs": len(pairs)},
                        c.keep_last)

    def run_eval(step):
        if eval_pairs:
            log.log(step, evaluate(unwrap_model(acc, model), eval_pairs, pad_id, reward_id, c.eval_batch_size,
                                   acc.device))

    # 5. train
    bar = tqdm(total=total, initial=start, desc="reward", disable=not acc.is_main_process, dynamic_ncols=True)
    for step in range(start, stop):
        t0 = time.perf_counter()
        idx = mini_batch_rows(step, len(pairs), mini, c.seed)
        sums = torch.zeros(4, dtype=torch.float64)  # loss, correct, margin sums over this rank's pairs; tokens
        for micro in rank_micro_batches(idx, c.micro_batch_size_per_rank, c.grad_accum_steps, W, rank):
            b = len(micro)
            with acc.accumulate(model):
                with acc.autocast():  # (b,) each; our model runs each pair's prompt once (reward.model)
                    rc, rr, tokens = pair_scores(model, [pairs[i] for i in micro], pad_id, reward_id, acc.device)
                loss, stats = pairwise_loss(rc, rr, c.margin or None)
                # every micro batch has b pairs, so accelerate's /accum and DDP's mean over ranks give the
                # mean over the global mini batch.
                acc.backward(loss)
            sums += torch.tensor([loss.item() * b, stats["accuracy"].item() * b, stats["margin"].item() * b,
                                  float(tokens)], dtype=torch.float64)
        sums = acc.reduce(sums.to(acc.device), "sum").cpu()
        loss_val, acc_val, margin_val = (sums[:3] / mini).tolist()

        # 6. NaN guard, clip, step, log, checkpoint
        check_finite(step + 1, {"loss": loss_val}, run.last_ckpt)
        max_norm = c.grad_clip if c.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm_(model.parameters(), max_norm) if use_sparse else \
            acc.clip_grad_norm_(model.parameters(), max_norm)
        if grad_norm is not None:  # None under DeepSpeed before its first step (it clips internally)
            check_finite(step + 1, {"grad_norm": grad_norm}, run.last_ckpt)
        lr = scheduler.get_last_lr()[0]
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
        run.check_weights(acc, step + 1, optimizer)
        losses.append(loss_val)
        if (step + 1) % c.log_every == 0 or step + 1 == stop:
            tps = float(sums[3]) / (time.perf_counter() - t0)
            gn = float("nan") if grad_norm is None else float(grad_norm)
            log.log(step + 1, {"loss": loss_val, "accuracy": acc_val, "margin": margin_val, "lr": lr,
                               "grad_norm": gn, "tokens_per_s": tps, "step_s": time.perf_counter() - t0})
        if c.eval_every and (step + 1) % c.eval_every == 0 and step + 1 < total:
            run_eval(step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.4f}", acc=f"{acc_val:.2f}")
        if (c.save_every and (step + 1) % c.save_every == 0) or step + 1 == stop:
            checkpoint(step + 1)
    bar.close()
    if stop == total:
        finish(c, acc, run, model, tokenizer, eval_pairs, pad_id, reward_id, total, out, run_eval)
    log.close()
    run.end(acc, finished=stop == total)  # waits for every rank; marks the run finished, frees the folder
    return losses


def finish(c, acc, run, model, tokenizer, eval_pairs, pad_id, reward_id, total, out, run_eval) -> None:
    """7. final eval, normalisation stats on the reference set, final model folder with reward_stats.json, curves."""
    from common.loop import full_weights, unwrap_model
    from common.metrics import plot_metrics

    run_eval(total)
    net = unwrap_model(acc, model).eval()
    norm_pairs = eval_pairs if not c.norm_files else build_pairs(c.norm_files, tokenizer, c)[0]
    norm_pairs = norm_pairs[:c.norm_max_pairs]
    rc, rr = score_pairs(net, norm_pairs, pad_id, reward_id, c.eval_batch_size, acc.device)
    stats = normalisation_stats(torch.cat([rc, rr])) | {"source": c.norm_files or c.eval_files}
    with full_weights(acc, stage_dir=out):  # ZeRO-3: every rank gathers, bucket by bucket; the main process writes
        if acc.is_main_process:
            with run.writing("the final model"):
                save_reward_model(net, out / "final", tokenizer, stats)
    if acc.is_main_process:
        keys = ["loss", "accuracy"] + (["eval_accuracy"] if eval_pairs else [])
        with run.writing("the curves"):
            plot_metrics(out / "metrics.jsonl", out / "curves.png", keys, title=f"reward model: {out.name}")
        print(f"[reward] done: model in {out / 'final'} (score mean {stats['mean']:.4f}, std {stats['std']:.4f}), "
              f"curves in {out / 'curves.png'}", flush=True)


def main(argv: list[str] | None = None) -> None:
    run_main(RewardConfig, train, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
