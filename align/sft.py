"""Supervised finetuning (Qwen report sec. 3.1): next-token loss on the learned tokens of ChatML conversations.

    accelerate launch align/sft.py --config configs/sft.yaml [--field value ...]
    python align/sft.py --config configs/sft.yaml

The loop, in numbered phases:
  1. config, accelerator, seed          2. tokenizer and data (masks + packing from data/)
  3. model (custom or transformers; optional LoRA), optimizer, warmup+cosine schedule
  4. resume from the latest checkpoint  5. train: micro batches -> token-mean NLL over the GLOBAL mini batch
  6. NaN guard, clip, optimizer step, log, checkpoint   7. final HF model + loss curve PNG
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from align.models import LORA_TARGETS, build_model, save_model
from common.config import ConfigError, InputError, cfg
from common.run import RUN_CONTROL, run_main
from data.template import load_chat_tokenizer
from data.tokenizer import load_tokenizer  # noqa: F401  (also used by tests)



@dataclass
class SFTConfig:
    # --- model ---
    model_path: Optional[str] = cfg(None, "HF causal-LM folder to start from (Qwen2; any causal LM with model_impl=hf)")
    init_config: Optional[str] = cfg(None, "or: a Qwen2 config.json for a randomly initialised model (demos)")
    model_impl: str = cfg("custom", "'custom' = model.qwen (Qwen2 folders), 'hf' = transformers AutoModelForCausalLM")
    tokenizer: Optional[str] = cfg(None, "None = the model folder's own (its vocabulary, special tokens and chat "
                                         "template); or 'qwen2' (real Qwen2 BPE), 'small' (tiny test BPE), 'demo' or "
                                         "a tokenizer folder (needed with init_config)")
    dropout: float = cfg(0.0, "train-time dropout (report: 0.1; hf models: attention only)")
    gradient_checkpointing: bool = cfg(False, "recompute activations in the backward to save memory")
    # --- LoRA (peft) ---
    lora_r: int = cfg(0, "LoRA rank; 0 = full finetuning")
    lora_alpha: float = cfg(16.0, "LoRA scaling alpha")
    lora_dropout: float = cfg(0.0, "dropout on the LoRA input")
    lora_target_modules: list[str] = cfg(LORA_TARGETS, "module names that get LoRA adapters")
    # --- data ---
    train_files: list[str] = cfg([], "SFT data files ({'messages': [...]} JSONL/JSON/parquet/arrow)", required=True)
    keep_negative: bool = cfg(False, "a file of rated replies (prompt/completion/label, data.feedback's "
                                     "unpaired.jsonl) is refused, since SFT would learn its thumbs-down replies too; "
                                     "true: read it anyway and learn only the thumbs-up replies (label true)")
    data_kind: str = cfg("sft", "'sft': conversations, loss on the masked-in tokens; 'text': plain text ({'text'}), "
                                "every token learned, packed (base-model pretraining / continued pretraining)")
    mask: str = cfg("all_assistant", "loss-mask strategy: all_assistant, last_assistant, qwen_finetune")
    seq_len: int = cfg(2048, "tokens per row: longest example and packed row length (sec. 3.1.2)")
    packing: bool = cfg(True, "pack several conversations per row; attention stays within each conversation")
    truncation: str = cfg("drop", "examples longer than seq_len: 'drop' or 'truncate' (data.datasets)")
    # --- batch (mini batch = micro x grad_accum x ranks) ---
    micro_batch_size_per_rank: int = cfg(1, "rows per forward/backward on each rank")
    grad_accum_steps: int = cfg(128, "micro batches per optimizer step on each rank (128 rows with 1 rank: sec. 3.1.2)")
    # --- optimisation (Qwen report sec. 3.1.2) ---
    lr: float = cfg(2e-6, "peak learning rate")
    min_lr_ratio: float = cfg(0.1, "final LR of the cosine decay, as a fraction of lr")
    warmup_steps: int = cfg(1430, "linear warmup steps (the report warms up over 1430 of 4000 steps)")
    max_steps: Optional[int] = cfg(4000, "optimizer steps; None = num_epochs passes over the data")
    num_epochs: int = cfg(1, "passes over the data when max_steps is None")
    betas: tuple[float, float] = cfg((0.9, 0.95), "AdamW betas")
    eps: float = cfg(1e-8, "AdamW epsilon")
    weight_decay: float = cfg(0.1, "AdamW weight decay (not on biases and norms)")
    grad_clip: float = cfg(1.0, "max global gradient norm; 0 = no clipping")
    sparse_embedding_grad: bool = cfg(True, "input-embedding gradient as sparse rows when the embedding is not tied "
                                            "to the output layer (full finetuning, not under DeepSpeed): clipping and "
                                            "AdamW touch only the rows that move (the same AdamW; faster, and the "
                                            "moments of rows never seen cost no memory)")
    precision: str = cfg("auto", "'auto' (bf16 on a GPU that has it, else fp32), 'bf16' or 'fp32'")
    chunk_size: Optional[int] = cfg(None, "rows of logits per chunk in the log-prob kernel (memory vs speed: a row "
                                          "is 151,936 fp32 logits, 0.6 MB); None = 2 x hidden size within [256, 512] "
                                          "(model.logprobs.auto_chunk)")
    # --- run ---
    output_dir: str = cfg("runs/sft", "checkpoints, metrics.jsonl, tb/, loss.png and the final model go here")
    report_to: str = cfg("tensorboard", "trackers besides metrics.jsonl (always written): comma-separated "
                                        "tensorboard, wandb, mlflow (or any accelerate tracker), or none")
    save_every: int = cfg(0, "checkpoint every this many steps; 0 = only at the end")
    keep_last: int = cfg(1, "complete checkpoints kept")
    resume: bool = cfg(True, "continue the run in output_dir from its latest checkpoint (the config must match); "
                             "false: start a new run (refused if output_dir holds one)")
    overwrite_output_dir: bool = cfg(False, "with resume false: delete the run already in output_dir first")
    stop_at_step: Optional[int] = cfg(None, "checkpoint and stop after this step; the LR schedule still spans max_steps")
    log_every: int = cfg(1, "log metrics every this many steps")
    seed: int = cfg(0, "seed for data order, model init and dropout")

    # fields that may change when a run is resumed (they only decide when to save, log or stop)
    RESUME_MAY_CHANGE = RUN_CONTROL

    def validate(self):
        if (self.model_path is None) == (self.init_config is None):
            raise ConfigError("set exactly one of model_path (a pretrained folder) or init_config (random init)")
        if self.model_impl not in ("custom", "hf"):
            raise ConfigError(f"model_impl must be 'custom' or 'hf', got {self.model_impl!r}")
        if self.packing and self.model_impl == "hf":
            # measured: transformers' Qwen2 (sdpa) lets a packed document attend to the previous one even with
            # restarting position_ids; the custom model keeps documents apart (tests/test_sft.py).
            raise ConfigError("packing needs model_impl: custom (transformers models would attend across packed "
                              "documents); set packing: false for model_impl: hf")
        if self.init_config is not None and self.model_impl != "custom":
            raise ConfigError("init_config builds the custom model; set model_impl: custom")
        if self.init_config is not None and not self.tokenizer:
            raise ConfigError("init_config builds a model with no tokenizer of its own: name one with --tokenizer "
                              "(qwen2, small, demo or a tokenizer folder)")
        if self.data_kind not in ("sft", "text"):
            raise ConfigError(f"data_kind must be 'sft' or 'text', got {self.data_kind!r}")
        if self.mask not in ("all_assistant", "last_assistant", "qwen_finetune"):
            raise ConfigError(f"mask {self.mask!r} learns nothing or is unknown; use all_assistant, "
                              f"last_assistant or qwen_finetune")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        for name in ("seq_len", "micro_batch_size_per_rank", "grad_accum_steps", "num_epochs", "keep_last",
                     "log_every", "chunk_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:  # None: chunk_size's auto
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) must be < max_steps ({self.max_steps})")
        if self.lora_r < 0 or self.lr <= 0 or self.grad_clip < 0 or not 0 <= self.dropout < 1:
            raise ConfigError("need lora_r >= 0, lr > 0, grad_clip >= 0 and 0 <= dropout < 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


# ----------------------------------------------------------------------------------------------------------------
# Pieces used by the loop (kept small so the loop reads top to bottom).

def build_rows(c: SFTConfig, tokenizer) -> tuple[list[dict], str]:
    """Tokenise with loss masks, then pack (shuffled once with the seed so packed rows mix sources)."""
    import random

    from data.datasets import build_sft_examples, build_text_examples, load_records, pack_examples

    examples, reports = [], []
    if c.data_kind == "text":  # already packed rows of seq_len with per-document position ids
        for path in c.train_files:
            rows = build_text_examples(load_records(path, kind="text")[0], tokenizer, c.seq_len)
            examples += rows
            reports.append(f"{path}: {len(rows)} packed rows of {c.seq_len} tokens")
        return examples, "\n".join(reports)
    for path in c.train_files:
        records, kind = load_records(path, kind="sft")
        records, note = thumbs_up_only(records, path, c.keep_negative)
        reports += [note] if note else []
        ex, report = build_sft_examples(records, tokenizer, c.seq_len, mask=c.mask, truncation=c.truncation)
        examples += ex
        reports.append(f"{path}: {report.summary()}")
    if c.packing:
        random.Random(c.seed).shuffle(examples)
        examples = pack_examples(examples, c.seq_len)
    return examples, "\n".join(reports)


def thumbs_up_only(records: list[dict], path: str, keep_negative: bool) -> tuple[list[dict], str]:
    """A file of rated replies ({prompt, completion, label}: data.feedback's unpaired.jsonl) reads as prompt /
    completion SFT data, thumbs-down replies included: refused unless keep_negative, then only label-true rows are
    kept. -> (records to learn, a note for the report; "" for a file without ratings)."""
    rated = sum("label" in r for r in records)
    if not rated:
        return records, ""
    kept = [r for r in records if r.get("label", True) is True]
    down = len(records) - len(kept)
    if not keep_negative:
        raise InputError(f"{path}: {rated} of its {len(records)} records are rated replies (prompt, completion, "
                         f"label: data.feedback's unpaired.jsonl), {down} of them thumbs-down; SFT would learn "
                         f"those replies too. Train on ratings with align/kto.py, or pass --keep_negative true to "
                         f"learn only the {rated - down} thumbs-up replies")
    if not kept:
        raise InputError(f"{path}: all {rated} rated replies are thumbs-down; nothing for SFT to learn")
    return kept, f"{path}: --keep_negative: learning {rated - down} thumbs-up replies, skipped {down} thumbs-down"


def check_start(c: SFTConfig) -> None:
    """Phase 0, before the accelerator and any model: output_dir, the model folder (or init_config) and every data
    file (read and validated once; build_rows takes the result). A mistake here fails in seconds."""
    from common.preflight import check_trainer_start
    from data.datasets import check_records

    check_trainer_start(c)
    for path in c.train_files:
        records, _ = check_records(path, kind="text" if c.data_kind == "text" else "sft")
        if c.data_kind == "sft":
            thumbs_up_only(records, path, c.keep_negative)


class LogprobWrapper(torch.nn.Module):
    """Puts the whole loss inside `forward`, so DDP / DeepSpeed wrap a module whose forward is the whole
    computation (calling `get_decoder()` on a DDP-wrapped model would bypass DDP's gradient synchronisation)."""

    def __init__(self, lm: torch.nn.Module, chunk_size: int):
        super().__init__()
        self.lm, self.chunk_size = lm, chunk_size

    def forward(self, input_ids, labels, attention_mask, position_ids):
        """-sum log p over the learned tokens (a scalar). The NLL is linear in the log-probs, so the fused kernel
        computes its gradient during the forward: no (B, T, V) logits and no recompute in the backward."""
        from model.logprobs import weighted_logprob_sum

        out = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        hidden = out if isinstance(out, torch.Tensor) else out.last_hidden_state  # (B, T, H)
        coef = torch.full(labels.shape, -1.0, device=labels.device)  # ignored labels contribute nothing
        return weighted_logprob_sum(hidden, self.lm.get_output_embeddings().weight, labels, coef,
                                    chunk_size=self.chunk_size)


def micro_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of -log p over the learned tokens of one micro batch, and how many there are. `model`: LogprobWrapper."""
    from data.chatml import IGNORE_INDEX

    nll = model(batch["input_ids"], batch["labels"], batch["attention_mask"], batch["position_ids"])  # scalar
    return nll, int((batch["labels"] != IGNORE_INDEX).sum())


def learned_tokens(row: dict) -> int:
    from data.chatml import IGNORE_INDEX

    return sum(1 for t in row["labels"] if t != IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------------------------
def train(c: SFTConfig) -> list[float]:
    """Run SFT as configured; returns the mini-batch losses of the steps run by this call."""
    from tqdm.auto import tqdm

    from common.guard import check_finite
    from common.loop import (batch_words, begin_run, check_warmup, full_weights, mini_batch_rows,
                             rank_micro_batches, restore_run_state, steps_per_epoch, unwrap_model)
    from common.metrics import plot_metrics
    from common.optim import build_adamw, clip_grad_norm_, sparse_embedding_for, warmup_cosine
    from common.preflight import check_vocab
    from data.datasets import collate
    from data.template import chat_format

    # 0. checks that need no model (paths, data files): seconds
    check_start(c)

    # 1. accelerator, run folder (lock, run id, config check, resume point), seed
    acc, run = begin_run(c, "sft")
    out, W, rank, resume_dir = run.out, acc.num_processes, acc.process_index, run.resume_dir

    # 2. tokenizer and rows (every rank builds the same rows; the batch plan picks each rank's share)
    tokenizer = load_chat_tokenizer(c.tokenizer, c.model_path, "sft", acc.is_main_process, chat=c.data_kind == "sft")
    check_vocab(tokenizer, c.model_path or c.init_config, "model_path" if c.model_path else "init_config",
                c.tokenizer)  # from config.json, before the model loads
    if c.data_kind == "sft" and c.mask == "qwen_finetune" and not chat_format(tokenizer).fast:
        raise ConfigError("mask qwen_finetune is ChatML's rule and this tokenizer's chat template is rendered by "
                          "the template itself; use all_assistant or last_assistant")
    rows, report = build_rows(c, tokenizer)
    mini = c.micro_batch_size_per_rank * c.grad_accum_steps * W
    spe = steps_per_epoch(len(rows), mini, source=", ".join(c.train_files), batch=batch_words(c, W))
    total = c.max_steps or c.num_epochs * spe
    check_warmup(c.warmup_steps, total)
    if c.max_steps and c.max_steps > 10 * spe and acc.is_main_process:
        print(f"[sft] warning: max_steps {c.max_steps} is {c.max_steps / spe:.0f} passes over the data ({len(rows)} "
              f"rows, {spe} mini batches of {mini} per pass); lower max_steps, or set max_steps null and num_epochs",
              flush=True)
    n_learned = [learned_tokens(r) for r in rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # 3. model, optimizer, schedule (warmup then cosine, sec. 3.1.2)
    model = build_model(c, resume_dir)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab is {vocab}")
    # an untied embedding steps only the rows a step looked up (common.optim.RowSparseAdamW)
    sparse = sparse_embedding_for(model, c.sparse_embedding_grad, acc.distributed_type.value == "DEEPSPEED")
    optimizer = build_adamw(model, c.lr, c.betas, c.eps, c.weight_decay, sparse_embedding=sparse)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, c.warmup_steps, total, c.min_lr_ratio))
    model, optimizer = acc.prepare(LogprobWrapper(model, c.chunk_size), optimizer)  # scheduler stays ours

    # 4. resume: optimizer, scheduler, RNG; the data position is the step (the batch plan is a function of it)
    start = 0
    if resume_dir is not None:
        state = restore_run_state(acc, resume_dir, optimizer, scheduler, "n_rows", len(rows))
        start = state["step"]
    if acc.is_main_process:
        print(f"[sft] {report}\n[sft] {len(rows)} rows, mini batch {mini}, steps {start}->{total}, ranks {W}, "
              f"precision {acc.mixed_precision}, {acc.distributed_type.value}, resume from {resume_dir}, embedding "
              f"{'row-sparse AdamW (untied)' if sparse is not None else 'dense AdamW'}", flush=True)
    log = run.metrics()  # resuming: cut back to the rows logged before the checkpoint
    stop = min(total, c.stop_at_step or total)
    losses = []

    def checkpoint(step):
        def write_model(d):
            save_model(unwrap_model(acc, model).lm, d, tokenizer)
        return run.save(acc, step, write_model, optimizer, scheduler, {"step": step, "n_rows": len(rows)},
                        c.keep_last)

    # 5. train
    bar = tqdm(total=total, initial=start, desc="sft", disable=not acc.is_main_process, dynamic_ncols=True)
    for step in range(start, stop):
        t0 = time.perf_counter()
        idx = mini_batch_rows(step, len(rows), mini, c.seed)
        n_tok = sum(n_learned[i] for i in idx)  # learned tokens in the GLOBAL mini batch
        nll_sum, seen = torch.zeros((), dtype=torch.float64), 0
        for micro in rank_micro_batches(idx, c.micro_batch_size_per_rank, c.grad_accum_steps, W, rank):
            batch = {k: v.to(acc.device) for k, v in collate([rows[i] for i in micro], pad_id).items()}
            with acc.accumulate(model):
                with acc.autocast():
                    nll, _ = micro_loss_sum(model, batch)
                # token mean over the global mini batch: x W undoes DDP's mean over ranks, x accum undoes
                # accelerate's division by the accumulation steps.
                acc.backward(nll / max(n_tok, 1) * W * c.grad_accum_steps)
            nll_sum += nll.detach().double().cpu()
            seen += int(batch["attention_mask"].sum())
        stats = acc.reduce(torch.stack([nll_sum, torch.tensor(float(seen), dtype=torch.float64)]).to(acc.device),
                           "sum").cpu()
        loss = float(stats[0]) / max(n_tok, 1)

        # 6. NaN guard, clip, step, log, checkpoint
        check_finite(step + 1, {"loss": loss}, run.last_ckpt)
        max_norm = c.grad_clip if c.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm_(model.parameters(), max_norm) if sparse is not None else \
            acc.clip_grad_norm_(model.parameters(), max_norm)
        if grad_norm is not None:  # None under DeepSpeed before its first step (it clips internally)
            check_finite(step + 1, {"grad_norm": grad_norm}, run.last_ckpt)
        lr = scheduler.get_last_lr()[0]
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
        run.check_weights(acc, step + 1, optimizer)
        losses.append(loss)
        dt = time.perf_counter() - t0
        if (step + 1) % c.log_every == 0 or step + 1 == stop:
            gn = float("nan") if grad_norm is None else float(grad_norm)
            log.log(step + 1, {"loss": loss, "lr": lr, "grad_norm": gn, "learned_tokens": n_tok,
                               "tokens_per_s": float(stats[1]) / dt, "step_s": dt})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if (c.save_every and (step + 1) % c.save_every == 0) or step + 1 == stop:
            checkpoint(step + 1)
    bar.close()

    # 7. final HF model (LoRA merged) and the loss curve
    if stop == total:
        with full_weights(acc, stage_dir=out):  # ZeRO-3: every rank gathers, bucket by bucket; the main process writes
            if acc.is_main_process:
                with run.writing("the final model"):
                    save_model(unwrap_model(acc, model).lm, out / "final", tokenizer, merge=True)
                    plot_metrics(out / "metrics.jsonl", out / "loss.png", ["loss", "lr"], title="SFT")
                print(f"[sft] done: final model in {out / 'final'}, loss curve in {out / 'loss.png'}", flush=True)
    log.close()
    run.end(acc, finished=stop == total)  # waits for every rank; marks the run finished, frees the folder
    return losses


def main(argv: list[str] | None = None) -> None:
    run_main(SFTConfig, train, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
