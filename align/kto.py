"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on thumbs-up / thumbs-down ratings, from an SFT model.

    accelerate launch align/kto.py --config configs/kto.yaml [--field value ...]
    python align/kto.py --config configs/kto.yaml

Data: `unpaired.jsonl` as `python -m data.feedback` writes it, or any TRL unpaired file ({"prompt", "completion",
"label": true/false}, conversational or standard strings: a string prompt is one user turn, ChatML as everywhere
here); a preference file (prompt/chosen/rejected) is unpaired into one desirable and one undesirable row.

The loop, in numbered phases:
  1. config, accelerator, seed, resume point     2. tokenizer and rows (data.datasets.build_unpaired_examples)
  3. policy (custom or transformers; optional LoRA), optimizer, warmup+cosine schedule    4. resume
  5. reference: summed completion log-probs computed once before training and cached (default, saved in each
     checkpoint), or a reference forward per micro batch; with LoRA the reference is the base model with the
     adapter disabled, so no second copy of the weights is held
  6. each step: the KL reference point z0 from mismatched pairs (below), then per micro batch the policy forward,
     the KTO loss (align.kto_losses) and backward
  7. NaN guard, clip, optimizer step, log, checkpoint    8. final HF model (LoRA merged) + curves
Mismatched pairs: the mini batch's rows in plan order, each prompt paired with the previous row's completion (the
first with the last's), the paper's and TRL's shifted completions. z0 = max(0, mean log-ratio of those pairs over
the WHOLE mini batch: every micro batch and rank), detached. TRL takes one z0 per micro batch (averaged over ranks);
with one micro batch per rank and one rank the two are identical. Here the estimate uses all micro x accum x ranks
pairs, does not depend on how the mini batch is split (2 ranks = 1 process exactly), and works with micro batches
of 1 row (TRL refuses those: its pairs would be matched).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from align.kto_losses import kl_reference_point, kto_loss, weight_advice
from align.models import LORA_TARGETS, build_base_model, build_model, save_model
from align.sequences import SequenceLogprobs, reference_mode, score_sequences, sequence_batch
from common.config import ConfigError, InputError, cfg
from common.run import RUN_CONTROL, run_main
from data.template import load_chat_tokenizer
from data.tokenizer import load_tokenizer  # noqa: F401  (used by tests)


