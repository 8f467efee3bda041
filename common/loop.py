"""Training-loop helpers shared by align/sft.py and reward/train.py: the batch plan, precision, checkpoint glue.

Batch words (docs/DESIGN.md): micro batch = rows in one forward/backward on one rank; mini batch = rows in one
optimizer step = micro x grad-accum x ranks. The plan below is a pure function of (step, seed), so every rank knows
the whole mini batch (used for the global token count) and a resumed run reads exactly the rows it would have read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from common.checkpoint import load_checkpoint_state, rng_state, save_checkpoint, set_rng_state


def steps_per_epoch(n_rows: int, mini_batch: int, source: str = "data") -> int:
    """Full mini batches per pass over `n_rows` (the remainder is dropped); zero steps is an error."""
    if n_rows < mini_batch:
        raise ValueError(f"{source}: {n_rows} rows is fewer than one mini batch of {mini_batch} "
                         f"(micro batch x grad-accum x ranks); add data or lower the batch size")
    return n_rows // mini_batch


def mini_batch_rows(step: int, n_rows: int, mini_batch: int, seed: int) -> list[int]:
    """Row indices (mini_batch,) of optimizer step `step` (0-based): a fresh permutation per epoch, seed + epoch."""
    spe = steps_per_epoch(n_rows, mini_batch)
    epoch, k = divmod(step, spe)
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return perm[k * mini_batch:(k + 1) * mini_batch]


def rank_micro_batches(rows: list[int], micro: int, accum: int, world: int, rank: int) -> list[list[int]]:
    """Split one mini batch into this rank's `accum` micro batches: micro batch i of rank r is slice (i*world + r).

    With world=2, micro=1, accum=2 and rows [a, b, c, d]: rank 0 gets [[a], [c]], rank 1 gets [[b], [d]].
    """
    if len(rows) != micro * accum * world:
        raise ValueError(f"mini batch has {len(rows)} rows, expected micro {micro} x accum {accum} x ranks {world}")
    return [rows[(i * world + rank) * micro:(i * world + rank + 1) * micro] for i in range(accum)]


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' on a GPU that supports it, else 'no' (fp32); 'bf16' / 'fp32' as asked."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"bf16": "bf16", "fp32": "no"}[precision]


def make_accelerator(precision: str, grad_accum: int, micro_batch: int):
    """An Accelerator; without CUDA it is told cpu=True, which is what makes accelerate treat a
    `accelerate launch --multi_gpu --num_processes 2` start as two gloo ranks (MULTI_CPU) instead of two
    independent single-process runs."""
    from accelerate import Accelerator  # lazy: importing accelerate is slow

    from common.config import ConfigError

    wants_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    acc = Accelerator(mixed_precision=resolve_precision(precision), gradient_accumulation_steps=grad_accum,
                      cpu=not torch.cuda.is_available() and not wants_deepspeed)
    if wants_deepspeed and acc.distributed_type.value != "DEEPSPEED":  # accelerate would silently run without it
        raise ConfigError(f"a DeepSpeed accelerate config was given but accelerate set up {acc.distributed_type.value}"
                          f" (DeepSpeed needs GPUs and a multi-process launch); on CPU use "
                          f"configs/accelerate/multi_cpu.yaml")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world != acc.num_processes:  # seen with DeepSpeed on CPU: every rank says it is process 0 of 1
        raise ConfigError(f"accelerate reports {acc.num_processes} process(es) ({acc.distributed_type.value}) but "
                          f"torch.distributed has {world} ranks, so every rank would think it is rank 0 (and write "
                          f"the same checkpoint); on CPU use configs/accelerate/multi_cpu.yaml, DeepSpeed needs GPUs")
    if acc.gradient_accumulation_steps != grad_accum:  # accelerate lets its env / DeepSpeed config win silently
        raise ConfigError(f"the accelerate config sets gradient_accumulation_steps={acc.gradient_accumulation_steps}"
                          f" but the run config says grad_accum_steps={grad_accum}; remove it from the accelerate "
                          f"/ DeepSpeed config (the run config owns batch sizes)")
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if ds is not None:  # we feed batches ourselves (no prepared dataloader), so DeepSpeed learns the size here
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
    if ds is not None and ds.zero_stage == 3:
        raise ConfigError("ZeRO-3 shards the parameters and these trainers do not gather them for the HF checkpoint "
                          "yet; use configs/accelerate/zero2.yaml (or multi_gpu.yaml)")
    return acc


def save_run_checkpoint(accelerator, root: str | Path, step: int, save_model: Callable[[Path], None], optimizer,
                        scheduler, train_state: dict[str, Any], keep_last: int) -> Path | None:
    """Gather every rank's RNG state, then the main process writes the checkpoint atomically; all ranks wait."""
    from accelerate.utils import DistributedType, gather_object

    rngs = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    opt = optimizer
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        opt = None  # ZeRO shards the optimizer state; resuming a DeepSpeed run restarts the optimizer state
    path = None
    if accelerator.is_main_process:
        path = save_checkpoint(root, step, save_model, opt, scheduler, train_state, rngs, keep_last)
    accelerator.wait_for_everyone()
    return path


