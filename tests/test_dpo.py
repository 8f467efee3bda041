"""DPO: losses against hand-computed values; the trainer's first loss against a naive full-logits computation,
exact resume, the NaN guard, LoRA with the adapter-disabled reference, cached == on-the-fly reference."""

from __future__ import annotations

import pytest
import torch

from align.dpo_losses import chosen_nll_loss, conservative_dpo_loss, ipo_loss, sigmoid_dpo_loss

# Two pairs used by the hand computations below, beta = 0.5:
#   chosen log-ratios   = policy_chosen - ref_chosen     = [-1 + 1.5, -3 + 2] = [0.5, -1]
#   rejected log-ratios = policy_rejected - ref_rejected = [-2 + 1.5, -1 + 2] = [-0.5, 1]
#   delta = [1, -2]; beta * delta = z = [0.5, -1]
PC, PR = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
RC, RR = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])


def test_sigmoid_dpo_by_hand():
    """-log sigmoid(z) = log(1 + e^-z): z = 0.5 -> 0.474077, z = -1 -> 1.313262; mean 0.893669.
    rewards chosen 0.5 * [0.5, -1] = [0.25, -0.5] (mean -0.125), rejected 0.5 * [-0.5, 1] (mean 0.125),
    margins [0.5, -1] (mean -0.25), accuracy 1/2.
    d loss / d policy_chosen_b = -(1/B) beta sigmoid(-z_b) = -0.25 * [sigmoid(-0.5), sigmoid(1)]
    = [-0.094385, -0.182765]."""
    pc = PC.clone().requires_grad_()
    loss, s = sigmoid_dpo_loss(pc, PR, RC, RR, beta=0.5)
    assert loss.item() == pytest.approx(0.893669, abs=1e-6)
    assert s["chosen_reward"].item() == pytest.approx(-0.125) and s["rejected_reward"].item() == pytest.approx(0.125)
    assert s["margin"].item() == pytest.approx(-0.25) and s["accuracy"].item() == 0.5
    loss.backward()
    assert pc.grad.tolist() == pytest.approx([-0.094385, -0.182765], abs=1e-6)


def test_sigmoid_dpo_default_beta_and_stability():
    """beta defaults to 0.1 (DPO paper); policy == reference gives margin 0 and loss log 2 = 0.693147.
    A margin of -2000 (beta 0.1 x delta -20000) stays finite: log(1 + e^2000) = 2000."""
    loss, s = sigmoid_dpo_loss(PC, PR, PC, PR)
    assert loss.item() == pytest.approx(0.693147, abs=1e-6) and s["accuracy"].item() == 0.0
    loss, _ = sigmoid_dpo_loss(torch.tensor([-10000.0]), torch.tensor([10000.0]), torch.zeros(1), torch.zeros(1))
    assert loss.item() == pytest.approx(2000.0)
    with pytest.raises(ValueError, match="four \\(B,\\) log-prob tensors"):
        sigmoid_dpo_loss(PC, PR, RC, RR[:1])


def test_conservative_dpo_by_hand():
    """eps = 0.25: -(0.75) log sigmoid(z) - 0.25 log sigmoid(-z), with -log sigmoid(-z) = z + -log sigmoid(z):
    z = 0.5: 0.75 * 0.474077 + 0.25 * 0.974077 = 0.599077; z = -1: 0.75 * 1.313262 + 0.25 * 0.313262 = 1.063262;
    mean 0.831169. eps = 0 is plain DPO (0.893669); eps = 0.5 is refused (the loss would ignore the labels)."""
    loss, s = conservative_dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.25)
    assert loss.item() == pytest.approx(0.831169, abs=1e-6) and s["margin"].item() == pytest.approx(-0.25)
    loss0, _ = conservative_dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.0)
    assert loss0.item() == pytest.approx(0.893669, abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        conservative_dpo_loss(PC, PR, RC, RR, label_smoothing=0.5)


def test_ipo_by_hand():
    """beta = 0.5 -> target 1 / (2 beta) = 1. Summed log-ratio gaps h = [1, -2]: ((1 - 1)^2 + (-2 - 1)^2) / 2 = 4.5.
    Per token with chosen lengths [2, 4] and rejected [1, 2]: h = [0.5/2 + 0.5/1, -1/4 - 1/2] = [0.75, -0.75]:
    ((0.75 - 1)^2 + (-0.75 - 1)^2) / 2 = (0.0625 + 3.0625) / 2 = 1.5625. Rewards stats stay the summed ones."""
    loss, s = ipo_loss(PC, PR, RC, RR, beta=0.5)
    assert loss.item() == pytest.approx(4.5)
    loss, s = ipo_loss(PC, PR, RC, RR, beta=0.5, chosen_lengths=torch.tensor([2, 4]),
                       rejected_lengths=torch.tensor([1, 2]))
    assert loss.item() == pytest.approx(1.5625) and s["margin"].item() == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="both chosen_lengths and rejected_lengths"):
        ipo_loss(PC, PR, RC, RR, chosen_lengths=torch.tensor([2, 4]))


