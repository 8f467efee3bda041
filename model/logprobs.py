"""Per-token log-probabilities and entropies of given labels, computed in chunks of rows.

With V = 151,936 the logits are the largest activation of SFT, DPO and PPO: (B, T, V) in fp32 is 2.4 GB for
B*T = 4096. `token_logprobs` never holds them: the forward keeps only a log-sum-exp per row, and the backward
recomputes one chunk of logits at a time (docs/PITFALLS.md#logits-memory). Values and gradients equal
`log_softmax(...).gather(...)`.
"""

from __future__ import annotations

import torch

from data.chatml import IGNORE_INDEX

DEFAULT_CHUNK = 256  # rows per chunk: 256 x 151,936 fp32 logits = 156 MB


def _chunk_logits(h, weight, temperature):
    """fp32 logits (n, V) of one chunk; the matmul runs in the model dtype as the dense head would."""
    logits = (h @ weight.t()).float()
    return logits / temperature if temperature != 1.0 else logits


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size, with_entropy):
        # hidden (N, H), weight (V, H), labels (N,) -> logp (N,), entropy (N,) (zeros unless with_entropy)
        N = hidden.shape[0]
        logp = hidden.new_zeros(N, dtype=torch.float32)
        entropy = hidden.new_zeros(N, dtype=torch.float32)
        lse = hidden.new_zeros(N, dtype=torch.float32)
        valid = labels != IGNORE_INDEX
        safe = labels.clamp(min=0)
        for s in range(0, N, chunk_size):
            logits = _chunk_logits(hidden[s:s + chunk_size], weight, temperature)  # (n, V)
            c_lse = torch.logsumexp(logits, dim=-1)
            lse[s:s + chunk_size] = c_lse
            logp[s:s + chunk_size] = logits.gather(1, safe[s:s + chunk_size, None]).squeeze(1) - c_lse
            if with_entropy:
                p = torch.softmax(logits, dim=-1)
                entropy[s:s + chunk_size] = c_lse - (p * logits).sum(-1)
        logp = torch.where(valid, logp, torch.zeros_like(logp))
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        t, cs = ctx.temperature, ctx.chunk_size
        g = torch.where(valid, grad_logp, torch.zeros_like(grad_logp)) / t  # (N,)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], cs):
            h = hidden[s:s + cs]
            # d logp / d logits = onehot(label) - softmax(logits), scaled by the upstream grad per row.
            p = torch.exp(_chunk_logits(h, weight, t) - lse[s:s + cs, None])  # (n, V)
            gl = -p * g[s:s + cs, None]
            gl.scatter_add_(1, safe[s:s + cs, None], g[s:s + cs, None])
            gl = gl.to(hidden.dtype)
            if grad_h is not None:
                grad_h[s:s + cs] = gl @ weight
            if grad_w is not None:
                grad_w += (gl.t() @ h).float()
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None, None