def restore_run_state(accelerator, ckpt_dir: str | Path, optimizer, scheduler, count_key: str | None = None,
                      count: int | None = None) -> dict[str, Any]:
    """Load optimizer, scheduler and this rank's RNG state from a checkpoint; return its train_state. With
    `count_key`, the saved train_state[count_key] must equal `count` (the batch plan depends on the data size)."""
    state = load_checkpoint_state(ckpt_dir)
    if state["optimizer"] is None:
        raise ValueError(f"{ckpt_dir}: checkpoint has no optimizer state (written under DeepSpeed ZeRO); "
                         f"exact resume is not possible, start a new run from {Path(ckpt_dir) / 'model'}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rngs = state["rng_states"]
    if len(rngs) != accelerator.num_processes:
        raise ValueError(f"{ckpt_dir}: saved by {len(rngs)} ranks, resuming with {accelerator.num_processes}; "
                         f"resume with the same number of processes")
    set_rng_state(rngs[accelerator.process_index])
    ts = state["train_state"]
    if count_key is not None and ts[count_key] != count:
        what = count_key.removeprefix("n_")
        raise ValueError(f"{ckpt_dir}: saved with {ts[count_key]} {what}, the data now gives {count}; "
                         f"resume with the same data and seq_len or use a new output_dir")
    return ts


def begin_run(c):
    """Phase 1 of every trainer: the accelerator, the run folder and its checkpoint root, the checkpoint to resume
    from (None: a fresh start), and the seeds. `c` has precision, grad_accum_steps, micro_batch_size_per_rank,
    output_dir, resume and seed. Returns (acc, out, world_size, rank, ckpt_root, resume_dir)."""
    import random

    import numpy as np

    from common.checkpoint import latest_checkpoint

    acc = make_accelerator(c.precision, c.grad_accum_steps, c.micro_batch_size_per_rank)
    out = Path(c.output_dir)
    ckpt_root = out / "checkpoints"
    resume_dir = latest_checkpoint(ckpt_root) if c.resume else None
    random.seed(c.seed), np.random.seed(c.seed), torch.manual_seed(c.seed)
    return acc, out, acc.num_processes, acc.process_index, ckpt_root, resume_dir


def gather_lists(accelerator, local: list) -> list:
    """Every rank's list concatenated in rank order (one process: `local` itself). Python objects, CPU tensors."""
    if accelerator.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    return gather_object(local)


def sum_over_ranks(accelerator, values: list[float]) -> list[float]:
    """Element-wise sum of a list of floats over ranks (float64; one process: unchanged)."""
    if accelerator.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, "sum").cpu().tolist()


def sum_gradients(accelerator, params) -> None:
    """All-reduce (sum) the gradients over ranks, a missing gradient counting as zeros. For loops whose per-rank
    losses are already divided by the GLOBAL batch's token count (PPO), so the sum is the one-process gradient."""
    if accelerator.num_processes == 1:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])  # one collective instead of one per tensor
    torch.distributed.all_reduce(flat)
    offset = 0
    for p in params:  # views of the summed buffer, not writes into the old .grad (it may be a reused buffer that
        p.grad = flat[offset:offset + p.numel()].view_as(p)  # must stay this rank's: SparseEmbeddingGrad)
        offset += p.numel()