def test_chosen_nll_by_hand():
    """Summed chosen log-probs [-1, -3] over 8 chosen tokens: token-mean NLL = 4 / 8 = 0.5; d/d pc = -1/8 each."""
    pc = PC.clone().requires_grad_()
    loss = chosen_nll_loss(pc, 8)
    loss.backward()
    assert loss.item() == 0.5 and pc.grad.tolist() == [-0.125, -0.125]


# ----------------------------------------------------------------------------------------------------------------
# The trainer (align/dpo.py) on a tiny model and a small tokenizer.

import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import align.dpo as dpo  # noqa: E402
from align.dpo import DPOConfig  # noqa: E402
from align.models import build_base_model  # noqa: E402
from common.checkpoint import latest_checkpoint  # noqa: E402
from common.config import ConfigError, build_config  # noqa: E402
from common.guard import NonFiniteLossError  # noqa: E402
from common.metrics import read_jsonl  # noqa: E402
from launcher import accelerate_launch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "eos_token_id": 998, "pad_token_id": 996}
WORDS = "apple banana cherry dog egg fish grape house ice jam kite lemon".split()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """16 pairs: chosen repeats the words asked for, rejected repeats other words (different lengths)."""
    d = tmp_path_factory.mktemp("dpo")
    (d / "tiny.json").write_text(json.dumps(TINY))
    r = random.Random(0)
    with open(d / "pairs.jsonl", "w") as f:
        for _ in range(16):
            q = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 5)))
            bad = " ".join(r.choice(WORDS) for _ in range(r.randint(1, 6)))
            rec = {"prompt": [{"role": "user", "content": "Repeat: " + q}],
                   "chosen": [{"role": "assistant", "content": q}], "rejected": [{"role": "assistant", "content": bad}]}
            f.write(json.dumps(rec) + "\n")
    return d


def make_config(files, out, **kw) -> DPOConfig:
    values = dict(init_config=str(files / "tiny.json"), tokenizer="small", train_files=[str(files / "pairs.jsonl")],
                  seq_len=128, micro_batch_size_per_rank=2, grad_accum_steps=2, max_steps=4, warmup_steps=1,
                  lr=1e-2, min_lr_ratio=0.1, output_dir=str(out), ref_batch_size=3)
    values.update(kw)
    return build_config(DPOConfig, values)


def test_config_errors_are_explicit(files, tmp_path):
    with pytest.raises(ConfigError, match="loss_type must be one of"):
        make_config(files, tmp_path, loss_type="hinge")
    with pytest.raises(ConfigError, match="only applies to loss_type 'conservative'"):
        make_config(files, tmp_path, label_smoothing=0.1)
    with pytest.raises(ConfigError, match="needs 0 < label_smoothing < 0.5"):
        make_config(files, tmp_path, loss_type="conservative")
    with pytest.raises(ConfigError, match="reference must be 'cached' or 'online'"):
        make_config(files, tmp_path, reference="none")
    c = DPOConfig()
    assert (c.beta, c.loss_type, c.reference, c.lr, c.warmup_steps) == (0.1, "sigmoid", "cached", 1e-6, 150)


def naive_dpo_losses(c: DPOConfig, steps: int) -> list[float]:
    """The obvious implementation: full (2B, T, V) logits, log_softmax + gather, the whole mini batch in one
    forward, a deep copy of the initial model as reference, the same AdamW / schedule / clipping."""
    from common.loop import mini_batch_rows
    from common.optim import build_adamw, warmup_cosine
    from model.logprobs import reference_logprobs

    tok = dpo.load_tokenizer("small")
    pairs, _ = dpo.build_pairs(c, tok)
    torch.manual_seed(c.seed)
    model = build_base_model(c, None).train()
    ref = copy.deepcopy(model).eval()
    opt = build_adamw(model, c.lr, c.betas, c.eps, c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, c.warmup_steps, c.max_steps,
                                                                           c.min_lr_ratio))
    mini, losses = c.micro_batch_size_per_rank * c.grad_accum_steps, []
    for step in range(steps):
        chunk = [pairs[i] for i in mini_batch_rows(step, len(pairs), mini, c.seed)]
        b = dpo.pair_batch(chunk, tok.pad_token_id)
        args = (b["input_ids"], b["attention_mask"], b["position_ids"])
        logp = reference_logprobs(model(*args), b["labels"]).sum(-1)  # (2B,)
        with torch.no_grad():
            ref_logp = reference_logprobs(ref(*args), b["labels"]).sum(-1)
        pc, pr = logp.chunk(2)
        loss = sigmoid_dpo_loss(pc, pr, *ref_logp.chunk(2), beta=c.beta)[0]
        loss = loss + c.sft_coef * -pc.sum() / sum(len(p["chosen_ids"]) for p in chunk)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        opt.step(), sched.step(), opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_losses_equal_the_naive_implementation(files, tmp_path):
    """3 steps of DPO + 0.5 x chosen NLL with micro batch 2 x accum 2 (chunked, response rows only, cached
    reference) equal the full-logits whole-mini-batch version: the accumulation scaling, the global token mean of
    the NLL and the reference are right. Step 1 is log 2 + 0.5 NLL (policy == reference); later steps move."""
    c = make_config(files, tmp_path / "run", sft_coef=0.5, max_steps=3)
    ours = dpo.train(c)
    naive = naive_dpo_losses(c, 3)
    assert ours == pytest.approx(naive, rel=1e-5)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["dpo_loss"] == pytest.approx(0.693147, abs=1e-6) and rows[0]["margin"] == 0.0
    assert rows[1]["margin"] != 0.0 and rows[1]["dpo_loss"] != rows[0]["dpo_loss"]  # the policy left the reference