class _WeightedLogprobSum(torch.autograd.Function):
    """sum_i coef_i * log p(label_i), with the gradient computed during the forward pass.

    The loss is linear in each log-prob, so d loss / d logits = coef * (onehot - softmax) is known per chunk as soon
    as the chunk's logits exist: 3 head matmuls per step (as a dense head) instead of 4 (forward + recompute), and
    still only one chunk of logits in memory. The backward only scales the stored gradients by the upstream scalar.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, coef, temperature, chunk_size, track_grad):
        # hidden (N, H), weight (V, H), labels (N,), coef (N,) -> scalar
        need_h, need_w = track_grad and hidden.requires_grad, track_grad and weight.requires_grad
        ctx.weight_dtype = weight.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        valid = labels != IGNORE_INDEX
        safe = labels.clamp(min=0)
        c = torch.where(valid, coef.float(), torch.zeros_like(coef, dtype=torch.float32))  # (N,)
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, hidden.shape[0], chunk_size):
            h, lab, cc = hidden[s:s + chunk_size], safe[s:s + chunk_size, None], c[s:s + chunk_size]
            logits = _chunk_logits(h, weight, temperature)  # (n, V)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += (cc * (logits.gather(1, lab) - lse).squeeze(1)).sum()
            if need_h or need_w:
                gl = logits.sub_(lse).exp_().mul_(-cc[:, None] / temperature)  # in place: -coef * softmax / t
                gl.scatter_add_(1, lab, cc[:, None] / temperature)
                gl = gl.to(hidden.dtype)
                if need_h:
                    torch.mm(gl, weight, out=grad_h[s:s + chunk_size])
                if need_w:
                    grad_w.addmm_(gl.t().float(), h.float())
        ctx.save_for_backward(grad_h if need_h else None, grad_w)
        return total

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * g.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * g).to(ctx.weight_dtype) if grad_w is not None else None, None, None, None, None, None)


def _labelled_rows(hidden, labels):
    """hidden (..., H), labels (...) -> (rows (n,), hidden (n, H), labels (n,)) of the positions with a label.
    The output layer is applied only there: prompt and user-turn positions (IGNORE_INDEX) need no V-wide logits,
    and in PPO or SFT they are most of the sequence."""
    flat = labels.reshape(-1)
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # (n,)
    return rows, hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), flat.index_select(0, rows)


def weighted_logprob_sum(hidden, weight, labels, coef, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK):
    """sum(coef * logp(labels)) as a scalar, for losses linear in the log-probs (SFT NLL: coef = -mask / n_tokens;
    PPO-ptx). hidden (B, T, H), labels and coef (B, T). Equals `(coef * token_logprobs(...)).sum()` in value and
    gradient, faster (no recompute in backward). Positions labelled IGNORE_INDEX contribute nothing (and cost
    nothing: the output layer only sees labelled positions)."""
    rows, h, lab = _labelled_rows(hidden, labels)
    return _WeightedLogprobSum.apply(h, weight, lab, coef.reshape(-1).detach().index_select(0, rows),
                                     float(temperature), int(chunk_size), torch.is_grad_enabled())


def token_logprobs(hidden, weight, labels, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK,
                   return_entropy: bool = False):
    """log p(labels) under softmax(hidden @ weight.T / temperature), chunked.

    hidden (B, T, H) or (N, H); weight (V, H); labels of the same leading shape; positions whose label is
    IGNORE_INDEX give 0. Returns logp in fp32 with the leading shape, and the entropy of each row's distribution
    (no gradient) when return_entropy, 0 where the label is IGNORE_INDEX (those positions are skipped). Divide by
    the SAME temperature the sampler used (docs/PITFALLS.md#sampler-log-probs).
    """
    lead = labels.shape
    rows, h, lab = _labelled_rows(hidden, labels)
    logp, ent = _TokenLogprobs.apply(h, weight, lab, float(temperature), int(chunk_size), return_entropy)
    n = labels.numel()
    logp = logp.new_zeros(n).index_copy(0, rows, logp).view(lead)  # (lead) with 0 on unlabelled positions
    return (logp, ent.new_zeros(n).index_copy(0, rows, ent).view(lead)) if return_entropy else logp


def causal_lm_logprobs(model, input_ids, labels, attention_mask=None, position_ids=None, temperature: float = 1.0,
                       chunk_size: int = DEFAULT_CHUNK, return_entropy: bool = False):
    """Log-probs (B, T) of `labels` (already shifted by data.chatml.shift_labels) for the custom model or any
    transformers causal LM (also peft-wrapped): hidden states from `get_decoder()`, weights of the output layer."""
    decoder = model.get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    hidden = out if isinstance(out, torch.Tensor) else out.last_hidden_state  # (B, T, H)
    weight = model.get_output_embeddings().weight  # (V, H)
    return token_logprobs(hidden, weight, labels, temperature, chunk_size, return_entropy)


def reference_logprobs(logits, labels, temperature: float = 1.0):
    """The obvious slow version: materialises log_softmax (B, T, V) in fp32. For tests and peers only."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    valid = labels != IGNORE_INDEX
    out = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(valid, out, torch.zeros_like(out))
