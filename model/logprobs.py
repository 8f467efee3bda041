"""Per-token log-probabilities and entropies of given labels, computed in chunks of rows.

With V = 151,936 the logits are the largest activation of SFT, DPO and PPO: (B, T, V) in fp32 is 2.4 GB for
B*T = 4096. `token_logprobs` never holds them: the forward keeps only a log-sum-exp per row, and the backward
recomputes one chunk of logits at a time (docs/PITFALLS.md#logits-memory). Values and gradients equal
`log_softmax(...).gather(...)`.
"""

from __future__ import annotations

import torch

from data.chatml import IGNORE_INDEX

DEFAULT_CHUNK = 256  # the smallest default chunk: 256 x 151,936 fp32 logits = 156 MB
MAX_DEFAULT_CHUNK = 512


def auto_chunk(hidden_size: int) -> int:
    """Rows per chunk when none is given: 2 x hidden size, within [256, 512].

    The (chunk, V) fp32 logits buffer is then about half of the output layer's fp32 training state (weight, gradient
    and two AdamW moments: 16 x H x V bytes; for H < 128 the floor of 256 rows makes it more), and each of the three
    head matmuls gets at least 256 rows. Fewer rows cost speed: on 2 AVX2 cores a 256-row chunk runs the head's
    matmuls about 20% slower per row than a 512-row one (benchmarks/model_step.py --chunk 256 / 512, hidden 256).
    """
    return min(MAX_DEFAULT_CHUNK, max(DEFAULT_CHUNK, 2 * int(hidden_size)))


def _rows_per_chunk(chunk_size: int | None, hidden) -> int:
    return int(chunk_size) if chunk_size else auto_chunk(hidden.shape[-1])


# Every kernel below allocates ONE (chunk, V) fp32 buffer per call and works in it in place: each chunk's logits
# are written into it by the matmul, and the softmax / its gradient overwrite them. A fresh 156 MB tensor per chunk
# (and per temporary of logsumexp) costs a page fault per 4 KiB page, about 0.1 s per allocation on a cloud VM, and
# more memory; one buffer is faulted in once. docs/DESIGN.md "Speed on CPU vector paths" has the measurements.

def _chunk_buffer(hidden, chunk_size: int, V: int) -> torch.Tensor:
    return hidden.new_empty(min(chunk_size, max(hidden.shape[0], 1)), V, dtype=torch.float32)


def _logits_into(buf, h, weight, temperature):
    """fp32 logits (n, V) of one chunk in buf[:n]; the matmul runs in the model dtype as the dense head would."""
    out = buf[:h.shape[0]]
    if h.dtype == torch.float32 and weight.dtype == torch.float32:
        torch.mm(h, weight.t(), out=out)
    else:
        out.copy_(h @ weight.t())
    return out.div_(temperature) if temperature != 1.0 else out


def _exp_shifted_(z):
    """In place: z (n, V) -> exp(z - max) (n, V); returns (max (n, 1), sum of exp (n, 1)). logsumexp = max + log(sum).
    One exp pass and no temporary of z's size (torch.logsumexp allocates one)."""
    m = z.amax(dim=1, keepdim=True)
    z.sub_(m).exp_()
    return m, z.sum(dim=1, keepdim=True)


