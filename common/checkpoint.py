"""Run-state checkpoints: model (Hugging Face folder) + optimizer, scheduler, step, data position and RNG states.

Layout under `root` (e.g. `<output_dir>/checkpoints`):
    step-00000010/model/        HF folder (config.json + *.safetensors) that transformers and vLLM load
    step-00000010/state.json    optimizer, scheduler, train_state (step, data position, ...), RNG state per rank:
    step-00000010/state.safetensors   the tree in JSON, its tensors in safetensors (common/safestate.py; no pickle)
    step-00000010/meta.json     {"step": 10, "complete": true, "run_id": ..., "metrics_rows": ...}
    step-00000010/deepspeed/    under DeepSpeed only: each rank's optimizer (ZeRO-3: and weight) shard; the state
                                then holds no optimizer state
    latest                      text file naming the newest complete checkpoint (for people and tools)

A checkpoint belongs to one run (`run_id` in its meta.json): listing, pruning and resuming only ever see the
current run's checkpoints. It is written into a temporary directory, fsynced and renamed into place; `latest` is
updated after that and older checkpoints of the run are deleted only then, each first renamed out of the live names
(common.atomic.remove_dir), so a crash (or a NaN stop) mid-save or mid-prune never loses the last good one and never
leaves a half-deleted folder under a live name.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common.atomic import atomic_dir, atomic_write_json, atomic_write_text, remove_dir
from common.failpoint import failpoint
from common.safestate import STATE_JSON, UnsafeStateError, load_state, save_state

STATE_FILE, META_FILE, MODEL_DIR, LATEST = STATE_JSON, "meta.json", "model", "latest"
LEGACY_STATE = "state.pt"  # the pickle of versions before 0.2: never read
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and, if present, CUDA) generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(
    root: str | Path,
    step: int,
    save_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    train_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    keep_last: int = 1,
    extra_dirs: dict[str, Path] | None = None,
    run_id: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` of run `run_id` atomically; call on the main process only. Returns its directory.

    save_model(dir) writes the HF model folder; rng_states has one entry per rank (index = rank).
    keep_last: complete checkpoints of this run kept (>= 1); older ones are deleted after the new one is in place.
    extra_dirs: {name: folder} moved into the checkpoint before it is renamed into place (DeepSpeed's shards).
    meta: more keys for meta.json (the metrics row count).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    final = root / checkpoint_name(step)
    with atomic_dir(final) as tmp:
        save_model(tmp / MODEL_DIR)
        save_state(tmp, {
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "train_state": train_state,
            "rng_states": rng_states,
        })
        for name, folder in (extra_dirs or {}).items():
            folder.rename(tmp / name)
        atomic_write_json(tmp / META_FILE, {"step": step, "complete": True, "run_id": run_id, **(meta or {})})
    failpoint("checkpoint.renamed", step)
    atomic_write_text(root / LATEST, final.name + "\n")
    for old in list_checkpoints(root, run_id)[:-keep_last]:
        remove_dir(old)
    return final


def read_meta(d: Path) -> dict | None:
    """meta.json of a complete checkpoint folder, else None."""
    try:
        meta = json.loads((d / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("complete") else None


def list_checkpoints(root: str | Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints under `root`, oldest first; with `run_id`, only that run's. Temporary, renamed-for-
    deletion and incomplete folders are never listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if not re.fullmatch(r"step-\d+", d.name) or not d.is_dir():
            continue
        meta = read_meta(d)
        if meta is not None and (run_id is None or meta.get("run_id") == run_id):
            found.append(d)
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def latest_checkpoint(root: str | Path, run_id: str | None = None) -> Path | None:
    """The newest complete checkpoint (of run `run_id` if given); None if there is none."""
    found = list_checkpoints(root, run_id)
    return found[-1] if found else None


def check_no_pickle(ckpt_dir: str | Path, allow_under: str | None = None) -> None:
    """Refuse a checkpoint that holds pickle files (outside `allow_under`, DeepSpeed's folder read with an
    allow-list): our checkpoints never contain any, and loaders would unpickle them if the safetensors were
    missing. The legacy `state.pt` gets its own message."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / LEGACY_STATE).exists() and not (ckpt_dir / STATE_FILE).exists():
        raise UnsafeStateError(
            f"{ckpt_dir}: holds {LEGACY_STATE} (the pickle format of qwen-align < 0.2), which is never loaded: "
            f"unpickling a file can run code. Start a new run from its weights with --model_path "
            f"{ckpt_dir / MODEL_DIR} (and --resume false --overwrite_output_dir true, or a new output_dir)")
    for f in ckpt_dir.rglob("*"):
        if allow_under and f.relative_to(ckpt_dir).parts[0] == allow_under:
            continue
        if f.suffix in PICKLE_SUFFIXES:
            raise UnsafeStateError(f"{f}: a pickle file inside a checkpoint; qwen-align never writes one and does "
                                   f"not load it (unpickling can run code). Remove it or start a new run")


def load_checkpoint_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """The state written by save_checkpoint (optimizer, scheduler, train_state, rng_states), read without pickle."""
    ckpt_dir = Path(ckpt_dir)
    check_no_pickle(ckpt_dir, allow_under="deepspeed")
    state = load_state(ckpt_dir)
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "train_state", "rng_states"} <= set(state):
        raise UnsafeStateError(f"{ckpt_dir / STATE_FILE}: not a checkpoint state")
    return state
