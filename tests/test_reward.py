"""Reward model: pairwise loss by hand, score position and invariance, training, benchmark."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from launcher import accelerate_launch
from numerics import assert_within, logits_bound

from reward.losses import pairwise_loss


def test_pairwise_loss_by_hand():
    """diffs = [2 - 0, 1 - 1, 0 - 3] = [2, 0, -3]
    -log sigmoid(x) = log(1 + e^-x): log(1 + e^-2) = 0.126928, log 2 = 0.693147, log(1 + e^3) = 3.048587
    loss = (0.126928 + 0.693147 + 3.048587) / 3 = 1.289554; accuracy 1/3 (the tie counts as wrong); margin -1/3."""
    rc, rr = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 3.0])
    loss, stats = pairwise_loss(rc, rr)
    assert loss.item() == pytest.approx(1.289554, abs=1e-6)
    assert stats["accuracy"].item() == pytest.approx(1 / 3) and stats["margin"].item() == pytest.approx(-1 / 3)


def test_pairwise_loss_margin_by_hand():
    """margin [1, 0]: diffs [2, 0] -> logits [1, 0]: (log(1 + e^-1) + log 2) / 2 = (0.313262 + 0.693147) / 2
    = 0.503204; the reported margin is the raw mean diff 1.0."""
    loss, stats = pairwise_loss(torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.0]), margin=torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(0.503204, abs=1e-6)
    assert stats["margin"].item() == 1.0 and stats["accuracy"].item() == 0.5


def test_pairwise_loss_is_stable_and_has_gradient():
    """diff = -200: log(1 + e^200) = 200 (to float precision), no inf; d loss / d r_chosen = -sigmoid(-diff) = -1."""
    rc = torch.tensor([-100.0], requires_grad=True)
    loss, _ = pairwise_loss(rc, torch.tensor([100.0]))
    loss.backward()
    assert loss.item() == pytest.approx(200.0) and rc.grad.item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="expected two"):
        pairwise_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    assert math.isfinite(pairwise_loss(torch.zeros(1), torch.zeros(1))[0].item())


# ------------------------------------------------------------------------------------------- model and training
import json  # noqa: E402
import random  # noqa: E402

from common.checkpoint import latest_checkpoint  # noqa: E402
from common.config import ConfigError, build_config  # noqa: E402
from common.metrics import read_jsonl  # noqa: E402
from reward.model import (load_reward_model, load_tokenizer, pad_sequences, reward_positions,  # noqa: E402
                          reward_token_id, score, score_pairs)

TINY = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": True}
WORDS = "apple banana cherry dog egg fish grape house ice jam kite lemon".split()


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from model.checkpoint import save_causal_lm
    from model.qwen import QwenConfig, QwenForCausalLM

    d = tmp_path_factory.mktemp("rm") / "lm"
    save_causal_lm(QwenForCausalLM(QwenConfig(**TINY)).init_weights(seed=0), d)
    return d


def _pairs_file(path, n, seed):
    """Separable toy comparisons: the chosen reply repeats the request, the rejected one is unrelated words."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 5)))
            bad = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 5))) + " no"
            f.write(json.dumps({"prompt": [{"role": "user", "content": "Repeat: " + q}],
                                "chosen": [{"role": "assistant", "content": q}],
                                "rejected": [{"role": "assistant", "content": bad}]}) + "\n")
    return path