def test_resume_and_online_reference(files, tmp_path):
    """Stopping at step 2 and resuming (the cached reference table comes back from the checkpoint) gives exactly
    the uninterrupted losses; a reference forward per micro batch ('online', a frozen copy of the starting model)
    gives the cached losses to float precision."""
    full = dpo.train(make_config(files, tmp_path / "full", save_every=2))
    first = dpo.train(make_config(files, tmp_path / "cut", stop_at_step=2))
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step-00000002"
    rest = dpo.train(make_config(files, tmp_path / "cut"))
    assert first + rest == full
    assert [r["loss"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")] == full
    online = dpo.train(make_config(files, tmp_path / "online", reference="online"))
    assert online == pytest.approx(full, rel=1e-5)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "cut" / "final").config.vocab_size == 1000


def test_nan_loss_stops_and_keeps_last_good_checkpoint(files, tmp_path, monkeypatch):
    """With the IPO loss: step 1 has policy == reference, so h = 0 and the loss is (0 - 1 / (2 x 0.1))^2 = 25."""
    calls = {"n": 0}
    real = dpo.preference_loss

    def poisoned(*args):  # 2 micro batches per step: calls 5+ belong to step 3
        calls["n"] += 1
        loss, stats = real(*args)
        return (loss * float("nan") if calls["n"] > 4 else loss), stats

    monkeypatch.setattr(dpo, "preference_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss 'loss' is nan.*step-00000002"):
        dpo.train(make_config(files, tmp_path, save_every=2, loss_type="ipo"))
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000002"
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == pytest.approx(25.0)
    assert rows[1]["loss"] < 25.0


def test_lora_reference_is_the_base_model(files, tmp_path):
    """transformers Qwen2 + LoRA: the online reference (adapter disabled each micro batch) equals the cached one;
    were the adapter left on, the online reference would follow the policy and the DPO loss would stay log 2.
    The LoRA resume is exact."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in TINY.items() if k != "model_type"})).save_pretrained(
        tmp_path / "base")
    kw = dict(init_config=None, model_path=str(tmp_path / "base"), model_impl="hf", lora_r=4, lora_alpha=8,
              max_steps=3)
    cached = dpo.train(make_config(files, tmp_path / "cached", **kw))
    online = dpo.train(make_config(files, tmp_path / "online", reference="online", **kw))
    assert online == pytest.approx(cached, rel=1e-5) and abs(cached[1] - 0.693147) > 1e-3
    cut = dpo.train(make_config(files, tmp_path / "cut", stop_at_step=1, **kw))
    cut += dpo.train(make_config(files, tmp_path / "cut", **kw))
    assert cut == cached


@pytest.mark.slow
def test_two_ranks_equal_one_process(files, tmp_path):
    """Same global mini batch (4 pairs), DPO + chosen NLL: 1 process x micro 2 x accum 2 vs 2 ranks x micro 1 x
    accum 2 (the reference table is computed in shares and gathered)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--init_config", str(files / "tiny.json"), "--tokenizer", "small", "--train_files",
            str(files / "pairs.jsonl"), "--seq_len", "128", "--grad_accum_steps", "2", "--max_steps", "3",
            "--warmup_steps", "1", "--lr", "1e-2", "--sft_coef", "0.5"]
    script = str(REPO / "align" / "dpo.py")
    subprocess.run([sys.executable, script, *args, "--micro_batch_size_per_rank", "2", "--output_dir",
                    str(tmp_path / "one")], check=True, env=env, cwd=REPO)
    subprocess.run([*accelerate_launch("multi_cpu", tmp_path), script, *args, "--micro_batch_size_per_rank", "1",
                    "--output_dir", str(tmp_path / "two")], check=True, env=env, cwd=REPO)
    one = [r["loss"] for r in read_jsonl(tmp_path / "one" / "metrics.jsonl")]
    two = [r["loss"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl")]
    assert len(one) == 3 and two == pytest.approx(one, rel=1e-5)