@dataclass
class KTOConfig:
    # --- model (the policy starts from, and the reference is, this model) ---
    model_path: Optional[str] = cfg(None, "HF causal-LM folder to start from: the SFT model (Qwen2ForCausalLM, "
                                          "or any causal LM with model_impl=hf)")
    init_config: Optional[str] = cfg(None, "instead of model_path: a Qwen2 config.json for a randomly initialised "
                                           "custom model (demos, no hub)")
    model_impl: str = cfg("custom", "'custom' = model.qwen (Qwen2 folders), 'hf' = transformers AutoModelForCausalLM")
    tokenizer: Optional[str] = cfg(None, "None = the model folder's own (its vocabulary, special tokens and chat "
                                         "template); or 'qwen2', 'small' (tiny test BPE), 'demo' or a tokenizer "
                                         "folder (needed with init_config)")
    dropout: float = cfg(0.0, "dropout while training; the reference and the KL pairs are scored without dropout")
    gradient_checkpointing: bool = cfg(False, "recompute activations in the backward to save memory")
    # --- LoRA (peft); the reference is then the base model with the adapter disabled ---
    lora_r: int = cfg(0, "LoRA rank; 0 = full finetuning")
    lora_alpha: float = cfg(16.0, "LoRA scaling alpha")
    lora_dropout: float = cfg(0.0, "dropout on the LoRA input")
    lora_target_modules: list[str] = cfg(LORA_TARGETS, "module names that get LoRA adapters")
    # --- data ---
    train_files: list[str] = cfg([], "rated replies: unpaired.jsonl from data.feedback or TRL unpaired records "
                                     "(prompt/completion/label); preference files are split into both labels",
                                 required=True)
    seq_len: int = cfg(2048, "longest prompt + completion in tokens")
    truncation: str = cfg("drop", "rows longer than seq_len: 'drop' or 'truncate' (the prompt is cut from the left)")
    # --- loss (KTO paper: beta 0.1, lambda_D = lambda_U = 1 for balanced data) ---
    beta: float = cfg(0.1, "how far the policy may move from the reference: the slope of the sigmoid value function")
    desirable_weight: float = cfg(1.0, "lambda_D, weight of the thumbs-up rows; keep lambda_D n_D / lambda_U n_U in "
                                       "[1, 4/3] (the run warns otherwise and names the range)")
    undesirable_weight: float = cfg(1.0, "lambda_U, weight of the thumbs-down rows (raise it when they are scarce)")
    # --- reference ---
    reference: str = cfg("cached", "'cached': reference log-probs of every row and of every step's mismatched pairs "
                                   "computed before training; 'online': a reference forward per micro batch")
    ref_batch_size: int = cfg(8, "sequences per forward when caching the reference log-probs")
    # --- batch (mini batch = micro x grad_accum x ranks; counted in rows) ---
    micro_batch_size_per_rank: int = cfg(4, "rows per forward/backward on each rank (also one KL forward each)")
    grad_accum_steps: int = cfg(8, "micro batches per optimizer step on each rank (32 rows with 1 rank, KTO paper)")
    # --- optimisation ---
    lr: float = cfg(5e-6, "peak learning rate (KTO paper: about 5e-6 at beta 0.1, 2-10x DPO's)")
    min_lr_ratio: float = cfg(1.0, "final LR of the cosine decay as a fraction of lr; 1.0 = constant after warmup")
    warmup_steps: int = cfg(150, "linear warmup steps")
    max_steps: Optional[int] = cfg(None, "optimizer steps; None = num_epochs passes over the rows")
    num_epochs: int = cfg(1, "passes over the rows when max_steps is None")
    betas: tuple[float, float] = cfg((0.9, 0.95), "AdamW betas")
    eps: float = cfg(1e-8, "AdamW epsilon")
    weight_decay: float = cfg(0.0, "AdamW weight decay (not on biases and norms)")
    grad_clip: float = cfg(1.0, "max global gradient norm; 0 = no clipping")
    precision: str = cfg("auto", "'auto' (bf16 on a GPU that has it, else fp32), 'bf16' or 'fp32'")
    chunk_size: int = cfg(64, "rows of logits per chunk in the log-prob kernel (memory vs speed)")
    # --- run ---
    output_dir: str = cfg("runs/kto", "checkpoints, metrics.jsonl, tb/, curves.png and the final model go here")
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
        if self.reference not in ("cached", "online"):
            raise ConfigError(f"reference must be 'cached' or 'online', got {self.reference!r}")
        if self.precision not in ("auto", "bf16", "fp32") or self.truncation not in ("drop", "truncate"):
            raise ConfigError(f"precision must be auto/bf16/fp32 and truncation drop/truncate, got "
                              f"{self.precision!r}, {self.truncation!r}")
        for name in ("seq_len", "micro_batch_size_per_rank", "grad_accum_steps", "num_epochs", "keep_last",
                     "log_every", "chunk_size", "ref_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.beta <= 0 or self.lr <= 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ConfigError("need beta > 0, lr > 0, grad_clip >= 0 and warmup_steps >= 0")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ConfigError(f"desirable_weight and undesirable_weight must be > 0, got {self.desirable_weight}, "
                              f"{self.undesirable_weight}")
        if self.lora_r < 0 or not 0 <= self.dropout < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("need lora_r >= 0, 0 <= dropout < 1 and 0 <= min_lr_ratio <= 1")


# ----------------------------------------------------------------------------------------------------------------
# Pieces used by the loop.

def build_rows(c: KTOConfig, tokenizer) -> tuple[list[dict], str]:
    """[{prompt_ids, completion_ids, label}] of every file (a preference record gives a desirable and an
    undesirable row) and a report per file."""
    from data.datasets import build_unpaired_examples, load_records, preference_parts

    rows, reports = [], []
    for path in c.train_files:
        records, kind = load_records(path)
        if kind == "preference":
            records = [{"prompt": p, "completion": [reply], "label": label} for p, chosen, rejected in
                       map(preference_parts, records) for reply, label in ((chosen, True), (rejected, False))]
        elif kind != "unpaired":
            raise InputError(f"{path}: holds {kind} records; KTO needs rated replies {{prompt, completion, label}} "
                             f"(unpaired.jsonl from `python -m data.feedback`) or preference pairs")
        ex, report = build_unpaired_examples(records, tokenizer, c.seq_len, truncation=c.truncation)
        rows += ex
        reports.append(f"{path}: {kind} records, {report.summary()}")
    return rows, "\n".join(reports)