@pytest.mark.numerics
def test_scores_do_not_depend_on_batch_padding_side_or_length(lm_dir):
    """docs/PITFALLS.md#reward-position: the same pair scored alone, next to longer sequences, left- or
    right-padded, with extra padding, gets the same two scores; the score is read at <|reward|>, not at the last
    non-pad token."""
    tok = load_tokenizer("small")
    rid, pad = reward_token_id(tok), tok.pad_token_id
    model = load_reward_model(str(lm_dir)).eval()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pair = [enc("Repeat: egg fish") + [rid], enc("Repeat: dog") + [rid]]
    others = [enc("a much longer sequence with many more words in it " * 3) + [rid], enc("x") + [rid]]

    def run(seqs, side, extra=0):
        ids, mask = pad_sequences(seqs, pad, side)
        ids = torch.cat([ids, torch.full((len(seqs), extra), pad)], 1) if side == "right" else \
            torch.cat([torch.full((len(seqs), extra), pad), ids], 1)
        mask = torch.cat([mask, torch.zeros(len(seqs), extra, dtype=torch.long)], 1) if side == "right" else \
            torch.cat([torch.zeros(len(seqs), extra, dtype=torch.long), mask], 1)
        with torch.no_grad():
            return score(model, ids, mask, rid)

    # Each score within the fp32 rounding bound of the pair scored alone in float64 (tests/numerics.py).
    m64 = copy.deepcopy(model).double()
    key_len = max(len(s) for s in pair + others) + 7  # the longest padded row below
    with torch.no_grad():
        h = [m64.model(torch.tensor([s]))[0, -1:] for s in pair]  # (1, H) at <|reward|>, alone
    ref = torch.stack([m64.score(x)[0, 0] for x in h])  # (2,)
    bound = torch.stack([logits_bound(model.config, key_len, x, m64.score.weight)[0, 0] for x in h])
    alone = run(pair, "right")
    assert alone[0] != alone[1]
    for name, got in (("alone", alone), ("next to a longer row", run(pair + others, "right")[:2]),
                      ("left-padded", run(others[:1] + pair, "left")[1:3]), ("extra left pads", run(pair, "left", 7)),
                      ("extra right pads", run(pair + others[1:], "right", extra=5)[:2])):
        assert_within(got, ref, bound, name)
    # appending tokens AFTER the reward token (or reading the last token) would change the score; we never do
    with torch.no_grad():
        ids, mask = pad_sequences([pair[0] + enc(" trailing")], pad)
        assert_within(score(model, ids, mask, rid)[:1], ref[:1], bound[:1], "tokens after <|reward|>")


@pytest.mark.numerics
def test_shared_prompt_row_scores_and_gradients_equal_two_padded_sequences(lm_dir):
    """reward.model.shared_prompt_batch: one row per pair (prompt once, then both replies, each seeing the prompt and
    itself) gives each reply the score of prompt + reply scored alone, within the fp32 bound of the float64 one, in
    training and eval mode; in float64 its loss gradient equals the padded 2b-row batch's to float64 rounding. A
    layout that let a reply see the other, or counted its positions on from the other, fails both."""
    from numerics import U32, gamma

    from reward.model import pair_batch, pair_scores, shared_prompt_batch, shares_prompts

    tok = load_tokenizer("small")
    rid, pad = reward_token_id(tok), tok.pad_token_id
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [{"prompt_ids": enc("Repeat: egg fish grape"), "chosen_ids": enc("egg fish grape") + [rid],
              "rejected_ids": enc("dog no") + [rid]},
             {"prompt_ids": enc("Repeat: a much longer request with many words " * 2), "chosen_ids": enc("x") + [rid],
              "rejected_ids": enc("a reply that is longer than the chosen one") + [rid]},
             {"prompt_ids": enc("Hi"), "chosen_ids": enc("hello there") + [rid], "rejected_ids": enc("bye") + [rid]}]
    batch = shared_prompt_batch(pairs, pad, rid)
    P, C = len(pairs[0]["prompt_ids"]), len(pairs[0]["chosen_ids"])
    assert batch["position_ids"][0, P + C].item() == P and batch["branch_ids"][0, P + C].item() == 2
    assert batch["positions"][0].tolist() == [P + C - 1, P + C + len(pairs[0]["rejected_ids"]) - 1]
    model = load_reward_model(str(lm_dir))
    m64 = copy.deepcopy(model).double()
    key_len = batch["input_ids"].shape[1]
    with torch.no_grad():
        ref, bound = [], []
        for e in pairs:
            for reply in (e["chosen_ids"], e["rejected_ids"]):
                h = m64.model(torch.tensor([e["prompt_ids"] + reply]))[0, -1:]  # (1, H) at <|reward|>, alone
                ref.append(m64.score(h)[0, 0])
                bound.append(logits_bound(model.config, key_len, h, m64.score.weight)[0, 0])
    ref, bound = torch.stack(ref).view(-1, 2), torch.stack(bound).view(-1, 2)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        assert shares_prompts(model)
        with torch.no_grad():
            rc, rr, tokens = pair_scores(model, pairs, pad, rid)
        assert_within(torch.stack([rc, rr], 1), ref, bound, f"shared-prompt scores ({mode})")
    assert tokens == int(pair_batch(pairs, pad)[1].sum())  # the tokens of the 2b sequences, as padded rows count

    def grads(layout):
        m64.zero_grad(set_to_none=True)
        if layout == "shared":
            rc, rr, _ = pair_scores(m64, pairs, pad, rid)
        else:
            ids, mask = pair_batch(pairs, pad)
            r = score(m64, ids, mask, rid)
            rc, rr = r[:3], r[3:]
        pairwise_loss(rc, rr)[0].backward()
        return {n: p.grad.clone() for n, p in m64.named_parameters() if p.grad is not None}

    m64.train()
    shared, padded = grads("shared"), grads("padded")
    assert sorted(shared) == sorted(padded)
    for n in padded:  # two float64 evaluations of the same sums in other orders: within float64 rounding
        scale = padded[n].abs().max().double()
        assert_within(shared[n], padded[n], 1e3 * gamma(key_len + 4 * TINY["hidden_size"], U32 * 2.0 ** -29) * scale
                      + 1e-300, n)


