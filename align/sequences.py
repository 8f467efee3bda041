"""Summed completion log-probs of (prompt, completion) sequences, and the reference model of the offline trainers
(align/kto.py; align/dpo.py holds the same SequenceLogprobs / reference_mode). Not an entry point.

Shapes: N sequences, T the longest prompt + completion, H hidden.
"""

from __future__ import annotations

import contextlib

import torch


class SequenceLogprobs(torch.nn.Module):
    """Summed completion log-probs (N,) of N padded sequences; forward holds the whole computation so DDP wraps it.

    Only positions with a label (the completion tokens) go through the output layer: with a 151,936-wide
    vocabulary the head is most of the step, and the prompt's next-token log-probs are not needed."""

    def __init__(self, lm: torch.nn.Module, chunk_size: int | None = None):
        super().__init__()
        self.lm, self.chunk_size = lm, chunk_size

    def forward(self, input_ids, labels, attention_mask, position_ids):  # each (N, T)
        from data.chatml import IGNORE_INDEX
        from model.logprobs import token_logprobs

        out = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        hidden = out if isinstance(out, torch.Tensor) else out.last_hidden_state  # (N, T, H)
        valid = labels != IGNORE_INDEX  # (N, T)
        logp = token_logprobs(hidden[valid], self.lm.get_output_embeddings().weight, labels[valid],
                              chunk_size=self.chunk_size)  # (n,) for the n completion tokens
        row = valid.nonzero()[:, 0]  # (n,) sequence of each completion token
        return torch.zeros(labels.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, row, logp)  # (N,)


def sequence_batch(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """N (prompt_ids, completion_ids) -> one right-padded batch (N, T), labels on the completion tokens only."""
    from data.chatml import shift_labels
    from data.datasets import collate

    rows = [{"input_ids": p + r, "labels": shift_labels(p + r, [0] * len(p) + [1] * len(r))} for p, r in seqs]
    return collate(rows, pad_id)  # input_ids, labels, attention_mask, position_ids: (N, T)


@contextlib.contextmanager
def reference_mode(seqlogp: SequenceLogprobs, ref: SequenceLogprobs | None):
    """Yields the reference as a SequenceLogprobs, in eval mode (no dropout) and without gradients.

    ref None: the policy itself, with its LoRA adapter disabled if it has one (peft `disable_adapter`). Without an
    adapter that is only a valid reference before the first optimizer step (the cache at the start of a run)."""
    net = ref if ref is not None else seqlogp
    was_training = net.training
    adapter = seqlogp.lm.disable_adapter() if ref is None and hasattr(seqlogp.lm, "peft_config") else \
        contextlib.nullcontext()
    net.eval()
    try:
        with torch.no_grad(), adapter:
            yield net
    finally:
        net.train(was_training)


def score_sequences(acc, seqlogp: SequenceLogprobs, ref: SequenceLogprobs | None,
                    seqs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
                    desc: str = "reference log-probs") -> torch.Tensor:
    """Reference summed log-probs (N,) fp32 of N sequences, on CPU: each rank scores every W-th sequence, then the
    shares are gathered, so every rank holds the whole table. Every rank runs as many forwards (under ZeRO-3 each
    one gathers the weights): a rank with a shorter share scores a sequence again and drops the result."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    W, rank = acc.num_processes, acc.process_index
    mine = list(range(rank, len(seqs), W))
    largest = -(-len(seqs) // W)
    out = torch.zeros(len(seqs), dtype=torch.float32)
    with reference_mode(seqlogp, ref) as net:
        for s in tqdm(range(0, largest, batch_size), desc=desc, disable=not acc.is_main_process):
            idx = mine[s:s + batch_size]
            rows = idx or mine[:1] or [0]
            batch = {k: v.to(acc.device) for k, v in sequence_batch([seqs[i] for i in rows], pad_id).items()}
            with acc.autocast():
                logps = net(**batch).float().cpu()  # (b,)
            if idx:
                out[idx] = logps
    if W > 1:
        for i, value in gather_object([(i, out[i]) for i in mine]):
            out[i] = value
    return out