def check_start(c: KTOConfig) -> None:
    """Phase 0, before the accelerator and any model: output_dir, the model folder (or init_config) and every file
    of ratings (read and validated once; build_rows takes the result). A mistake here fails in seconds."""
    from common.preflight import check_trainer_start
    from data.datasets import check_records

    check_trainer_start(c)
    for path in c.train_files:
        _, kind = check_records(path)
        if kind not in ("unpaired", "preference"):
            raise InputError(f"{path}: holds {kind} records; KTO needs rated replies {{prompt, completion, label}} "
                             f"(unpaired.jsonl from `python -m data.feedback`) or preference pairs")


def kl_donors(idx: list[int]) -> dict[int, int]:
    """Mismatched pairs of one mini batch: row idx[j] is paired with the completion of idx[j - 1] (idx[0] with the
    last), TRL's shift by one. Row ids of a mini batch are distinct (a slice of a permutation)."""
    return {r: idx[j - 1] for j, r in enumerate(idx)}


def kl_sequences(rows: list[dict], micro: list[int], donors: dict[int, int]) -> list[tuple[list[int], list[int]]]:
    return [(rows[r]["prompt_ids"], rows[donors[r]]["completion_ids"]) for r in micro]


def matched_sequences(rows: list[dict], micro: list[int]) -> list[tuple[list[int], list[int]]]:
    return [(rows[r]["prompt_ids"], rows[r]["completion_ids"]) for r in micro]


def setup_reference(c: KTOConfig, acc, policy: SequenceLogprobs, rows: list[dict], plan, total: int, pad_id: int,
                    saved: dict | None, resumed: bool):
    """-> (cache or None, ref_fn(step, micro, kind, batch) -> reference summed log-probs (B,)).

    cache = {"rows": (N,) of every row, "kl": (total, mini) of step s's mismatched pairs in plan order}. The
    reference is the starting model: with LoRA the policy with its adapter disabled; full finetuning the policy
    itself before its first step (the table of a fresh run), else a frozen copy built from model_path /
    init_config (reference 'online', or a resumed run whose checkpoint holds no table for this run)."""
    mini = len(plan(0))
    cache = saved if c.reference == "cached" else None
    if cache is not None and tuple(cache["kl"].shape) != (total, mini):
        cache = None  # the run got longer or the batch changed: score again
    ref = None
    if not hasattr(policy.lm, "peft_config") and (c.reference == "online" or (cache is None and resumed)):
        lm = build_base_model(c, c.model_path).requires_grad_(False).eval()
        ref = SequenceLogprobs(lm, c.chunk_size).to(acc.device)
    if c.reference == "cached" and cache is None:
        seqs = matched_sequences(rows, list(range(len(rows))))
        for s in range(total):
            idx = plan(s)
            seqs += kl_sequences(rows, idx, kl_donors(idx))
        scored = score_sequences(acc, policy, ref, seqs, pad_id, c.ref_batch_size)
        cache = {"rows": scored[:len(rows)], "kl": scored[len(rows):].view(total, mini)}
        ref = None  # the table replaces the model

    def ref_fn(step: int, micro: list[int], kind: str, batch: dict) -> torch.Tensor:
        if cache is not None:
            if kind == "rows":
                return cache["rows"][micro].to(acc.device)
            where = {r: j for j, r in enumerate(plan(step))}
            return cache["kl"][step, [where[r] for r in micro]].to(acc.device)
        with reference_mode(policy, ref) as net, acc.autocast():
            return net(**batch)

    return cache, ref_fn