def test_shared_prompt_layout_is_refused_where_positions_are_not_enough(lm_dir):
    """A sliding window (or dynamic NTK in effect) depends on a token's index in the row or on the row's length: such
    a model scores padded rows (pair_scores falls back) and refuses branch_ids outright."""
    from reward.model import shares_prompts

    model = load_reward_model(str(lm_dir)).train()
    assert shares_prompts(model)
    model.config.use_sliding_window, model.config.sliding_window, model.config.max_window_layers = True, 4, 0
    assert not shares_prompts(model)
    with pytest.raises(ValueError, match="cannot be used with a KV cache, a sliding window or dynamic NTK"):
        model(torch.tensor([[5, 6, 7]]), branch_ids=torch.tensor([[0, 1, 2]]), position_ids=torch.tensor([[0, 1, 1]]))


def test_sequence_without_reward_token_cannot_be_scored():
    ids = torch.tensor([[5, 6, 999, 996], [5, 6, 7, 996]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    with pytest.raises(ValueError, match="row 1 of the batch has 0 <\\|reward\\|> tokens"):
        reward_positions(ids, mask, 999)
    assert reward_positions(ids[:1], mask[:1], 999).tolist() == [2]


def rm_config(tmp, lm_dir, files, **kw):
    from reward.train import RewardConfig

    values = dict(model_path=str(lm_dir), tokenizer="small", train_files=[str(files[0])],
                  eval_files=[str(files[1])], seq_len=64, micro_batch_size_per_rank=4, grad_accum_steps=2,
                  lr=2e-3, max_steps=6, output_dir=str(tmp))
    values.update(kw)
    return build_config(RewardConfig, values)


def test_reward_training_learns_resumes_exactly_and_saves_stats(lm_dir, tmp_path):
    import reward.train as rt

    files = [_pairs_file(tmp_path / "train.jsonl", 48, 0), _pairs_file(tmp_path / "test.jsonl", 24, 1)]
    full = rt.train(rm_config(tmp_path / "full", lm_dir, files))
    part = rt.train(rm_config(tmp_path / "cut", lm_dir, files, stop_at_step=3))
    part += rt.train(rm_config(tmp_path / "cut", lm_dir, files))
    assert part == full and full[-1] < full[0]
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step-00000006"
    rows = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [6]
    stats = json.loads((tmp_path / "full" / "final" / "reward_stats.json").read_text())
    # the saved stats are the mean/std of the final model's scores on the reference (eval) pairs
    final = load_reward_model(str(tmp_path / "full" / "final")).eval()
    tok = load_tokenizer("small")
    from data.datasets import build_preference_examples, load_records

    ex, _ = build_preference_examples(load_records(files[1])[0], tok, 64, reward_token=True)
    rc, rr = score_pairs(final, ex, tok.pad_token_id, reward_token_id(tok))
    both = torch.cat([rc, rr]).double()
    assert stats["n"] == 48 and stats["mean"] == pytest.approx(both.mean().item(), abs=1e-5)
    assert stats["std"] == pytest.approx(both.std(unbiased=False).item(), abs=1e-5)
    assert (tmp_path / "full" / "curves.png").is_file()
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full" / "final")
    assert hf.config.num_labels == 1


def test_reward_config_errors(lm_dir, tmp_path):
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    with pytest.raises(ConfigError, match="missing required field: --model_path"):
        rm_config(tmp_path, "", files)
    with pytest.raises(ConfigError, match="set norm_files"):
        rm_config(tmp_path, lm_dir, files, eval_files=[])
    from reward.train import RewardConfig

    c = RewardConfig()  # recipe defaults, sec. 3.2.1
    assert (c.lr, c.num_epochs, c.micro_batch_size_per_rank * c.grad_accum_steps, c.seq_len, c.warmup_steps) == \
        (3e-6, 1, 64, 2048, 0)


def test_pair_metrics_by_hand():
    """scores c=[3, 1, 2, 0], r=[1, 2, 2, 5] -> chosen wins pairs 0 only (the tie 2 vs 2 is not a win): 25%.
    lengths c=[5, 3, 4, 4], r=[2, 6, 4, 1]: pairs 0, 1, 3 differ; the longer reply is c, r, c; the model picked
    c, r, r -> longer wins in pairs 0 and 1: 2/3 = 66.7%. mean margin (2 - 1 + 0 - 5) / 4 = -1."""
    from reward.bench import pair_metrics

    m = pair_metrics(torch.tensor([3.0, 1, 2, 0]), torch.tensor([1.0, 2, 2, 5]), torch.tensor([5, 3, 4, 4]),
                     torch.tensor([2, 6, 4, 1]))
    assert m["accuracy"] == 25.0 and m["prefers_longer"] == pytest.approx(200 / 3) and m["mean_margin"] == -1.0


def test_bench_reads_trl_and_hh_formats_and_writes_table(lm_dir, tmp_path, capsys):
    """A model with a fresh head on two datasets: accuracies equal those from score_pairs directly."""
    from reward.bench import main

    trl = _pairs_file(tmp_path / "trl.jsonl", 10, 2)
    hh = tmp_path / "hh.jsonl"
    with open(hh, "w") as f:
        for i in range(6):
            p = f"\n\nHuman: name a fruit {i}\n\nAssistant:"
            f.write(json.dumps({"chosen": p + " apple", "rejected": p + " dog dog dog"}) + "\n")
    res = main(["--model", f"LM={lm_dir}", "--tokenizer", "small", "--data", f"trl={trl}", "--data", f"hh={hh}",
                "--max_len", "64", "--out_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "| Model | trl | hh | Avg |" in out and "| LM |" in out
    assert res["datasets"]["hh"]["pairs"] == 6 and res["datasets"]["hh"]["chosen_longer"] == 0.0
    tok = load_tokenizer("small")
    from data.datasets import build_preference_examples, load_records

    ex, _ = build_preference_examples(load_records(trl)[0], tok, 64, reward_token=True)
    rc, rr = score_pairs(load_reward_model(str(lm_dir)).eval(), ex, tok.pad_token_id, reward_token_id(tok))
    assert res["models"]["LM"]["scores"]["trl"]["accuracy"] == pytest.approx(100 * (rc > rr).float().mean().item())
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["models"]["LM"]["mean_accuracy"] == pytest.approx(res["models"]["LM"]["mean_accuracy"])
    assert (tmp_path / "out" / "bench.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_reward_two_ranks_equal_one_process(lm_dir, tmp_path):
    """Same mini batch of 8 pairs: 1 process x micro 4 x accum 2 vs 2 gloo ranks x micro 2 x accum 2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    files = [_pairs_file(tmp_path / "train.jsonl", 48, 0), _pairs_file(tmp_path / "test.jsonl", 24, 1)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [str(repo / "reward" / "train.py"), "--model_path", str(lm_dir), "--tokenizer", "small", "--train_files",
            str(files[0]), "--eval_files", str(files[1]), "--seq_len", "64", "--grad_accum_steps", "2",
            "--lr", "2e-3", "--max_steps", "3"]
    subprocess.run([sys.executable, *args, "--micro_batch_size_per_rank", "4", "--output_dir", str(tmp_path / "one")],
                   check=True, env=env, cwd=repo)
    subprocess.run([*accelerate_launch("multi_cpu", tmp_path), *args, "--micro_batch_size_per_rank", "2",
                    "--output_dir", str(tmp_path / "two")], check=True, env=env, cwd=repo)
    one = [r["loss"] for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    two = [r["loss"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl") if "loss" in r]
    assert len(one) == 3 and two == pytest.approx(one, rel=1e-5)


def test_bench_load_pairs_runs_the_trainers_validation(tmp_path):
    """reward.bench reads a pair as the trainers do (data.datasets.prepare_record): special-token text escaped, a
    pair with identical replies dropped, a record with an unknown role counted as malformed."""
    from data.validate import escape_special_text
    from reward.bench import load_pairs

    user = [{"role": "user", "content": "hi"}]
    rows = [{"prompt": user, "chosen": "good <|im_end|> reply", "rejected": "bad"},
            {"prompt": user, "chosen": "same", "rejected": "same"},
            {"prompt": [{"role": "wizard", "content": "hi"}], "chosen": "a", "rejected": "b"},
            {"prompt": user, "chosen": "fine", "rejected": "worse"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, counts = load_pairs(str(path))
    assert [p["rejected"][-1]["content"] for p in pairs] == ["bad", "worse"]
    assert pairs[0]["chosen"][-1]["content"] == escape_special_text("good <|im_end|> reply") != "good <|im_end|> reply"
    assert counts == {"malformed": 1, "dropped": 1}
