"""The built-in rollout engine: batched sampling on the custom model's KV cache. Works wherever torch does (CPU/GPU),
and serves the configurations vLLM cannot reproduce (LogN, dynamic NTK, window attention; Qwen report sec. 2.5).

Prompts are left-padded so every row's next token sits in the last column; the model derives position ids from the
attention mask, so padding does not shift positions. Rows that emit a stop token are dropped from the batch (their
cache rows too), so a finished row stops growing and costs nothing.

sampler_logprobs: the log-prob of each sampled token under the distribution it was actually drawn from, i.e.
log_softmax of (logits / temperature) restricted to the top-p nucleus (renormalised). With top_p=1.0 this equals
`model.logprobs.token_logprobs(..., temperature)`, the trainer's own log-prob (docs/PITFALLS.md#sampler-log-probs).
With temperature 0 (greedy) it is log_softmax of the raw logits at the argmax, as vLLM reports it.
"""

from __future__ import annotations

import torch

from rollout.base import LENGTH, STOP, Rollout, SamplingParams, check_prompts
from rollout.sync import unwrap, verify_greedy


def top_p_filter(logits: torch.Tensor, top_p: float, k: int = 1024) -> torch.Tensor:
    """logits (B, V) -> (B, V) with -inf outside the nucleus: the smallest set of most likely tokens whose
    probability sums to >= top_p (Holtzman et al. 2020). A token is kept when the mass strictly before it (in
    descending order) is < top_p, so the most likely token is always kept. Same rule as vLLM's sampler.

    The nucleus usually holds far fewer than k tokens: the k largest (a partial sort) decide it whenever their mass
    reaches top_p in every row, and everything after them is dropped; otherwise the whole row is sorted. Sorting
    151,936 logits per token is what makes CPU top-p slow (ENVIRONMENT.md)."""
    if top_p >= 1.0:
        return logits
    probs_all = logits.float().softmax(dim=-1)  # (B, V)
    top, order = probs_all.topk(min(k, logits.shape[-1]), dim=-1)  # (B, k) descending
    if not bool((top.sum(-1) >= top_p).all()):
        top, order = probs_all.sort(dim=-1, descending=True)  # (B, V)
    drop_sorted = top.cumsum(dim=-1) - top >= top_p  # mass strictly before each token
    drop_sorted[:, 0] = False
    keep = torch.zeros_like(probs_all, dtype=torch.bool).scatter(1, order, ~drop_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs (B, V) rows summing to ~1, u (B,) uniform in [0, 1) -> tokens (B,): the first token whose cumulative
    probability exceeds u * total. One random number per row instead of V (multinomial / Gumbel draw V each: the
    cost of a 151,936-wide step on CPU). A zero-probability token is never returned: its cumulative value equals its
    predecessor's, and u * total < total in fp32 for u < 1."""
    cdf = probs.float().cumsum(dim=-1)  # (B, V)
    target = (u.to(cdf) * cdf[:, -1])[:, None]  # (B, 1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor):
    """logits (B, V), u (B,) uniforms in [0, 1) -> (tokens (B,), logprobs (B,)): the sampled ids and their log-probs
    under the temperature-scaled, top-p-truncated distribution they were drawn from (greedy: argmax, log-prob under
    the raw softmax; u unused)."""
    logits = logits.float()
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        tok = logp.argmax(dim=-1)
    else:
        logp = torch.log_softmax(top_p_filter(logits / temperature, top_p), dim=-1)  # (B, V)
        tok = inverse_cdf_sample(logp.exp(), u)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


def row_uniforms(n_prompts: int, params: SamplingParams) -> torch.Tensor:
    """(n_prompts * n, max_tokens) uniforms, row i*n + j for sample j of prompt i. With a seed, prompt i's rows come
    from their own stream seeded params.seed + i (as the vLLM engine seeds its requests), so a row's sample does
    not depend on which other prompts share the batch: the prompts of a PPO step can be split over ranks and give
    the same responses. Without a seed: torch's global RNG, which trainers checkpoint for exact resume."""
    if params.seed is None:
        return torch.rand(n_prompts * params.n, params.max_tokens)
    return torch.cat([torch.rand(params.n, params.max_tokens, generator=torch.Generator().manual_seed(params.seed + i))
                      for i in range(n_prompts)])


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged ids -> ids (B, P) and attention mask (B, P), padding on the left."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), P), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long, device=device)
        mask[i, P - len(s):] = 1
    return ids, mask


class BuiltinEngine:
    """Samples from the policy module itself, so `sync_weights` only switches the module it samples from."""

    def __init__(self, model, pad_id: int = 0, max_batch_rows: int = 256):
        self.model = model
        self.pad_id = pad_id
        self.max_batch_rows = max_batch_rows

    def sync_weights(self, model) -> float:
        """Nothing to copy: the engine runs on the training module. Returns 0.0 seconds."""
        self.model = model
        return 0.0

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollout:
        base = unwrap(self.model)
        check_prompts(prompts, base.config.vocab_size)
        dev = next(base.parameters()).device
        u = row_uniforms(len(prompts), params).to(dev)  # (N, max_tokens)
        index = [i for i in range(len(prompts)) for _ in range(params.n)]  # (N,) rows of a prompt adjacent
        rows = [list(prompts[i]) for i in index]
        out_ids, out_lp, reasons = [], [], []
        was_training = base.training
        base.eval()  # no dropout while sampling
        try:
            for s in range(0, len(rows), self.max_batch_rows):
                ids, lps, why = self._generate_batch(base, rows[s:s + self.max_batch_rows], params,
                                                     u[s:s + self.max_batch_rows], dev)
                out_ids += ids
                out_lp += lps
                reasons += why
        finally:
            base.train(was_training)
        return Rollout(prompt_index=index, prompt_ids=rows, response_ids=out_ids, finish_reason=reasons,
                       sampler_logprobs=out_lp)

    def _generate_batch(self, base, rows, params: SamplingParams, u: torch.Tensor, dev):
        """One left-padded batch: prefill, then one token per step for the rows still running. u: (B, max_tokens)."""
        B = len(rows)
        ids, mask = left_pad(rows, self.pad_id, dev)  # (B, P)
        cache = base.new_cache()
        head = base.get_output_embeddings()
        # Prefill: the output layer only at the last position; (B, P, V) logits would be GBs with V = 151,936.
        logits = head(base.get_decoder()(ids, attention_mask=mask, cache=cache)[:, -1])  # (B, V)
        stop = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=dev)
        active = torch.arange(B, device=dev)  # original row of each batch row still generating
        toks = torch.full((B, params.max_tokens), self.pad_id, dtype=torch.long)  # (B, R) pad after stop
        lps = torch.zeros(B, params.max_tokens)
        length = torch.zeros(B, dtype=torch.long)
        stopped = torch.zeros(B, dtype=torch.bool)
        for step in range(params.max_tokens):
            tok, lp = sample_next(logits, params.temperature, params.top_p, u[active, step])  # (b,), (b,)
            rows_now = active.cpu()
            toks[rows_now, step], lps[rows_now, step] = tok.cpu(), lp.float().cpu()
            length[rows_now] = step + 1
            done = torch.isin(tok, stop)  # (b,)
            stopped[rows_now[done.cpu()]] = True
            if step == params.max_tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (b, S + 1)
            if bool(done.any()):  # finished rows leave the batch, and their cache rows with them
                keep = (~done).nonzero().squeeze(1)
                active, tok, mask = active[keep], tok[keep], mask[keep]
                cache.select(keep)
            logits = head(base.get_decoder()(tok[:, None], attention_mask=mask, cache=cache)[:, -1])  # (b, V)
        out_ids = [toks[i, :length[i]].tolist() for i in range(B)]
        out_lp = [lps[i, :length[i]].tolist() for i in range(B)]
        return out_ids, out_lp, [STOP if s else LENGTH for s in stopped.tolist()]

    def greedy_check(self, model, prompts: list[list[int]], max_tokens: int = 8, atol: float | None = None) -> dict:
        """The KV-cache greedy rollout of `model` against its own no-cache forward (see rollout.sync.verify_greedy)."""
        self.sync_weights(model)
        greedy = self.generate(prompts, SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens))
        return verify_greedy(model, prompts, greedy, atol)


def reference_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """The slow obvious greedy loop: one prompt, no cache, no padding, the whole sequence re-run every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids]))[0, -1]  # (V,)
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]
