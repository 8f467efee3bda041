"""Correctness against a peer: our DPO loss equals TRL 1.16's DPOTrainer loss on the same model, batch and reference.

Same tiny Qwen2 (transformers, random weights, saved to a folder both load), a different reference model (so the
loss is not trivially log 2), the same 4 pairs, both in fp32. TRL gets the ChatML text we render and tokenises it
itself; the test first checks TRL's token ids equal ours. TRL's loss for one batch is `trainer.compute_loss` on
its own collated batch.
"""

from __future__ import annotations

import pytest
import torch
from numerics import U32, assert_within, causal_lm_logprob_bounds

from align.dpo import pair_batch
from align.sequences import SequenceLogprobs
from align.dpo_losses import chosen_nll_loss, ipo_loss, sigmoid_dpo_loss
from data.chatml import IM_END, render
from data.datasets import build_preference_examples

TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=998,
            pad_token_id=996)
RECORDS = [
    {"prompt": [{"role": "user", "content": "Say hello in Chinese."}],
     "chosen": [{"role": "assistant", "content": "你好！"}],
     "rejected": [{"role": "assistant", "content": "Hello there, how are you doing today?"}]},
    {"prompt": [{"role": "user", "content": "天氣如何？"}],
     "chosen": [{"role": "assistant", "content": "今天天氣很好，希望有幫助！"}],
     "rejected": [{"role": "assistant", "content": "不知道。"}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
     "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "It is 5, I think."}]},
    {"prompt": [{"role": "user", "content": "Name a fruit."}],
     "chosen": [{"role": "assistant", "content": "An apple. Hope this helps!"}],
     "rejected": [{"role": "assistant", "content": "A carrot."}]},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_tok):
    """Policy and reference folders, our pairs, and a TRL DPOTrainer over the same records as ChatML text."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from trl import DPOConfig, DPOTrainer

    d = tmp_path_factory.mktemp("dpo_trl")
    for name, seed in (("policy", 0), ("ref", 1)):
        torch.manual_seed(seed)
        Qwen2ForCausalLM(Qwen2Config(**TINY)).save_pretrained(d / name)
    pairs, _ = build_preference_examples(RECORDS, small_tok, max_len=256)
    text = [{"prompt": render(r["prompt"], add_generation_prompt=True),
             "chosen": r["chosen"][0]["content"] + IM_END, "rejected": r["rejected"][0]["content"] + IM_END}
            for r in RECORDS]
    # bf16=False: TRL defaults to bf16 autocast, which accelerate applies to the prepared reference model only.
    args = DPOConfig(output_dir=str(d / "trl"), use_cpu=True, bf16=False, beta=0.1, per_device_train_batch_size=4,
                     max_length=None, report_to=[], precompute_ref_log_probs=False, seed=0, save_strategy="no")
    trainer = DPOTrainer(model=str(d / "policy"), ref_model=AutoModelForCausalLM.from_pretrained(d / "ref"),
                         args=args, train_dataset=Dataset.from_list(text), processing_class=small_tok)
    return d, pairs, trainer


def trl_loss(trainer, loss_types, weights):
    """TRL's loss on its own collated batch of the 4 pairs, with gradients (policy in train mode, dropout off)."""
    trainer.loss_types, trainer.loss_weights = loss_types, weights  # what DPOConfig(loss_type, loss_weights) sets
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(RECORDS))])
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    return trainer.compute_loss(trainer.model, batch)


def our_logps(d, pairs, pad_id, name, grad):
    from model.checkpoint import load_causal_lm

    lm = load_causal_lm(d / name)
    with torch.set_grad_enabled(grad):
        logps = SequenceLogprobs(lm, chunk_size=16)(**pair_batch(pairs, pad_id))  # (2B,) chosen then rejected
    return lm, logps.chunk(2)


def test_trl_tokenises_the_same_ids(setup):
    _, pairs, trainer = setup
    for i, p in enumerate(pairs):
        ex = trainer.train_dataset[i]
        assert (ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) == \
            (p["prompt_ids"], p["chosen_ids"], p["rejected_ids"])