def reference_point(acc, policy, ref_fn, rows, step: int, micros: list[list[int]], donors, pad_id: int):
    """z0 of one step: every rank scores the mismatched pairs of its micro batches with the policy (eval mode, no
    gradient) and the reference; the log-ratios of the whole mini batch are gathered and averaged (float64).
    Returns (z0, a 0-dim fp32 tensor, and the mean log-ratio before the clamp at 0, a float to log)."""
    from common.loop import gather_lists

    pol, ref = [], []
    for micro in micros:
        batch = {k: v.to(acc.device) for k, v in sequence_batch(kl_sequences(rows, micro, donors), pad_id).items()}
        with reference_mode(policy, policy) as net, acc.autocast():  # the policy itself: eval, no grad, adapter on
            pol.append(net(**batch).float().cpu())
        ref.append(ref_fn(step, micro, "kl", batch).float().cpu())
    shares = gather_lists(acc, [(torch.cat(pol), torch.cat(ref))])  # one (n_rank,) pair per rank, rank order
    pol_all, ref_all = (torch.cat(x) for x in zip(*shares))  # (mini,) each
    return kl_reference_point(pol_all, ref_all), float((pol_all.double() - ref_all.double()).mean())


def micro_step(c: KTOConfig, acc, model, ref_fn, step: int, micro: list[int], rows, z0, pad_id: int):
    """Forward, loss and backward of one micro batch; returns the detached sums to log. The loss is a mean over the
    B rows: every micro batch has B rows, so accelerate's /accum and DDP's mean over ranks make it the mean over
    the mini batch."""
    batch = {k: v.to(acc.device) for k, v in sequence_batch(matched_sequences(rows, micro), pad_id).items()}
    desirable = torch.tensor([rows[r]["label"] for r in micro], device=acc.device)
    with acc.autocast():
        logps = model(**batch)  # (B,)
    loss, stats = kto_loss(logps, ref_fn(step, micro, "rows", batch), desirable, z0.to(acc.device), c.beta,
                           c.desirable_weight, c.undesirable_weight)
    acc.backward(loss)
    d, r, lp = desirable.float(), stats["reward"], logps.detach().float()
    return torch.tensor([loss.item() * len(micro), float(d.sum()), float((r * d).sum()), float((r * (1 - d)).sum()),
                         float((lp * d).sum()), float((lp * (1 - d)).sum())], dtype=torch.float64)


def log_values(sums: torch.Tensor, mini: int) -> dict[str, float]:
    """Mini-batch metrics from the summed micro-batch stats (TRL's names in comments)."""
    loss, n_d, r_d, r_u, lp_d, lp_u = sums.tolist()
    n_u = mini - n_d
    out = {"loss": loss / mini, "desirable_share": n_d / mini}
    if n_d:
        out |= {"reward_desirable": r_d / n_d, "logp_desirable": lp_d / n_d}  # rewards/chosen, logps/chosen
    if n_u:
        out |= {"reward_undesirable": r_u / n_u, "logp_undesirable": lp_u / n_u}  # rewards/rejected
    if n_d and n_u:
        out["margin"] = out["reward_desirable"] - out["reward_undesirable"]  # rewards/margins
    return out