def _accumulate_grad_w(grad_w, gl, h, first: bool):
    """grad_w (V, H) fp32 (+)= gl.T @ h for one chunk: gl (n, V), h (n, H); fp32 accumulation in any model dtype."""
    a, b = (gl.t(), h) if gl.dtype == h.dtype == torch.float32 else (gl.t().float(), h.float())
    if first:
        torch.mm(a, b, out=grad_w)
    else:
        grad_w.addmm_(a, b)


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
        buf = _chunk_buffer(hidden, chunk_size, weight.shape[0])
        ebuf = torch.empty_like(buf) if with_entropy else None
        for s in range(0, N, chunk_size):
            z = _logits_into(buf, hidden[s:s + chunk_size], weight, temperature)  # (n, V)
            picked = z.gather(1, safe[s:s + chunk_size, None]).squeeze(1)
            if with_entropy:  # H = log(sum e) - sum(e y) / sum e with y = z - max, e = exp(y)
                m = z.amax(dim=1, keepdim=True)
                y = z.sub_(m)
                e = torch.exp(y, out=ebuf[:y.shape[0]])
                tot = e.sum(dim=1, keepdim=True)
                ey = torch.bmm(e[:, None, :], y[:, :, None]).view(-1, 1)  # (n, 1) sum(e * y) without a temporary
                entropy[s:s + chunk_size] = (tot.log() - ey / tot).squeeze(1)
            else:
                m, tot = _exp_shifted_(z)
            c_lse = (m + tot.log()).squeeze(1)
            lse[s:s + chunk_size] = c_lse
            logp[s:s + chunk_size] = picked - c_lse
        logp = torch.where(valid, logp, torch.zeros_like(logp))
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        # All rows in one chunk and a gradient to come: keep exp(logits - max) (n, V) and its row sums for the
        # backward instead of recomputing the logits there (3 head matmuls instead of 4, same memory: the backward
        # would allocate that buffer again). Used once; a second backward (retain_graph) recomputes.
        ctx.kept = ((ebuf if with_entropy else buf)[:N], tot) if 0 < N <= chunk_size and any(
            ctx.needs_input_grad[:2]) else None
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        t, cs = ctx.temperature, ctx.chunk_size
        g = torch.where(valid, grad_logp, torch.zeros_like(grad_logp)) / t  # (N,)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        kept, ctx.kept = ctx.kept, None
        buf = None if kept is not None else _chunk_buffer(hidden, cs, weight.shape[0])
        for s in range(0, hidden.shape[0], cs):
            h = hidden[s:s + cs]
            # d logp / d logits = onehot(label) - softmax(logits), scaled by the upstream grad per row; in place.
            if kept is not None:  # one chunk, its exp(logits - max) kept by the forward
                e, tot = kept
                gl = e.mul_(-g[:, None] / tot)
            else:
                gl = _logits_into(buf, h, weight, t).sub_(lse[s:s + cs, None]).exp_().mul_(-g[s:s + cs, None])
            gl.scatter_add_(1, safe[s:s + cs, None], g[s:s + cs, None])
            gl = gl.to(hidden.dtype)
            if grad_h is not None:
                torch.mm(gl, weight, out=grad_h[s:s + cs])
            if grad_w is not None:
                _accumulate_grad_w(grad_w, gl, h, first=s == 0)
        if grad_w is not None and hidden.shape[0] == 0:
            grad_w.zero_()
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None, None


