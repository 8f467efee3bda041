"""NaN/inf guard: a non-finite loss stops the run before the optimizer step and before any checkpoint is written."""

from __future__ import annotations

import math
from pathlib import Path

import torch


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; the message names the step, the loss and the last good checkpoint."""


def check_finite(step: int, losses: dict[str, float | torch.Tensor], last_checkpoint: str | Path | None = None) -> None:
    """Raise NonFiniteLossError if any value in `losses` is NaN or +-inf.

    Call it on values already reduced over ranks, so every rank stops at the same step.
    """
    for name, value in losses.items():
        v = float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(v):
            kept = f"the last good checkpoint is kept at {last_checkpoint}" if last_checkpoint else \
                "no checkpoint had been written yet"
            raise NonFiniteLossError(
                f"step {step}: loss {name!r} is {v}; stopping the run without an optimizer step or a checkpoint "
                f"({kept}). Lower the learning rate, check the data, or resume from the checkpoint.")