# ----------------------------------------------------------------------------------------------------------------
def train(c: KTOConfig) -> list[float]:
    """Run KTO as configured; returns the mini-batch losses of the steps run by this call."""
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
    acc, run = begin_run(c, "kto")
    out, W, rank, resume_dir = run.out, acc.num_processes, acc.process_index, run.resume_dir

    # 2. tokenizer and rows (every rank builds the same list; the batch plan picks each rank's share)
    tokenizer = load_chat_tokenizer(c.tokenizer, c.model_path, "kto", acc.is_main_process)
    check_vocab(tokenizer, c.model_path or c.init_config, "model_path" if c.model_path else "init_config",
                c.tokenizer)  # from config.json, before the model loads
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, report = build_rows(c, tokenizer)
    mini = c.micro_batch_size_per_rank * c.grad_accum_steps * W
    if mini < 2:
        raise ConfigError("KTO estimates its KL reference point from mismatched pairs within the mini batch: need "
                          "micro_batch_size_per_rank x grad_accum_steps x ranks >= 2")
    spe = steps_per_epoch(len(rows), mini, source=", ".join(c.train_files), batch=batch_words(c, W))
    total = c.max_steps or c.num_epochs * spe
    check_warmup(c.warmup_steps, total)
    plan = lambda s: mini_batch_rows(s, len(rows), mini, c.seed)  # noqa: E731  rows of step s, a pure function
    n_d = sum(r["label"] for r in rows)
    advice = weight_advice(n_d, len(rows) - n_d, c.desirable_weight, c.undesirable_weight)

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

    # 4. resume: optimizer, scheduler, RNG, the cached reference tables; the data position is the step
    start, state = 0, {}
    if resume_dir is not None:
        state = restore_run_state(acc, resume_dir, optimizer, scheduler, "n_rows", len(rows))
        start = state["step"]

    # 5. reference: cached tables (computed before the first optimizer step) or a forward per micro batch
    cache, ref_fn = setup_reference(c, acc, policy, rows, plan, total, pad_id, state.get("ref_logps"), start > 0)

    if acc.is_main_process:
        print(f"[kto] {report}\n[kto] {len(rows)} rows ({n_d} desirable, {len(rows) - n_d} undesirable), mini batch "
              f"{mini}, steps {start}->{total}, ranks {W}, beta {c.beta}, weights {c.desirable_weight}/"
              f"{c.undesirable_weight}, reference {c.reference}{' (LoRA: adapter disabled)' * is_lora}, "
              f"precision {acc.mixed_precision}, resume from {resume_dir}", flush=True)
        if advice:
            print(f"[kto] warning: {advice}", flush=True)
    log = run.metrics()  # resuming: cut back to the rows logged before the checkpoint
    stop = min(total, c.stop_at_step or total)
    losses = []

    def checkpoint(step):
        return run.save(acc, step, lambda d: save_model(policy.lm, d, tokenizer), optimizer, scheduler,
                        {"step": step, "n_rows": len(rows), "ref_logps": cache}, c.keep_last)

    # 6. train: z0 from the step's mismatched pairs, then the micro batches
    bar = tqdm(total=total, initial=start, desc="kto", disable=not acc.is_main_process, dynamic_ncols=True)
    for step in range(start, stop):
        t0 = time.perf_counter()
        idx = plan(step)
        micros = rank_micro_batches(idx, c.micro_batch_size_per_rank, c.grad_accum_steps, W, rank)
        z0, kl_raw = reference_point(acc, policy, ref_fn, rows, step, micros, kl_donors(idx), pad_id)
        sums = torch.zeros(6, dtype=torch.float64)
        for micro in micros:
            with acc.accumulate(model):
                sums += micro_step(c, acc, model, ref_fn, step, micro, rows, z0, pad_id)
        m = log_values(acc.reduce(sums.to(acc.device), "sum").cpu(), mini)

        # 7. NaN guard, clip, step, log, checkpoint
        check_finite(step + 1, {"loss": m["loss"]}, run.last_ckpt)
        grad_norm = acc.clip_grad_norm_(model.parameters(), c.grad_clip if c.grad_clip > 0 else math.inf)
        check_finite(step + 1, {"grad_norm": grad_norm}, run.last_ckpt)
        lr = scheduler.get_last_lr()[0]
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
        run.check_weights(acc, step + 1, optimizer)
        losses.append(m["loss"])
        if (step + 1) % c.log_every == 0 or step + 1 == stop:
            log.log(step + 1, {**m, "kl": float(z0), "kl_raw": kl_raw, "lr": lr, "grad_norm": float(grad_norm),
                               "rows_per_s": mini / (time.perf_counter() - t0)})
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}", kl=f"{float(z0):.3f}", margin=f"{m.get('margin', 0.0):.3f}")
        if (c.save_every and (step + 1) % c.save_every == 0) or step + 1 == stop:
            checkpoint(step + 1)
    bar.close()

    # 8. final HF model (LoRA merged) and the curves
    if stop == total:
        with full_weights(acc, stage_dir=out):  # ZeRO-3: every rank gathers, bucket by bucket; the main process writes
            if acc.is_main_process:
                with run.writing("the final model"):
                    save_model(policy.lm, out / "final", tokenizer, merge=True)
                    plot_metrics(out / "metrics.jsonl", out / "curves.png", ["loss", "margin", "kl"], title="KTO")
                print(f"[kto] done: final model in {out / 'final'}, curves in {out / 'curves.png'}", flush=True)
    log.close()
    run.end(acc, finished=stop == total)  # waits for every rank; marks the run finished, frees the folder
    return losses


def main(argv: list[str] | None = None) -> None:
    run_main(KTOConfig, train, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