class _WeightedLogprobSum(torch.autograd.Function):
    """sum_i coef_i * log p(label_i), with the gradient computed during the forward pass.

    The loss is linear in each log-prob, so d loss / d logits = coef * (onehot - softmax) is known per chunk as soon
    as the chunk's logits exist: 3 head matmuls per step (as a dense head) instead of 4 (forward + recompute), and
    still only one chunk of logits in memory. The backward only scales the stored gradients by the upstream scalar,
    in place, and hands them over (no copy: autograd can take the tensor as .grad), so it runs once per forward
    (a second backward through the same graph, retain_graph=True, is refused).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, coef, temperature, chunk_size, track_grad):
        # hidden (N, H), weight (V, H), labels (N,), coef (N,) -> scalar
        need_h, need_w = track_grad and hidden.requires_grad, track_grad and weight.requires_grad
        ctx.weight_dtype = weight.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        valid = labels != IGNORE_INDEX
        safe = labels.clamp(min=0)
        c = torch.where(valid, coef.float(), torch.zeros_like(coef, dtype=torch.float32))  # (N,)
        total = hidden.new_zeros((), dtype=torch.float32)
        buf = _chunk_buffer(hidden, chunk_size, weight.shape[0])
        for s in range(0, hidden.shape[0], chunk_size):
            h, lab, cc = hidden[s:s + chunk_size], safe[s:s + chunk_size, None], c[s:s + chunk_size, None]
            z = _logits_into(buf, h, weight, temperature)  # (n, V)
            picked = z.gather(1, lab)  # (n, 1)
            m, tot = _exp_shifted_(z)  # z is now exp(logits - max)
            total += (cc * (picked - m - tot.log())).sum()
            if need_h or need_w:
                gl = z.mul_(-cc / (temperature * tot))  # -coef * softmax / t
                gl.scatter_add_(1, lab, cc / temperature)
                gl = gl.to(hidden.dtype)
                if need_h:
                    torch.mm(gl, weight, out=grad_h[s:s + chunk_size])
                if need_w:
                    _accumulate_grad_w(grad_w, gl, h, first=s == 0)
        if need_w and hidden.shape[0] == 0:
            grad_w.zero_()
        ctx.grads = (grad_h, grad_w)  # not save_for_backward: backward hands these very tensors to autograd
        return total

    @staticmethod
    def backward(ctx, g):
        grads = getattr(ctx, "grads", None)
        if grads is None:
            raise RuntimeError("weighted_logprob_sum: backward ran twice through one forward (retain_graph); its "
                               "gradient is computed in the forward and handed over once")
        ctx.grads = None
        grad_h, grad_w = grads
        one = bool(g == 1)
        if grad_h is not None and not one:
            grad_h.mul_(g.to(grad_h.dtype))
        if grad_w is not None:
            if not one:
                grad_w.mul_(g)
            grad_w = grad_w.to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def _labelled_rows(hidden, labels):
    """hidden (..., H), labels (...) -> (rows (n,), hidden (n, H), labels (n,)) of the positions with a label.
    The output layer is applied only there: prompt and user-turn positions (IGNORE_INDEX) need no V-wide logits,
    and in PPO or SFT they are most of the sequence."""
    flat = labels.reshape(-1)
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # (n,)
    return rows, hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), flat.index_select(0, rows)


def weighted_logprob_sum(hidden, weight, labels, coef, temperature: float = 1.0, chunk_size: int | None = None):
    """sum(coef * logp(labels)) as a scalar, for losses linear in the log-probs (SFT NLL: coef = -mask / n_tokens;
    PPO-ptx). hidden (B, T, H), labels and coef (B, T). Equals `(coef * token_logprobs(...)).sum()` in value and
    gradient, faster (no recompute in backward). Positions labelled IGNORE_INDEX contribute nothing (and cost
    nothing: the output layer only sees labelled positions)."""
    rows, h, lab = _labelled_rows(hidden, labels)
    return _WeightedLogprobSum.apply(h, weight, lab, coef.reshape(-1).detach().index_select(0, rows),
                                     float(temperature), _rows_per_chunk(chunk_size, hidden), torch.is_grad_enabled())


def token_logprobs(hidden, weight, labels, temperature: float = 1.0, chunk_size: int | None = None,
                   return_entropy: bool = False):
    """log p(labels) under softmax(hidden @ weight.T / temperature), chunked.

    hidden (B, T, H) or (N, H); weight (V, H); labels of the same leading shape; positions whose label is
    IGNORE_INDEX give 0. Returns logp in fp32 with the leading shape, and the entropy of each row's distribution
    (no gradient) when return_entropy, 0 where the label is IGNORE_INDEX (those positions are skipped). Divide by
    the SAME temperature the sampler used (docs/PITFALLS.md#sampler-log-probs).
    """
    lead = labels.shape
    rows, h, lab = _labelled_rows(hidden, labels)
    logp, ent = _TokenLogprobs.apply(h, weight, lab, float(temperature), _rows_per_chunk(chunk_size, hidden),
                                     return_entropy)
    n = labels.numel()
    logp = logp.new_zeros(n).index_copy(0, rows, logp).view(lead)  # (lead) with 0 on unlabelled positions
    return (logp, ent.new_zeros(n).index_copy(0, rows, ent).view(lead)) if return_entropy else logp


def causal_lm_logprobs(model, input_ids, labels, attention_mask=None, position_ids=None, temperature: float = 1.0,
                       chunk_size: int | None = None, return_entropy: bool = False):
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