def our_loss(loss_type, pairs, pc, pr, rc, rr):
    if loss_type == "ipo":
        n_c = torch.tensor([len(p["chosen_ids"]) for p in pairs])
        n_r = torch.tensor([len(p["rejected_ids"]) for p in pairs])
        return ipo_loss(pc, pr, rc, rr, beta=0.1, chosen_lengths=n_c, rejected_lengths=n_r)
    loss, stats = sigmoid_dpo_loss(pc, pr, rc, rr, beta=0.1)
    if loss_type == "sigmoid+sft":
        loss = loss + 0.5 * chosen_nll_loss(pc, sum(len(p["chosen_ids"]) for p in pairs))
    return loss, stats


def loss_reference(d, pairs, pad_id, loss_type):
    """The loss in float64 (float64 copies of both models) and the bound on an fp32 evaluation's error: each summed
    log-prob S_i within its rounding bound dS_i (tests/numerics.py), carried to the loss to first order,
    sum |dL/dS_i| dS_i, plus the loss formula's own roundings: at most 16 operations (log-ratio differences, the
    division by beta and by the lengths, the square or log-sigmoid, the mean) on terms of size |dL/dS_i| |S_i|."""
    from data.chatml import IGNORE_INDEX
    from model.checkpoint import load_causal_lm

    b = pair_batch(pairs, pad_id)
    sums, bounds = [], []
    for name in ("policy", "ref"):
        logp, bound = causal_lm_logprob_bounds(load_causal_lm(d / name), b["input_ids"], b["labels"],
                                               attention_mask=b["attention_mask"], position_ids=b["position_ids"])
        n = (b["labels"] != IGNORE_INDEX).sum(1)  # (2B,) terms in each sum
        sums.append(logp.sum(1).requires_grad_())
        bounds.append(bound.sum(1) + (n * U32 / (1 - n * U32)) * logp.abs().sum(1))
    pc, pr = sums[0].chunk(2)
    rc, rr = sums[1].chunk(2)
    loss, _ = our_loss(loss_type, pairs, pc, pr, rc, rr)
    grads = torch.autograd.grad(loss, sums)
    first_order = sum((g.abs() * db).sum() for g, db in zip(grads, bounds))
    size = loss.abs() + sum((g.abs() * s.abs()).sum() for g, s in zip(grads, sums))
    return loss.detach(), (first_order + 16 * U32 * size).detach()


@pytest.mark.numerics
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid+sft"])
def test_loss_and_gradients_equal_trl(setup, small_tok, loss_type):
    """Ours and TRL's loss, both within the fp32 rounding bound of the loss in float64, for sigmoid DPO, IPO
    (per-token log-ratios, as TRL) and DPO + 0.5 x chosen NLL (TRL's 'sft' loss: token mean over the chosen
    replies); policy gradients agree to 1e-4 relative (absolute: 1e-6 of the largest entry)."""
    d, pairs, trainer = setup
    types, weights = {"sigmoid": (["sigmoid"], [1.0]), "ipo": (["ipo"], [1.0]),
                      "sigmoid+sft": (["sigmoid", "sft"], [1.0, 0.5])}[loss_type]
    theirs = trl_loss(trainer, types, weights)
    theirs.backward()

    lm, (pc, pr) = our_logps(d, pairs, small_tok.pad_token_id, "policy", grad=True)
    _, (rc, rr) = our_logps(d, pairs, small_tok.pad_token_id, "ref", grad=False)
    ours, stats = our_loss(loss_type, pairs, pc, pr, rc, rr)
    if loss_type != "ipo":
        assert stats["margin"].abs().item() > 0.01  # a real test: policy and reference differ
    ours.backward()
    ref, bound = loss_reference(d, pairs, small_tok.pad_token_id, loss_type)
    print(f"{loss_type}: ours {ours.item():.8f} TRL {theirs.item():.8f} float64 {ref.item():.8f} "
          f"bound {bound.item():.2e}")
    assert_within(ours, ref, bound, "our loss")
    assert_within(theirs, ref, bound, "TRL's loss")
    trl_params = dict(trainer.model.named_parameters())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight",
                 "model.embed_tokens.weight"):
        g_ours, g_trl = dict(lm.named_parameters())[name].grad, trl_params[name].grad
        torch.testing.assert_close(g_ours, g_trl, rtol=1e-4, atol=1e-6 * g_trl.abs().max().item())
