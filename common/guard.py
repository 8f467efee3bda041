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


def nonfinite_tensors(tensors) -> int:
    """How many of `tensors` hold a NaN or inf. One sum per tensor (NaN and inf propagate through it; about 8x
    cheaper on CPU than a max-abs reduction) and one device sync; a non-finite sum is confirmed element-wise, so a
    finite tensor whose sum overflows is not counted."""
    tensors = [t.detach() for t in tensors if t.numel() > 0]
    if not tensors:
        return 0
    sums = torch.stack([t.sum().float() for t in tensors])
    suspects = (~torch.isfinite(sums)).nonzero().flatten().tolist()
    return sum(1 for i in suspects if not bool(torch.isfinite(tensors[i]).all()))


def optimizer_params(optimizer) -> list[torch.Tensor]:
    """The tensors an optimizer updates (under DeepSpeed ZeRO: this rank's fp32 partitions)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def stepped_tensors(optimizer) -> list[torch.Tensor]:
    """What the last optimizer step may have made non-finite: every parameter, except that a row-sparse one
    (an input embedding under common.optim.RowSparseAdamW) gives only the rows its last step updated. Its
    other rows were only scaled by the decay factor 1 - lr wd, which the optimizer records only when |factor| <= 1,
    so a finite row stays finite. Checkpoints check every tensor whole (RunDir.check_weights(full=True))."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    rows = getattr(inner, "last_rows", {})
    return [p.index_select(0, rows[p]) if p in rows else p for p in optimizer_params(optimizer)]


def check_finite_weights(step: int, n_bad: int, n_total: int, last_checkpoint: str | Path | None = None) -> None:
    """Raise NonFiniteLossError if `n_bad` weight tensors (counted by nonfinite_tensors, summed over ranks) hold a
    NaN or inf: nothing with such weights is saved or called good."""
    if n_bad:
        kept = f"the last good checkpoint is kept at {last_checkpoint}" if last_checkpoint else \
            "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"step {step}: {n_bad} of {n_total} weight tensors hold NaN or inf after the optimizer step though the "
            f"loss and gradient norm were finite; stopping without writing a checkpoint ({kept}). Lower the "
            f"learning rate, or resume from the checkpoint.")
