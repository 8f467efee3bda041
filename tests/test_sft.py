"""SFT loop: the loss is the global token mean, resume is exact, the NaN guard keeps the last good checkpoint,
transformers models and LoRA work, two data-parallel ranks give the single-process loss."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from launcher import accelerate_launch
from numerics import assert_within, causal_lm_logprob_bounds, gamma

import align.sft as sft
from align.models import build_base_model
from align.sft import SFTConfig
from common.checkpoint import latest_checkpoint
from common.config import ConfigError, build_config
from common.guard import NonFiniteLossError
from common.loop import mini_batch_rows, rank_micro_batches
from common.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TINY = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "eos_token_id": 998, "pad_token_id": 996}
WORDS = "apple banana cherry dog egg fish grape house ice jam kite lemon".split()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    (d / "tiny.json").write_text(json.dumps(TINY))
    (d / "untied.json").write_text(json.dumps(TINY | {"tie_word_embeddings": False}))  # row-sparse embedding steps
    r = random.Random(0)
    with open(d / "sft.jsonl", "w") as f:
        for _ in range(24):
            q = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 6)))
            msgs = [{"role": "user", "content": "Repeat: " + q}, {"role": "assistant", "content": q}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return d


def make_config(files, out, **kw) -> SFTConfig:
    values = dict(init_config=str(files / "tiny.json"), tokenizer="small", train_files=[str(files / "sft.jsonl")],
                  seq_len=128, micro_batch_size_per_rank=2, grad_accum_steps=2, max_steps=4, warmup_steps=1,
                  lr=1e-3, output_dir=str(out))
    values.update(kw)
    return build_config(SFTConfig, values)


def test_mini_batch_plan_by_hand():
    """4 ranks-worth of rows [a b c d] with world 2, micro 1, accum 2: rank 0 -> [[a], [c]], rank 1 -> [[b], [d]].
    The plan is a permutation per epoch: 10 rows, mini batch 4 -> 2 steps/epoch, steps 0 and 1 are disjoint."""
    assert rank_micro_batches([7, 8, 9, 10], 1, 2, 2, 0) == [[7], [9]]
    assert rank_micro_batches([7, 8, 9, 10], 1, 2, 2, 1) == [[8], [10]]
    s0, s1 = mini_batch_rows(0, 10, 4, seed=3), mini_batch_rows(1, 10, 4, seed=3)
    assert len(set(s0) | set(s1)) == 8 and mini_batch_rows(0, 10, 4, seed=3) == s0
    with pytest.raises(ValueError, match="fewer than one mini batch"):
        mini_batch_rows(0, 3, 4, seed=0)


def test_config_errors_are_explicit(files, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of model_path"):
        make_config(files, tmp_path, model_path="x")
    with pytest.raises(ConfigError, match="warmup_steps \\(4\\) must be < max_steps"):
        make_config(files, tmp_path, warmup_steps=4)
    with pytest.raises(ConfigError, match="mask 'none' learns nothing"):
        make_config(files, tmp_path, mask="none")
    c = SFTConfig()  # recipe defaults, sec. 3.1.2
    assert (c.betas, c.weight_decay, c.grad_clip, c.seq_len, c.lr, c.warmup_steps, c.max_steps) == \
        ((0.9, 0.95), 0.1, 1.0, 2048, 2e-6, 1430, 4000)


def test_first_loss_is_token_mean_cross_entropy(files, tmp_path):
    """Step 1's loss must equal F.cross_entropy(reduction='sum') over the whole mini batch divided by its learned
    tokens, computed from full logits of the initial model (not a mean of per-micro-batch means)."""
    c = make_config(files, tmp_path / "run", max_steps=2)
    losses = sft.train(c)
    tok = sft.load_tokenizer("small")
    rows, _ = sft.build_rows(c, tok)
    torch.manual_seed(c.seed)
    model = build_base_model(c, None).eval()
    from data.datasets import collate

    batch = collate([rows[i] for i in mini_batch_rows(0, len(rows), 4, c.seed)], tok.pad_token_id)
    logits = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])  # (B, T, V)
    ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
    n = int((batch["labels"] != -100).sum())
    assert losses[0] == pytest.approx(ce.item() / n, rel=1e-5)
    # per-micro-batch means averaged would differ: the two micro batches have different token counts
    assert len(losses) == 2 and losses[1] < losses[0]


def test_resume_gives_the_same_losses(files, tmp_path):
    full = sft.train(make_config(files, tmp_path / "full", save_every=2))
    first = sft.train(make_config(files, tmp_path / "cut", stop_at_step=2))
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step-00000002"
    assert not (tmp_path / "cut" / "final").exists()
    rest = sft.train(make_config(files, tmp_path / "cut"))
    assert first + rest == full  # exact: same rows, same RNG, same optimizer and schedule state
    logged = [r["loss"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")]
    assert logged == full and (tmp_path / "cut" / "loss.png").is_file()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "cut" / "final")  # the HF folder loads in transformers
    assert hf.config.vocab_size == 1000


def test_untied_embedding_steps_row_sparse_like_dense_adamw_and_resumes(files, tmp_path, capsys):
    """An untied input embedding (Qwen2.5 7B and up) trains with row-sparse gradients by default: the same fused
    AdamW on the same numbers except that a row's gradient sums its tokens in another order (the dense embedding
    backward vs the sparse coalesce), and with clipping the norm too. So the final weights stay within that rounding
    carried through AdamW, as tests/test_sparse_adamw.py bounds it: per step lr x 2 (gamma(tokens) + gamma(params))
    plus the update's own rounding. Resume is exact, and a tied embedding stays dense."""
    from numerics import U32
    from safetensors.torch import load_file

    untied = dict(init_config=str(files / "untied.json"), max_steps=4, grad_clip=0.1)
    capsys.readouterr()
    sparse = sft.train(make_config(files, tmp_path / "sparse", **untied))
    assert "embedding row-sparse AdamW (untied)" in capsys.readouterr().out
    dense = sft.train(make_config(files, tmp_path / "dense", sparse_embedding_grad=False, **untied))
    assert "embedding dense AdamW" in capsys.readouterr().out
    assert sparse[0] == dense[0]
    a, b = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("sparse", "dense"))
    assert sorted(a) == sorted(b) and not torch.equal(a["model.embed_tokens.weight"], a["lm_head.weight"])
    n_params, n_tokens, lr, steps = sum(t.numel() for t in b.values()), 2 * 2 * 128, 1e-3, 4
    for k in b:
        bound = steps * (lr * 2 * (gamma(n_tokens) + gamma(n_params)) + 8 * U32 * (b[k].abs().double() + lr))
        assert_within(a[k], b[k].double(), bound, k)
    first = sft.train(make_config(files, tmp_path / "cut", stop_at_step=2, **untied))
    assert first + sft.train(make_config(files, tmp_path / "cut", **untied)) == sparse
    sft.train(make_config(files, tmp_path / "tied", max_steps=2))
    assert "embedding dense AdamW" in capsys.readouterr().out  # tied: the output layer's gradient is dense


