"""Rounding-error bounds for the numerics tests: derived from the problem (its sizes and values), not tuned on one
machine. A fast path and its slow reference are both compared with a float64 evaluation, each within the bound.

Why: fp32 results depend on the CPU's vector path (AVX2, AVX-512, or ATEN_CPU_CAPABILITY=default), because blocked
and vectorised kernels sum in different orders. A tolerance read off one machine can fail on the next; a bound from
forward error analysis holds on all of them.

The model (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3-4), first order in u:
- a sum or dot product of n terms, in any order (blocked, vectorised, fused multiply-add), is off by at most
  gamma(n) * sum |terms|, gamma(n) = n u / (1 - n u), u the unit roundoff (fp32: 2^-24);
- one elementwise +, -, *, / or a cast to a narrower type: relative error u (bf16: 2^-8);
- exp and log from torch's vectorised CPU kernels: relative error ELEM, taken as 20 ulp (= 40 u), the accuracy
  PyTorch states for its fastest vectorised exp (`exp_u20`); SLEEF's exp/log used elsewhere are 1 ulp.
The bounds are worst cases; measured errors are several times smaller. `assert_within` reports that ratio.
"""

from __future__ import annotations

import torch

U32 = 2.0 ** -24  # fp32 unit roundoff
U_BF16 = 2.0 ** -8
ELEM = 40 * U32  # exp / log: 20 ulp


def unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.float32: U32, torch.bfloat16: U_BF16, torch.float16: 2.0 ** -11, torch.float64: 2.0 ** -53}[dtype]


def gamma(n: int, u: float = U32) -> float:
    """Worst-case relative error of a sum of n terms (of their absolute sum)."""
    return n * u / (1 - n * u)


