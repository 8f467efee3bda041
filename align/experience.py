"""Rollout batches, response log-probs, reward-model inputs and LM losses: the pieces RL trainers and the
evaluation share (align/ppo.py, align/evaluate.py). Not an entry point.

Shapes: N responses, P prompt length, R response length (the longest response), T = P + R, V vocab.
"""

from __future__ import annotations

import torch


def reward_sequences(prompt_ids, response_ids, messages, tok, rtok, same_tokenizer: bool,
                     tools: list | None = None) -> list[list[int]]:
    """prompt + response + <|reward|> in the reward model's ids (re-rendered from decoded text if tokenizers differ;
    `tools` (N,) each row's tool list or None, rendered into the system turn as the prompt was)."""
    from data.chatml import REWARD_TOKEN, special_id
    from data.template import chat_format

    rid = special_id(rtok, REWARD_TOKEN)  # a tokenizer without it: clear error naming the token
    # a sampled <|reward|> ends a row (stop_ids) and is never scored as part of the reply; with equal tokenizers the
    # policy may lack the token but can still sample the reward model's id (an unused row of a padded vocab)
    drop = {tok.convert_tokens_to_ids(REWARD_TOKEN), rid if same_tokenizer else None}
    response_ids = [[t for t in r if t not in drop] for r in response_ids]
    if same_tokenizer:
        return [p + r + [rid] for p, r in zip(prompt_ids, response_ids)]
    out = []
    for msgs, r, t in zip(messages, response_ids, tools or [None] * len(messages)):
        p = chat_format(rtok).prompt_ids(msgs, t)  # the reward tokenizer's own chat template
        out.append(p + rtok(tok.decode(r), add_special_tokens=False)["input_ids"] + [rid])
    return out


