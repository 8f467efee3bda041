"""Correctness against a peer: our KTO loss equals TRL 1.16's KTOTrainer loss on the same model, batch and reference.

Two tiny Qwen2 models (transformers, random weights, saved to folders both load) serve as policy and reference,
in both orders: the mean log-ratio of the mismatched pairs is positive one way (z0 > 0) and negative the other (z0
clamped to 0), so both branches of the reference point are compared. The same 4 rated replies (3 up, 1 down),
fp32. TRL gets the ChatML text we render and tokenises it itself; the test first checks that TRL's token ids, and
its mismatched (KL) completions, equal ours. TRL's loss for one batch is `trainer.compute_loss` on its own collated
batch; ours is align.kto's pieces: SequenceLogprobs on our model, the mini batch's shifted pairs (kl_donors),
kl_reference_point and kto_loss.
"""

from __future__ import annotations

import pytest
import torch

from align.kto import kl_donors, kl_sequences, matched_sequences
from align.kto_losses import kl_reference_point, kto_loss
from align.sequences import SequenceLogprobs, sequence_batch
from data.chatml import IM_END, render
from data.datasets import build_unpaired_examples

TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=998,
            pad_token_id=996)
RECORDS = [
    {"prompt": [{"role": "user", "content": "Say hello in Chinese."}],
     "completion": [{"role": "assistant", "content": "你好！"}], "label": True},
    {"prompt": [{"role": "user", "content": "天氣如何？"}],
     "completion": [{"role": "assistant", "content": "不知道。"}], "label": False},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
     "completion": [{"role": "assistant", "content": "4"}], "label": True},
    {"prompt": [{"role": "user", "content": "Name a fruit."}],
     "completion": [{"role": "assistant", "content": "An apple. Hope this helps!"}], "label": True},
]
BETA = 0.1


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_tok):
    """Model folders "a" and "b", our rows, and the records as ChatML text for TRL."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("kto_trl")
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        Qwen2ForCausalLM(Qwen2Config(**TINY)).save_pretrained(d / name)
    rows, _ = build_unpaired_examples(RECORDS, small_tok, max_len=256)
    text = [{"prompt": render(r["prompt"], add_generation_prompt=True),
             "completion": r["completion"][0]["content"] + IM_END, "label": r["label"]} for r in RECORDS]
    return d, rows, text


def trl_trainer(d, text, small_tok, policy: str, ref: str, desirable_weight: float, undesirable_weight: float):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    # bf16=False: TRL defaults to bf16 autocast; gradient_checkpointing off (TRL's default is on; values agree
    # either way, this keeps the comparison to the plain forward)
    args = KTOConfig(output_dir=str(d / "trl"), use_cpu=True, bf16=False, beta=BETA, per_device_train_batch_size=4,
                     max_length=None, report_to=[], seed=0, save_strategy="no", gradient_checkpointing=False,
                     desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    return KTOTrainer(model=str(d / policy), ref_model=AutoModelForCausalLM.from_pretrained(d / ref), args=args,
                      train_dataset=Dataset.from_list(text), processing_class=small_tok)


def test_trl_tokenises_the_same_ids_and_kl_pairs(setup, small_tok):
    d, rows, text = setup
    trainer = trl_trainer(d, text, small_tok, "a", "b", 1.0, 1.0)
    donors = kl_donors(list(range(len(rows))))
    for i, r in enumerate(rows):
        ex = trainer.train_dataset[i]
        assert (ex["prompt_ids"], ex["completion_ids"], ex["label"]) == \
            (r["prompt_ids"], r["completion_ids"], r["label"])
        assert ex["KL_completion_ids"] == rows[donors[i]]["completion_ids"]


def our_logps(d, name, seqs, pad_id, grad):
    from model.checkpoint import load_causal_lm

    lm = load_causal_lm(d / name)
    with torch.set_grad_enabled(grad):
        return lm, SequenceLogprobs(lm, chunk_size=16)(**sequence_batch(seqs, pad_id))  # (B,)


@pytest.mark.parametrize("policy,ref,weights", [("a", "b", (1.0, 1.0)), ("b", "a", (1.0, 1.0)),
                                                ("a", "b", (0.8, 2.5))])
def test_loss_and_gradients_equal_trl(setup, small_tok, policy, ref, weights):
    """|ours - TRL| < 1e-5 for the loss, the reference point (TRL's logged `kl`) and the implicit rewards; policy
    gradients agree to 1e-4 relative (absolute: 1e-6 of the largest entry). Weights (0.8, 2.5) check lambda_D and
    lambda_U land on the right rows."""
    d, rows, text = setup
    trainer = trl_trainer(d, text, small_tok, policy, ref, *weights)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    trl_kl = trainer._metrics["train"]["kl"][-1]

    idx = list(range(len(rows)))
    pad = small_tok.pad_token_id
    lm, logps = our_logps(d, policy, matched_sequences(rows, idx), pad, grad=True)
    _, ref_logps = our_logps(d, ref, matched_sequences(rows, idx), pad, grad=False)
    kl_seqs = kl_sequences(rows, idx, kl_donors(idx))
    _, kl_pol = our_logps(d, policy, kl_seqs, pad, grad=False)
    _, kl_ref = our_logps(d, ref, kl_seqs, pad, grad=False)
    z0 = kl_reference_point(kl_pol, kl_ref)
    up = torch.tensor([r["label"] for r in rows])
    ours, stats = kto_loss(logps, ref_logps, up, z0, BETA, *weights)
    ours.backward()
    raw = (kl_pol - kl_ref).mean().item()
    print(f"{policy}/{ref} {weights}: ours {ours.item():.8f} TRL {theirs.item():.8f} "
          f"diff {abs(ours.item() - theirs.item()):.2e}; z0 {z0.item():.6f} (raw {raw:.4f}) TRL kl {trl_kl:.6f}")
    assert abs(raw) > 0.01  # a real test: the pairs' log-ratios do not cancel
    # z0 is a mean of differences of summed log-probs down to -125 (18 tokens x log 1000): fp32 rounding of two
    # different forward implementations is ~1e-5 there; it enters the loss only through beta x sigmoid' (< 0.025x)
    assert (z0.item() > 0) == (raw > 0) and z0.item() == pytest.approx(trl_kl, abs=5e-5)
    assert abs(ours.item() - theirs.item()) < 1e-5
    reward_up = stats["reward"][up].mean().item()
    assert reward_up == pytest.approx(trainer._metrics["train"]["rewards/chosen"][-1], abs=1e-5)
    trl_params = dict(trainer.model.named_parameters())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight",
                 "model.embed_tokens.weight"):
        g_ours, g_trl = dict(lm.named_parameters())[name].grad, trl_params[name].grad
        torch.testing.assert_close(g_ours, g_trl, rtol=1e-4, atol=1e-6 * g_trl.abs().max().item())


def test_both_signs_of_the_reference_point_are_covered(setup, small_tok):
    """Swapping policy and reference flips the sign of every mismatched log-ratio: one order has z0 > 0, the other
    is clamped to 0, so the parametrised comparison above exercises both."""
    d, rows, _ = setup
    idx = list(range(len(rows)))
    seqs = kl_sequences(rows, idx, kl_donors(idx))
    a, b = (our_logps(d, name, seqs, small_tok.pad_token_id, grad=False)[1] for name in ("a", "b"))
    z_ab, z_ba = kl_reference_point(a, b).item(), kl_reference_point(b, a).item()
    assert (z_ab > 0.01 and z_ba == 0.0) or (z_ba > 0.01 and z_ab == 0.0)