def test_nan_loss_stops_and_keeps_last_good_checkpoint(files, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = sft.micro_loss_sum

    def poisoned(model, batch):  # 2 micro batches per step: calls 5+ belong to step 3
        calls["n"] += 1
        nll, n = real(model, batch)
        return (nll * float("nan") if calls["n"] > 4 else nll), n

    monkeypatch.setattr(sft, "micro_loss_sum", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss 'loss' is nan.*step-00000002"):
        sft.train(make_config(files, tmp_path, save_every=2))
    ck = latest_checkpoint(tmp_path / "checkpoints")
    assert ck.name == "step-00000002" and [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_transformers_model_with_lora(files, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**{k: v for k, v in TINY.items() if k != "model_type"})
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "base")
    c = make_config(files, tmp_path / "run", init_config=None, model_path=str(tmp_path / "base"), model_impl="hf",
                    lora_r=4, lora_alpha=8, max_steps=3, packing=False)
    first = sft.train(c)
    rest = sft.train(make_config(files, tmp_path / "run2", init_config=None, model_path=str(tmp_path / "base"),
                                 model_impl="hf", lora_r=4, lora_alpha=8, max_steps=3, stop_at_step=1, packing=False))
    rest += sft.train(make_config(files, tmp_path / "run2", init_config=None, model_path=str(tmp_path / "base"),
                                  model_impl="hf", lora_r=4, lora_alpha=8, max_steps=3, packing=False))
    assert rest == first and len(first) == 3  # LoRA adapter resume is exact too
    assert (tmp_path / "run2" / "checkpoints" / "step-00000003" / "model" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # merged full model
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    diff = (merged.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight).abs()
    assert diff.max() > 0 and torch.equal(merged.model.norm.weight, base.model.norm.weight)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["tiny.json", "untied.json"])
def test_two_ranks_equal_one_process(files, tmp_path, config):
    """Same global mini batch (4 rows): 1 process x micro 2 x accum 2 vs 2 ranks x micro 1 x accum 2; untied: the
    row-sparse embedding gradients go through DDP's all-reduce."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--init_config", str(files / config), "--tokenizer", "small", "--train_files",
            str(files / "sft.jsonl"), "--seq_len", "128", "--grad_accum_steps", "2", "--max_steps", "3",
            "--warmup_steps", "1", "--lr", "1e-3"]
    script = str(REPO / "align" / "sft.py")
    subprocess.run([sys.executable, script, *args, "--micro_batch_size_per_rank", "2", "--output_dir",
                    str(tmp_path / "one")], check=True, env=env, cwd=REPO)
    subprocess.run([*accelerate_launch("multi_cpu", tmp_path), script, *args, "--micro_batch_size_per_rank", "1",
                    "--output_dir", str(tmp_path / "two")], check=True, env=env, cwd=REPO)
    one = [r["loss"] for r in read_jsonl(tmp_path / "one" / "metrics.jsonl")]
    two = [r["loss"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl")]
    assert len(one) == 3 and two == pytest.approx(one, rel=1e-5)


@pytest.mark.numerics
def test_packed_rows_give_the_same_logprobs_as_separate_examples(files, tmp_path):
    """Packing must not let a document attend to the one before it. (transformers' sdpa Qwen2 fails this with
    restarting position_ids, so packing with model_impl=hf is refused at start-up.)"""
    from data.datasets import collate, pack_examples

    c = make_config(files, tmp_path, packing=False)
    lm = build_base_model(c, None).eval()
    tok = sft.load_tokenizer("small")
    examples = sft.build_rows(c, tok)[0][:3]
    from model.logprobs import causal_lm_logprobs

    def logprobs(b):
        return causal_lm_logprobs(lm, b["input_ids"], b["labels"], b["attention_mask"], b["position_ids"])

    with torch.no_grad():
        packed = pack_examples(examples, 512)
        assert len(packed) == 1
        b = collate(packed + [examples[0]], tok.pad_token_id)  # a padded second row as well
        together = logprobs(b)[0]  # (T,)
        alone = [logprobs(collate([e], tok.pad_token_id))[0] for e in examples]
        # and the training loss (the fused kernel inside LogprobWrapper) is the sum of those log-probs, negated
        nll = sft.LogprobWrapper(lm, 64)(b["input_ids"][:1], b["labels"][:1], b["attention_mask"][:1],
                                         b["position_ids"][:1])
    # Both within the rounding bound of each example alone in float64 (tests/numerics.py); the loss is minus their
    # sum, within the sum of the bounds plus the rounding of a sum of n terms.
    refs = [causal_lm_logprob_bounds(lm, b1["input_ids"], b1["labels"], attention_mask=b1["attention_mask"],
                                     position_ids=b1["position_ids"])
            for b1 in (collate([e], tok.pad_token_id) for e in examples)]
    ref, bound = torch.cat([r[0][0] for r in refs]), torch.cat([r[1][0] for r in refs])
    assert_within(together[:len(ref)], ref, bound, "packed row")
    assert_within(torch.cat(alone), ref, bound, "examples alone")
    assert_within(nll, -ref.sum(), bound.sum() + gamma(len(ref)) * ref.abs().sum(), "fused loss of the packed row")
    with pytest.raises(ConfigError, match="packing needs model_impl: custom"):
        make_config(files, tmp_path, init_config=None, model_path="m", model_impl="hf")