def rollout_tensors(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict:
    """Right-padded (N, T) input_ids / attention_mask / labels (next response token, data.chatml.shift_labels),
    and (N, R) `pos` = the position whose logits predict response token r, with `mask` (N, R) on real tokens."""
    from data.chatml import IGNORE_INDEX, shift_labels

    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    T, R = max(map(len, seqs)), max(map(len, response_ids))
    ids, att, labels, pos, mask = [], [], [], [], []
    for p, r, s in zip(prompt_ids, response_ids, seqs):
        pad = T - len(s)
        ids.append(s + [pad_id] * pad)
        att.append([1] * len(s) + [0] * pad)
        labels.append(shift_labels(s, [0] * len(p) + [1] * len(r)) + [IGNORE_INDEX] * pad)
        pos.append([len(p) - 1 + i for i in range(len(r))] + [0] * (R - len(r)))
        mask.append([1.0] * len(r) + [0.0] * (R - len(r)))
    t = {k: torch.tensor(v) for k, v in
         dict(input_ids=ids, attention_mask=att, labels=labels, pos=pos, mask=mask).items()}
    return t  # input_ids, attention_mask, labels (N, T); pos (N, R) int; mask (N, R) float


def gather_rows(acc, local: dict) -> dict:
    """Every rank's per-row results, concatenated in rank order (one process: its own). Lists are joined, (n,)
    tensors concatenated, (n, R_rank) tensors right-padded with zeros to the widest rank's R first."""
    from common.loop import gather_lists

    parts = gather_lists(acc, [local])
    out = {}
    for k, v in local.items():
        if isinstance(v, torch.Tensor) and v.dim() == 2:
            width = max(p[k].shape[1] for p in parts)
            out[k] = torch.cat([torch.nn.functional.pad(p[k], (0, width - p[k].shape[1])) for p in parts])
        elif isinstance(v, torch.Tensor):
            out[k] = torch.cat([p[k] for p in parts])
        else:
            out[k] = [x for p in parts for x in p[k]]
    return out


def response_logprobs(model, batch: dict, temperature: float, chunk_size: int | None, entropy: bool = False):
    """log pi(response tokens) (N, R) from a causal LM (and the entropies, no grad), at the sampler's temperature."""
    from model.logprobs import causal_lm_logprobs

    out = causal_lm_logprobs(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                             temperature=temperature, chunk_size=chunk_size, return_entropy=entropy)
    logp, ent = out if entropy else (out, None)  # (N, T)
    take = lambda x: x.gather(1, batch["pos"]) * batch["mask"]  # noqa: E731  (N, R)
    return (take(logp), take(ent)) if entropy else take(logp)


def label_count(rows: list[dict]) -> int:
    """Predicted (non-ignored) tokens of packed text rows."""
    from data.chatml import IGNORE_INDEX

    return sum(t != IGNORE_INDEX for r in rows for t in r["labels"])


def lm_loss(policy, rows: list[dict], pad_id: int, chunk_size: int | None, coef: float = 0.0,
            n_tokens: int | None = None) -> float:
    """Summed NLL of packed text rows divided by n_tokens (default: their own token count, i.e. the token mean); with
    coef > 0 also backpropagates coef x that loss (PPO-ptx) through the fused weighted_logprob_sum (gradient
    computed in the forward). A rank passes the global batch's n_tokens so the ranks' losses add up to the mean."""
    if not rows:
        return 0.0
    total = lm_loss_tensor(policy, rows, pad_id, chunk_size, coef, n_tokens)
    if coef > 0:
        total.backward()
    return float(total.detach()) / (coef if coef > 0 else 1.0)


def lm_loss_tensor(policy, rows: list[dict], pad_id: int, chunk_size: int | None, coef: float = 0.0,
                   n_tokens: int | None = None) -> torch.Tensor:
    """-coef x (summed log-probs of the rows' labels) / n_tokens as a scalar tensor (coef 0: the plain NLL, no graph);
    with coef > 0 its backward gives coef x the LM-loss gradient (PPO-ptx; under DeepSpeed the engine runs it)."""
    from data.chatml import IGNORE_INDEX
    from data.datasets import collate
    from model.logprobs import weighted_logprob_sum

    dev = next(policy.parameters()).device
    b = {k: v.to(dev) for k, v in collate(rows, pad_id).items()}
    valid = (b["labels"] != IGNORE_INDEX).float()  # (B, T)
    n = max(n_tokens if n_tokens is not None else float(valid.sum()), 1)
    with torch.set_grad_enabled(coef > 0):
        hidden = policy.get_decoder()(b["input_ids"], b["attention_mask"], b["position_ids"])  # (B, T, H)
        return weighted_logprob_sum(hidden, policy.get_output_embeddings().weight, b["labels"],
                                    -valid / n * (coef if coef > 0 else 1.0), chunk_size=chunk_size)


def heldout_loss(policy, rows: list[dict], pad_id: int, chunk_size: int | None, batch: int = 8, acc=None,
                 call=None) -> float:
    """Alignment tax probe: token-mean NLL over the held-out pretraining rows (no grad). With an accelerator of W
    processes each group of W x batch rows is split over the ranks and the partial sums added. `call(fn, *args)`
    runs fn(policy, *args) inside a DeepSpeed engine (align/zero.py); then every rank runs the same number of
    forwards (ZeRO-3 gathers weights in each), a rank without rows in a group scoring one row it then drops."""
    from common.loop import sum_over_ranks

    W, rank = (acc.num_processes, acc.process_index) if acc is not None else (1, 0)
    n_all = label_count(rows)
    run = call if call is not None else (lambda fn, *a, **k: fn(policy, *a, **k))  # noqa: E731
    total = 0.0
    for s in range(0, len(rows), W * batch):
        group = rows[s:s + W * batch]
        mine = group[rank::W]
        if mine:
            total += float(run(lm_loss, mine, pad_id, chunk_size, n_tokens=n_all))
        elif call is not None:
            run(lm_loss, group[:1], pad_id, chunk_size, n_tokens=n_all)  # a collective forward; result dropped
    return sum_over_ranks(acc, [total])[0] if acc is not None else total


def eos_ids(tok, gen_eos=()) -> list[int]:
    """The ids that end a reply: the model folder's generation-config EOS ids (model.checkpoint.generation_eos_ids,
    e.g. Qwen2.5's [<|im_end|>, <|endoftext|>]), plus <|im_end|> and <|endoftext|> where the tokenizer has them, plus
    its eos token."""
    from data.chatml import ENDOFTEXT, IM_END

    ids = [int(i) for i in gen_eos]
    for t in (IM_END, ENDOFTEXT, tok.eos_token):
        tid = None if t is None else tok.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid != tok.unk_token_id and tok.convert_ids_to_tokens(tid) == t and tid not in ids:
            ids.append(tid)
    if not ids:
        raise ValueError(f"tokenizer {type(tok).__name__} has no end-of-reply token (<|im_end|>, an eos token) and "
                         "the model folder's generation config names none")
    return ids


def stop_ids(tok, reward_tok=None, gen_eos=()) -> list[int]:
    """eos_ids, then <|reward|> (the policy's, and `reward_tok`'s when it reads the same ids): a response must never
    contain the token the reward model reads its score at (a second one would move the score), so sampling it ends
    the row (without counting as an EOS)."""
    from data.chatml import REWARD_TOKEN

    ids = eos_ids(tok, gen_eos)
    for t in (tok, reward_tok):
        rid = None if t is None else t.convert_tokens_to_ids(REWARD_TOKEN)
        if isinstance(rid, int) and rid != t.unk_token_id and rid not in ids:
            ids.append(rid)
    return ids