def assert_within(got: torch.Tensor, ref64: torch.Tensor, bound: torch.Tensor | float, what: str) -> float:
    """|got - ref64| <= bound elementwise; returns the largest ratio error / bound (<= 1) for the caller to print."""
    err = (got.detach().double() - ref64.detach().double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    ratio = (err / bound.clamp(min=1e-300)).max().item() if err.numel() else 0.0
    if not ratio <= 1.0:
        i = int((err / bound.clamp(min=1e-300)).flatten().argmax())
        raise AssertionError(f"{what}: |error| {err.flatten()[i].item():.3g} exceeds the rounding bound "
                             f"{bound.flatten()[i].item():.3g} at flat index {i} (largest error {err.max().item():.3g},"
                             f" ratio {ratio:.2f})")
    return ratio


def logprob_bounds(hidden, weight, labels, coef, temperature: float = 1.0, upstream: float = 1.0,
                   ignore_index: int = -100, depth: int | None = None):
    """Float64 values and fp32 error bounds of the log-probs of `labels` under softmax(hidden @ weight.T / t), of
    S = upstream * sum(coef * logp) and of its gradients, as computed by any of: the chunked kernels in
    model.logprobs, or log_softmax + gather + autograd.

    hidden (N, H), weight (V, H) in fp32 or bf16 (the matmul output in that dtype, accumulated in fp32, then cast to
    fp32 as the kernels do); labels (N,); coef (N,) the per-row weight of logp (the upstream gradient of each
    log-prob). depth: terms accumulated before the logits, None for the output layer alone (H); give
    forward_depth(cfg, S) when `hidden` is the float64 final state of a whole forward whose fp32 run is checked.
    Returns (ref, bound), dicts with keys logp (N,), entropy (N,), sum (), grad_hidden (N, H), grad_weight (V, H).

    Error propagation, with z = h.w / t the logits, p = softmax(z), L = logsumexp(z):
      dz   = gamma(H or depth) |h|.|w| / t + (u_mm + u) |z|              matmul (+ cast), then / t
      dL   = sum_v p dz + sum_v p u |z - L| + ELEM + gamma(V) + ELEM |L - max z| + u |L|
             (the propagated logit error, the shifted arguments, exp, the sum of V positive terms, log, + max)
      dlogp = dz_y + dL + u |logp|
      dp/p  = dz + dL + u |z - L| + ELEM                                p = exp(z - L) or exp(logp)
      dg    = |c| / t (p (dp/p + 3u) + 2u [v = y]) + u_mm |g|           g = c (onehot - p) / t, cast to the input dtype
      dgrad_h = |upstream| (|dg| . |w| + (gamma(V) + u_mm) |g| . |w|) + u |grad_h|
      dgrad_w = |upstream| (|dg|' . |h| + (gamma(N) + u_mm) |g|' . |h|) + u |grad_w|   (N rows, over the chunks)
    """
    u_mm = unit_roundoff(hidden.dtype)
    u = U32
    N, H = hidden.shape
    V = weight.shape[0]
    h, w = hidden.detach().double(), weight.detach().double()
    valid = labels != ignore_index
    safe = labels.clamp(min=0)
    c = torch.where(valid, coef.detach().double(), torch.zeros((), dtype=torch.float64))
    t = float(temperature)

    z = h @ w.t() / t  # (N, V)
    A = h.abs() @ w.abs().t() / t
    lse = torch.logsumexp(z, -1)  # (N,)
    p = torch.exp(z - lse[:, None])
    logp_all = z - lse[:, None]
    logp = logp_all.gather(1, safe[:, None]).squeeze(1)
    onehot = torch.zeros_like(z).scatter_(1, safe[:, None], 1.0)

    dz = gamma(depth or H) * A + (u_mm + u) * z.abs()
    dlse = (p * dz).sum(-1) + (p * (z - lse[:, None]).abs()).sum(-1) * u + ELEM + gamma(V) \
        + ELEM * (lse - z.max(-1).values).abs() + u * lse.abs()
    dlogp = dz.gather(1, safe[:, None]).squeeze(1) + dlse + u * logp.abs()
    rel_p = dz + dlse[:, None] + u * logp_all.abs() + ELEM

    # entropy: lse - sum p z (kernel) or -sum p logp (reference); bound covers both forms
    ent = -(p * logp_all).sum(-1)
    mag = z.abs() + lse.abs()[:, None]
    dent = dlse + (p * (dz + mag * (rel_p + 2 * u))).sum(-1) + gamma(V) * (p * mag).sum(-1) + u * lse.abs()

    total = upstream * (c * torch.where(valid, logp, torch.zeros_like(logp))).sum()
    dtotal = abs(upstream) * ((c.abs() * dlogp).sum() + (gamma(N) + 2 * u) * (c * logp).abs().sum()) \
        + u * total.abs()

    g = c[:, None] * (onehot - p) / t  # d S / d z per unit upstream
    dg = c.abs()[:, None] / t * (p * (rel_p + 3 * u) + 2 * u * onehot) + u_mm * g.abs()
    grad_h = upstream * (g @ w)
    grad_w = upstream * (g.t() @ h)
    # a narrow matmul output (bf16) is rounded once per chunk: u_mm of the absolute sum covers every partial sum
    dgrad_h = abs(upstream) * (dg @ w.abs() + (gamma(V) + u_mm) * (g.abs() @ w.abs())) + u * grad_h.abs()
    dgrad_w = abs(upstream) * (dg.t() @ h.abs() + (gamma(N) + u_mm) * (g.abs().t() @ h.abs())) + u * grad_w.abs()

    zero = torch.zeros((), dtype=torch.float64)
    ref = {"logp": torch.where(valid, logp, zero), "entropy": torch.where(valid, ent, zero), "sum": total,
           "grad_hidden": grad_h, "grad_weight": grad_w}
    bound = {"logp": torch.where(valid, dlogp, zero), "entropy": torch.where(valid, dent, zero), "sum": dtotal,
             "grad_hidden": dgrad_h, "grad_weight": dgrad_w}
    ref["p"], bound["p_relative"] = p, rel_p  # (N, V): the distribution and the relative error of each p
    return ref, bound


def forward_depth(cfg, key_len: int) -> int:
    """Terms summed along the longest chain of accumulations of a QwenForCausalLM forward: per layer the RMSNorm
    mean (H), the q/k projection (H), the attention scores (hd), the softmax sum and the weighted values (S keys
    each), the output projection (heads x hd), the MLP norm (H), its gate/up projection (H) and down projection
    (intermediate), then the final norm (H) and the output layer (H)."""
    H, I, hd, nh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_attention_heads
    per_layer = H + H + hd + 2 * key_len + nh * hd + H + H + I
    return cfg.num_hidden_layers * per_layer + 2 * H


def logits_bound(cfg, key_len: int, hidden64: torch.Tensor, lm_weight: torch.Tensor) -> torch.Tensor:
    """Bound on the fp32 error of the logits (..., V) of a forward whose final (normed) hidden states are hidden64
    (..., H): gamma(depth) * |h| . |W|. Every rounding before the final RMSNorm is a relative error of the residual
    stream, which that norm carries into a relative error of the normed state; the output layer then sums H
    products. First order, and it ignores the gain of the layers in between (the tests use a few layers with
    weights of std 0.02-0.5); measured errors stay under 1% of it on AVX2 and on the portable path."""
    return gamma(forward_depth(cfg, key_len)) * (hidden64.abs() @ lm_weight.detach().double().abs().t())


def fp64_copy(model):
    """A float64 copy of a custom model or a transformers model, for the reference evaluation."""
    import copy

    return copy.deepcopy(model).double()


def as_float64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64)




