"""Run-state checkpoints: model (Hugging Face folder) + optimizer, scheduler, step, data position and RNG states.

Layout under `root` (e.g. `<output_dir>/checkpoints`):
    step-00000010/model/        HF folder (config.json + *.safetensors) that transformers and vLLM load
    step-00000010/state.pt      optimizer, scheduler, train_state (step, data position, ...), RNG state per rank
    step-00000010/meta.json     {"step": 10, "complete": true}
    step-00000010/deepspeed/    under DeepSpeed only: each rank's optimizer (ZeRO-3: and weight) shard; state.pt
                                then holds no optimizer state
    latest                      text file naming the newest complete checkpoint

A checkpoint is written into a temporary directory, fsynced and renamed into place; `latest` is updated atomically
after that and older checkpoints are deleted only then, so a crash (or a NaN stop) mid-save never loses the last
good one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common.atomic import atomic_dir, atomic_write_json, atomic_write_text

STATE_FILE, META_FILE, MODEL_DIR, LATEST = "state.pt", "meta.json", "model", "latest"


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
) -> Path:
    """Write checkpoint `step` atomically; call on the main process only. Returns its directory.

    save_model(dir) writes the HF model folder; rng_states has one entry per rank (index = rank).
    keep_last: complete checkpoints kept (>= 1); older ones are deleted after the new one is in place.
    extra_dirs: {name: folder} moved into the checkpoint before it is renamed into place (DeepSpeed's shards).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    final = root / checkpoint_name(step)
    with atomic_dir(final) as tmp:
        save_model(tmp / MODEL_DIR)
        torch.save({
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "train_state": train_state,
            "rng_states": rng_states,
        }, tmp / STATE_FILE)
        for name, folder in (extra_dirs or {}).items():
            os.rename(folder, tmp / name)
        atomic_write_json(tmp / META_FILE, {"step": step, "complete": True})
    atomic_write_text(root / LATEST, final.name + "\n")
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary and incomplete ones are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.glob("step-*"):
        meta = d / META_FILE
        if d.is_dir() and meta.is_file() and json.loads(meta.read_text()).get("complete"):
            found.append(d)
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint named by `latest` (or the newest complete one if the pointer is missing); None if none."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        d = root / pointer.read_text().strip()
        if (d / META_FILE).is_file():
            return d
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """The dict written to state.pt (optimizer, scheduler, train_state, rng_states). Our own file: full unpickle."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: not a complete checkpoint (no {STATE_FILE})")
    return torch.load(path, map_location="cpu", weights_only=False)
