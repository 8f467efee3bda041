"""Optimizer and learning-rate schedule shared by the trainers (SFT, reward model)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup 0 -> 1 over `warmup_steps`, then cosine decay 1 -> min_lr_ratio at `total_steps`.

    `step` counts optimizer steps already taken (the multiplier for the step about to be taken is at step + 1 in
    warmup so the first step does not use lr 0).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def constant_with_warmup(step: int, warmup_steps: int) -> float:
    """LR multiplier: linear warmup then constant (the reward-model stages use a constant LR, Qwen sec. 3.2.1)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


def build_adamw(model: torch.nn.Module, lr: float, betas: tuple[float, float], eps: float,
                weight_decay: float) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D tensors), as usual.

    fused=True: one kernel per step instead of a loop over tensors; measured 6x faster on CPU for a 151,936 x 128
    embedding (0.05 s vs 0.3 s per step), and what transformers' Trainer (so TRL) uses by default.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=True)


class SparseEmbeddingGrad:
    """Exact, faster embedding gradients for models that only look the embedding up (reward and value models).

    A dense embedding backward allocates and fills a fresh (V, H) gradient every micro batch (78 MB for Qwen's
    151,936 x 128; the allocation page-faults on every step) although a batch touches a few hundred rows. Here the
    lookup returns a sparse gradient (rows touched, summed over micro batches by autograd), and `densify()` writes
    it, once per optimizer step, into one persistent dense buffer whose previously touched rows are zeroed first,
    so clipping and the fused AdamW see the same dense gradient as before. Measured on the reward-model step with
    the real vocabulary: about 1.5-2x faster (benchmarks/train_vs_trl.py). Not for tied output layers (their
    gradient is dense anyway) and not under DeepSpeed (its engine owns the gradients). Code after densify() may
    scale .grad in place (clipping) but must not write other values into it: replace .grad instead.
    """

    def __init__(self, embedding: torch.nn.Embedding):
        embedding.sparse = True
        self.weight = embedding.weight
        self.buffer: torch.Tensor | None = None  # (V, H) persistent dense gradient
        self.rows: torch.Tensor | None = None  # (n,) rows written at the last densify

    def densify(self) -> None:
        """Call after the step's backward passes, before clipping: .grad becomes the dense (V, H) gradient."""
        g = self.weight.grad
        if g is None or not g.is_sparse:
            return
        g = g.coalesce()  # duplicates summed
        if self.buffer is None:
            self.buffer = torch.zeros_like(self.weight)
        elif self.rows is not None:
            self.buffer.index_fill_(0, self.rows, 0.0)
        self.rows = g.indices()[0]
        self.buffer.index_put_((self.rows,), g.values().to(self.buffer.dtype))
        self.weight.grad = self.buffer