class SequenceLogprobs64:
    """A float64 copy of a custom causal LM: log-probs of a response given its prompt (teacher-forced, no padding),
    and their fp32 rounding bound, for comparing an engine's or a trainer's fp32 log-probs on any machine.

    Returns (logp (R,), bound (R,), mass (R,)): mass bounds the relative error of any partial sum of the
    distribution, so the log of a top-p nucleus mass M is off by at most mass + gamma(V): a sampler's top-p
    log-prob, log p(y) - log M, is within bound + mass (+ gamma(V)) of the float64 log p(y) - log M for the same
    nucleus (the set itself is decided in fp32 and can change only for a token whose cumulative mass is within
    rounding of top_p)."""

    def __init__(self, model):
        import copy

        self.cfg = model.config
        self.m = copy.deepcopy(model).double().eval()

    @torch.no_grad()
    def __call__(self, prompt: list[int], response: list[int], temperature: float = 1.0, **forward_kw):
        ids = torch.tensor([list(prompt) + list(response)])
        h = self.m.get_decoder()(ids, **forward_kw)[0, len(prompt) - 1:-1]  # (R, H): the state before each token
        ref, bound = logprob_bounds(h, self.m.lm_head.weight, torch.tensor(response), torch.ones(len(response)),
                                    temperature, depth=forward_depth(self.cfg, ids.shape[1]))
        mass = bound["p_relative"].max(-1).values + gamma(self.m.lm_head.weight.shape[0]) + U32
        return ref["logp"], bound["logp"], mass


@torch.no_grad()
def causal_lm_logprob_bounds(model, input_ids, labels, **forward_kw):
    """Float64 log-probs (B, T) of `labels` (IGNORE_INDEX where none) after a forward of a float64 copy of the
    custom causal LM `model`, and their fp32 rounding bound (zero where no label)."""
    import copy

    m64 = copy.deepcopy(model).double().eval()
    h = m64.get_decoder()(input_ids, **forward_kw)  # (B, T, H)
    B, T, H = h.shape
    ref, bound = logprob_bounds(h.reshape(-1, H), m64.lm_head.weight, labels.reshape(-1), torch.ones(B * T),
                                depth=forward_depth(model.config, T))
    return ref["logp"].view(B, T), bound["logp"].view(B, T)
