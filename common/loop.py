"""Training-loop helpers shared by the trainers: the batch plan, precision, checkpoint glue.

Batch words (docs/DESIGN.md): micro batch = rows in one forward/backward on one rank; mini batch = rows in one
optimizer step = micro x grad-accum x ranks. The plan below is a pure function of (step, seed), so every rank knows
the whole mini batch (used for the global token count) and a resumed run reads exactly the rows it would have read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from common.checkpoint import (STATE_FILE, checkpoint_name, load_checkpoint_state, rng_state, save_checkpoint,
                               set_rng_state)
from common.run import RunRefused

DEEPSPEED_DIR, DEEPSPEED_TAG, ZERO_FILE = "deepspeed", "zero", "zero.json"  # <checkpoint>/deepspeed/zero/...


def steps_per_epoch(n_rows: int, mini_batch: int, source: str = "data",
                    batch: str = "micro batch x grad-accum x ranks") -> int:
    """Full mini batches per pass over `n_rows` (the remainder is dropped); zero steps is a ConfigError naming the
    fields to lower (`batch` spells the mini batch out with the trainer's field names)."""
    if n_rows < mini_batch:
        from common.config import ConfigError

        raise ConfigError(f"{source}: {n_rows} rows is fewer than one mini batch of {mini_batch} ({batch}): lower "
                          f"grad_accum_steps (or micro_batch_size_per_rank), or add data")
    return n_rows // mini_batch


def batch_words(c, ranks: int) -> str:
    """'micro_batch_size_per_rank 1 x grad_accum_steps 128 x 1 rank(s)': the mini batch in field names."""
    return (f"micro_batch_size_per_rank {c.micro_batch_size_per_rank} x grad_accum_steps {c.grad_accum_steps} x "
            f"{ranks} rank(s)")


def check_warmup(warmup_steps: int, total: int) -> None:
    """The schedule's warmup must end before the run does (paper-scale warmups do not fit small data)."""
    if warmup_steps >= total:
        from common.config import ConfigError

        raise ConfigError(f"warmup_steps ({warmup_steps}) must be < the {total} optimizer steps of this run: lower "
                          f"warmup_steps (or raise max_steps / num_epochs)")


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


def unwrap_model(acc, model):
    """acc.unwrap_model(model) (the module inside DDP or a DeepSpeed engine). Without DeepSpeed: strip DDP here, as
    accelerate would; accelerate's own imports deepspeed whenever it is installed (~3 s of CPU in every process
    that saves) only to test for an engine that a run without DeepSpeed cannot have."""
    if acc.distributed_type.value not in ("NO", "MULTI_CPU", "MULTI_GPU"):
        return acc.unwrap_model(model)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' on a GPU that supports it, else 'no' (fp32); 'bf16' / 'fp32' as asked."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"bf16": "bf16", "fp32": "no"}[precision]


def make_accelerator(precision: str, grad_accum: int, micro_batch: int):
    """An Accelerator; without CUDA it is told cpu=True, which is what makes accelerate treat a
    `accelerate launch --multi_gpu --num_processes 2` start as two gloo ranks (MULTI_CPU) instead of two
    independent single-process runs. A DeepSpeed launch without CUDA gets the gloo backend named explicitly:
    left to itself accelerate finds no backend and makes every rank "process 0 of 1"."""
    from accelerate import Accelerator  # lazy: importing accelerate is slow
    from accelerate.utils import InitProcessGroupKwargs

    from common.config import ConfigError

    wants_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu = not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if wants_deepspeed and cpu else []
    acc = Accelerator(mixed_precision=resolve_precision(precision), gradient_accumulation_steps=grad_accum,
                      cpu=cpu and not wants_deepspeed, kwargs_handlers=handlers)
    if wants_deepspeed and acc.distributed_type.value != "DEEPSPEED":  # accelerate would silently run without it
        raise ConfigError(f"a DeepSpeed accelerate config was given but accelerate set up {acc.distributed_type.value}"
                          f"; launch with `accelerate launch --config_file configs/accelerate/zero2.yaml ...`")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world != acc.num_processes:  # every rank would think it is rank 0 (and write the same checkpoint)
        raise ConfigError(f"accelerate reports {acc.num_processes} process(es) ({acc.distributed_type.value}) but "
                          f"torch.distributed has {world} ranks, so every rank would think it is rank 0; on CPU use "
                          f"configs/accelerate/multi_cpu.yaml")
    if acc.gradient_accumulation_steps != grad_accum:  # accelerate lets its env / DeepSpeed config win silently
        raise ConfigError(f"the accelerate config sets gradient_accumulation_steps={acc.gradient_accumulation_steps}"
                          f" but the run config says grad_accum_steps={grad_accum}; remove it from the accelerate "
                          f"/ DeepSpeed config (the run config owns batch sizes)")
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if ds is not None:  # we feed batches ourselves (no prepared dataloader), so DeepSpeed learns the size here
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
        zo = ds.deepspeed_config.setdefault("zero_optimization", {})
        if cpu:
            for key, value in CPU_ZERO_LIMITS.items():
                zo.setdefault(key, value)  # a DeepSpeed JSON config that sets them wins
    return acc


# DeepSpeed on CPU ranks, where every rank's buffers come out of the one machine's RAM: smaller buffers than
# DeepSpeed's GPU-sized defaults. reduce_bucket_size (default 5e8 elements) is a gradient buffer each rank fills:
# 2 GB in fp32 for any model above 0.5B parameters. ZeRO-3's defaults (1e9 live parameters, reuse distance 1e9) keep
# every layer of a model under 1B parameters gathered from the forward to the backward, so each rank holds the whole
# model again beside its shard. Measured at the Qwen2.5-0.5B shape on 2 CPU ranks (README "Rehearsal"): LoRA SFT's
# second step 40.7 s -> 19.0 s; full reward training finishes at 7.5 GB per rank (stopped at 10 GB per rank with the
# default bucket). GPUs keep DeepSpeed's defaults.
CPU_ZERO_LIMITS = {"reduce_bucket_size": 50_000_000, "stage3_max_live_parameters": 50_000_000,
                   "stage3_max_reuse_distance": 50_000_000, "stage3_prefetch_bucket_size": 25_000_000}


def deepspeed_engine(accelerator):
    """The DeepSpeedEngine made by `accelerator.prepare` (None without DeepSpeed)."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return None if wrapped is None else wrapped.engine


STAGED = ".weights-"  # common.loop.full_weights' staging folders (prefix), removed at exit or by the next save
_STAGING: set[Path] = set()  # the staging folders of the full_weights blocks open now (PPO saves two engines at once)


@contextlib.contextmanager
def full_weights(accelerator, engine=None, stage_dir: str | Path | None = None, adapter_only: bool = False,
                 bucket_bytes: int | None = None) -> Iterator[dict]:
    """Under ZeRO-3 each rank holds a shard of every parameter; inside this block the main process can write the
    model's Hugging Face folder with the usual code. A collective: enter it on every rank (the body runs where the
    caller says, usually the main process only). Without ZeRO-3 a no-op. `engine`: which engine's model (default:
    the one accelerate prepared first). Yields the gather statistics (common.gather.sharded_buckets; {} when none).

    - Streamed (a model whose class sets `streams_weights`: the custom causal LM and scalar-head models, LoRA
      merged), when `stage_dir` is given: every rank gathers the weights one size-capped bucket at a time
      (common.gather.sharded_buckets, at most `bucket_bytes` plus one layer gathered) and the main process writes
      each bucket to safetensors files in a staging folder under `stage_dir` (common.safestate.StreamedSafetensors)
      and drops it; the model's `staged_weights` names that folder, and model.checkpoint.save_weights links its
      files into the saved folder instead of reading the (sharded) parameters. No rank holds the whole model.
    - adapter_only (a LoRA checkpoint, which saves the adapter only): only the trainable parameters are gathered.
    - Otherwise (transformers' models, which save through save_pretrained): DeepSpeed consolidates the whole model
      into the main process's CPU memory (in its training dtype) and the parameters point at it."""
    engine = engine if engine is not None else deepspeed_engine(accelerator)
    if engine is None or engine.zero_optimization_stage() != 3:
        yield {}
        return
    import deepspeed

    from common.gather import DEFAULT_BUCKET_BYTES, sharded_buckets
    from common.safestate import StreamedSafetensors

    engine.empty_partition_cache()  # every rank: wait for and release what a forward left prefetched (in flight)
    module = engine.module
    if adapter_only and any(hasattr(m, "peft_config") for m in module.modules()):
        trainable = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            yield {}
        return
    target = next((m for m in module.modules() if getattr(type(m), "streams_weights", False)), None)
    if target is None or stage_dir is None:
        yield from _consolidated(accelerator, engine)
        return
    main, stats, folder, error = accelerator.is_main_process, {}, None, None
    if main:
        stage_dir = Path(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        for old in set(stage_dir.glob(STAGED + "*")) - _STAGING:  # left by a crash mid-save (the run folder is ours)
            shutil.rmtree(old, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(prefix=STAGED, dir=stage_dir))
        _STAGING.add(folder)
        names = [n for n, _ in target.named_parameters(remove_duplicate=False)]
        writer = StreamedSafetensors(folder, StreamedSafetensors.header_bound(names))
    skip = {"lm_head.weight"} if getattr(getattr(target, "config", None), "tie_word_embeddings", False) else set()
    try:
        for bucket in sharded_buckets(target, bucket_bytes or DEFAULT_BUCKET_BYTES, stats):
            if main and error is None:  # after a failed write keep gathering: every rank runs the same collectives
                try:
                    for name, t in bucket.items():
                        if name not in skip:  # tied: transformers and save_causal_lm leave lm_head out
                            writer.add(name, t)
                except Exception as e:
                    error = e
        if main and error is None:
            writer.close()
        if error is not None:
            raise error
        target.staged_weights = folder
        yield stats
    finally:
        target.staged_weights = None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
            _STAGING.discard(folder)


def _consolidated(accelerator, engine) -> Iterator[dict]:
    """full_weights' fallback: the whole model in the main process's CPU memory, the parameters pointing at it."""
    full = engine._zero3_consolidated_16bit_state_dict()  # every rank; the tensors land on the main process only
    if not accelerator.is_main_process:
        yield {}
        return
    params = dict(engine.module.named_parameters())  # tied weights once
    shards = {name: p.data for name, p in params.items()}
    try:
        for name, p in params.items():
            p.data = full[name]
        yield {}
    finally:
        for name, p in params.items():
            p.data = shards[name]


def save_run_checkpoint(accelerator, root: str | Path, step: int, save_model: Callable[[Path], None], optimizer,
                        scheduler, train_state: dict[str, Any], keep_last: int, run_id: str | None = None,
                        meta: dict[str, Any] | None = None, engines: dict | None = None) -> Path | None:
    """Gather every rank's RNG state, then the main process writes the checkpoint atomically; all ranks wait.
    Under DeepSpeed the optimizer state is sharded: every rank first writes its shard with the engine's own
    `save_checkpoint` into a temporary folder, which the main process moves into the checkpoint before the rename
    (so a crash leaves the previous checkpoint as the latest; every rank must see `root`: one machine or a shared
    filesystem). Under ZeRO-3 the weights are gathered for the save. Trainers call it through RunDir.save, which
    passes the run id and the metrics row count (meta.json). `engines` {tag: engine}: several trained engines
    (PPO: policy and value), each saved under deepspeed/<tag>/; default {"zero": the accelerator's engine}."""
    from accelerate.utils import gather_object

    rngs = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    root = Path(root)
    engines = trained_engines(accelerator, engines)
    shards = None
    if engines:
        shards = root / f".{checkpoint_name(step)}.{DEEPSPEED_DIR}.tmp"
        if accelerator.is_main_process:
            for old in root.glob(f".step-*.{DEEPSPEED_DIR}.tmp"):  # left by a crash mid-save
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        for tag, engine in engines.items():
            engine.save_checkpoint(str(shards), tag=tag, save_latest=False)  # every rank: its shard
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            stage = next(iter(engines.values())).zero_optimization_stage()
            (shards / ZERO_FILE).write_text(json.dumps({"zero_stage": stage, "ranks": accelerator.num_processes}
                                                       | ({} if list(engines) == [DEEPSPEED_TAG] else
                                                          {"engines": sorted(engines)})) + "\n")
    path = None
    with contextlib.ExitStack() as stack:
        for engine in engines.values():
            # streamed bucket by bucket (a LoRA run saves its adapter: only that is gathered)
            stack.enter_context(full_weights(accelerator, engine, stage_dir=root, adapter_only=True))
        if accelerator.is_main_process:
            path = save_checkpoint(root, step, save_model, None if engines else optimizer, scheduler, train_state,
                                   rngs, keep_last, extra_dirs={DEEPSPEED_DIR: shards} if shards else None,
                                   run_id=run_id, meta=meta)
    accelerator.wait_for_everyone()
    return path


def trained_engines(accelerator, engines: dict | None) -> dict:
    """{tag: DeepSpeedEngine} to checkpoint: `engines` as given, else the accelerator's one engine under "zero"
    ({} without DeepSpeed)."""
    if engines is not None:
        return {tag: e for tag, e in engines.items() if e is not None}
    engine = deepspeed_engine(accelerator)
    return {} if engine is None else {DEEPSPEED_TAG: engine}


def restore_run_state(accelerator, ckpt_dir: str | Path, optimizer, scheduler, count_key: str | None = None,
                      count: int | None = None, engines: dict | None = None) -> dict[str, Any]:
    """Load optimizer (under DeepSpeed: this rank's shard, with the engine), scheduler (None: none) and this rank's
    RNG state from a checkpoint; return its train_state. With `count_key`, the saved train_state[count_key] must
    equal `count` (the batch plan depends on the data size). Nothing is unpickled: our state is JSON +
    safetensors, DeepSpeed's shards are read with weights_only and an allow-list (common/safestate.py)."""
    ckpt_dir = Path(ckpt_dir)
    state = load_checkpoint_state(ckpt_dir)
    engines = trained_engines(accelerator, engines)
    engine, shards = next(iter(engines.values()), None), ckpt_dir / DEEPSPEED_DIR
    if engine is not None and not shards.is_dir():
        raise RunRefused(f"{ckpt_dir}: written without DeepSpeed (its optimizer state is in {STATE_FILE}); resume "
                         f"with the accelerate config it was written with, or start a new run from "
                         f"{ckpt_dir / 'model'}")
    if engine is None and state["optimizer"] is None:
        raise RunRefused(f"{ckpt_dir}: written under DeepSpeed ZeRO (sharded optimizer state in {DEEPSPEED_DIR}/); "
                         f"resume with the same DeepSpeed accelerate config and number of processes")
    rngs = state["rng_states"]
    if len(rngs) != accelerator.num_processes:
        raise RunRefused(f"{ckpt_dir}: saved by {len(rngs)} ranks, resuming with {accelerator.num_processes}; "
                         f"resume with the same number of processes")
    ts = state["train_state"]
    if count_key is not None and ts[count_key] != count:
        what = count_key.removeprefix("n_")
        raise RunRefused(f"{ckpt_dir}: saved with {ts[count_key]} {what}, the data now gives {count}; "
                         f"resume with the same data and seq_len or use a new output_dir")
    if engine is not None:
        saved = json.loads((shards / ZERO_FILE).read_text())["zero_stage"]
        if saved != engine.zero_optimization_stage():
            raise RunRefused(f"{ckpt_dir}: written under ZeRO-{saved}, resuming under "
                             f"ZeRO-{engine.zero_optimization_stage()}; resume with the same DeepSpeed config")
        for tag, engine in engines.items():
            if load_deepspeed_shards(engine, shards, tag) is None:
                raise RunRefused(f"{shards / tag}: DeepSpeed could not load this checkpoint (see its log above)")
    else:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(rngs[accelerator.process_index])
    return ts


def load_deepspeed_shards(engine, shards: Path, tag: str = DEEPSPEED_TAG):
    """engine.load_checkpoint with the engine's file reader swapped for common.safestate.safe_torch_load: DeepSpeed
    itself calls torch.load(weights_only=False) on every shard (a pickle), which would run a planted payload."""
    from common.safestate import safe_torch_load

    reader = engine.checkpoint_engine
    reader.load = lambda path, map_location=None: safe_torch_load(path, map_location=map_location)
    try:
        loaded, _ = engine.load_checkpoint(str(shards), tag=tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
    finally:
        del reader.load  # the instance attribute shadowed the class's method
    return loaded


def begin_run(c, kind: str):
    """Phase 1 of every trainer: the accelerator, then the run folder (common.run.open_run: lock, sweep of stale
    temporaries, run id, config check, resume point), then the seeds. `c` has precision, grad_accum_steps,
    micro_batch_size_per_rank, output_dir, resume and seed. Returns (acc, run: common.run.RunDir); raises
    RunRefused / RunFinished / RunIOError (common.run.run_main prints them in one line)."""
    import random

    import numpy as np

    from common.run import open_run

    acc = make_accelerator(c.precision, c.grad_accum_steps, c.micro_batch_size_per_rank)
    run = open_run(acc, c, kind)
    random.seed(c.seed), np.random.seed(c.seed), torch.manual_seed(c.seed)
    return acc, run


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
