"""PPO (align/ppo.py) under DeepSpeed through the shipped configs/accelerate/zero2.yaml and zero3.yaml on 2 CPU ranks
(gloo): policy and value each a DeepSpeed engine, under ZeRO-3 the reference and reward models sharded inference
engines, and the rollout engine (built-in, or vLLM in-process on every rank) synced from the shards bucket by bucket.
Every logged metric and the final weights equal one plain process with the same engine; a resumed ZeRO-3 run equals
an uninterrupted one; LoRA under ZeRO-3.

The test model has a tied 1000 x 128 embedding (128,000 elements), above ZeRO-3's default persistence threshold
(100,000), so under ZeRO-3 the embedding/output layer really is split between the ranks: the fused log-prob kernel,
the weight sync (tied lm_head) and the saves must all gather it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launcher import accelerate_launch

from common.loop import CPU_ZERO_LIMITS
from common.metrics import read_jsonl

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MODEL = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
         "tie_word_embeddings": True, "eos_token_id": 998, "pad_token_id": 996}
WORDS = "apple banana cherry dog egg fish grape house ice jam kite lemon".split()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SKIP = ("time_", "sync_share", "episodes_per_s")


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_tok):
    """policy/ (causal LM), reward/ (scalar head on the same backbone, seeded head), prompts and text files."""
    from model.checkpoint import config_from_hf, save_causal_lm
    from model.heads import ScalarHeadModel
    from model.qwen import QwenForCausalLM

    d = tmp_path_factory.mktemp("ppo_ds")
    save_causal_lm(QwenForCausalLM(config_from_hf(MODEL)).init_weights(seed=0), d / "policy", small_tok)
    ScalarHeadModel.from_pretrained(d / "policy", head_seed=1).save_pretrained(d / "reward", tokenizer=small_tok)
    r = random.Random(0)
    with open(d / "prompts.jsonl", "w") as f:
        for _ in range(12):
            q = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 5)))
            f.write(json.dumps({"prompt": [{"role": "user", "content": "Tell me about " + q}]}) + "\n")
    for name, n in (("pretrain.jsonl", 40), ("heldout.jsonl", 8)):
        with open(d / name, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(r.choice(WORDS) for _ in range(20))}) + "\n")
    return d


def args(world, out: Path, *extra: str) -> list[str]:
    """A warmup step and two policy steps with PPO-ptx, adaptive KL, 2 mini batches, the alignment tax each step
    and a greedy sync check after every sync."""
    return [str(REPO / "align" / "ppo.py"), "--policy_path", str(world / "policy"), "--reward_path",
            str(world / "reward"), "--prompt_files", str(world / "prompts.jsonl"), "--pretrain_files",
            str(world / "pretrain.jsonl"), "--heldout_files", str(world / "heldout.jsonl"), "--ptx_seq_len", "32",
            "--heldout_rows", "4", "--rollout_batch_prompts", "4", "--max_new_tokens", "6", "--micro_batch_size", "2",
            "--num_mini_batches", "2", "--value_warmup_steps", "1", "--max_steps", "3", "--policy_lr", "1e-4",
            "--value_lr", "1e-4", "--ptx_coef", "0.5", "--ptx_rows", "2", "--kl_adaptive", "true", "--tax_every",
            "1", "--true_reward", "false", "--verify_sync_every", "1", "--output_dir", str(out), *extra]


def launch(argv: list[str], zero: int | None, tmp: Path, check: bool = True, ranks: int = 2
           ) -> subprocess.CompletedProcess:
    """One plain process (zero None) or `accelerate launch` with configs/accelerate/zero{2,3}.yaml on `ranks`."""
    cmd = [sys.executable, *argv]
    if zero is not None:  # bf16 in the config: the run config's precision auto wins (fp32 on CPU)
        cmd = [*accelerate_launch(f"zero{zero}", tmp, ranks), *argv]
    out = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-6000:]}")
    return out


@pytest.fixture(scope="module")
def one_process_runs(world, tmp_path_factory):
    """The plain one-process run of args(world, ..., --engine E), run once per module and engine: the ZeRO-2, ZeRO-3
    and ZeRO-3 resume tests all compare against it (`make test-slow`'s --dist loadfile keeps a file's tests on one
    worker). engine -> its output folder."""
    runs = {}

    def run(engine: str) -> Path:
        if engine not in runs:
            out = tmp_path_factory.mktemp(f"ppo_one_{engine}") / "one"
            launch(args(world, out, "--engine", engine), None, out.parent)
            runs[engine] = out
        return runs[engine]
    return run


@pytest.fixture(scope="module")
def one_process(one_process_runs):
    """The built-in engine's one-process run."""
    return one_process_runs("builtin")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd |= load_file(f)
    return sd


def assert_same_metrics(a_dir: Path, b_dir: Path, steps: list[int]):
    one, two = read_jsonl(a_dir / "metrics.jsonl"), read_jsonl(b_dir / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two] == steps
    for a, b in zip(one, two):
        keys = [k for k in a if not k.startswith(SKIP)]
        assert keys == [k for k in b if not k.startswith(SKIP)]
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    return one


def assert_same_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert wa[k].shape == wb[k].shape, k  # a ZeRO-3 shard saved as is would have shape (0,)
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("zero,engine", [(2, "builtin"), (3, "builtin"), (2, "vllm"), (3, "vllm")])
def test_ppo_under_zero_equals_one_process(world, tmp_path, one_process_runs, zero, engine):
    """2 ranks under zero{2,3}.yaml vs one plain process, same config and engine: every logged metric (scores, KL,
    value and policy losses, gradient norms, ptx loss, alignment tax) of a warmup step and two policy steps, the final
    policy and the value model agree; the engine (vLLM: one per rank, in-process) got its weights every sync
    (ZeRO-3: streamed from the shards one bucket at a time) and passed the greedy check after every sync."""
    one_process = one_process_runs(engine)
    ds = launch(args(world, tmp_path / "ds", "--engine", engine), zero, tmp_path)
    assert f"(DeepSpeed ZeRO-{zero})" in ds.stdout and f"engine {engine}" in ds.stdout
    one = assert_same_metrics(one_process, tmp_path / "ds", [0, 1, 2, 3])
    assert {"policy_loss", "ptx_loss", "policy_grad_norm", "value_grad_norm", "alignment_tax"} <= set(one[-1])
    assert one[-1]["kl_coef"] != one[1]["kl_coef"]  # adaptive KL moved
    assert_same_weights(one_process / "final", tmp_path / "ds" / "final")
    assert_same_weights(one_process / "checkpoints" / "step-00000003" / "value",
                        tmp_path / "ds" / "checkpoints" / "step-00000003" / "value")
    ckpt = tmp_path / "ds" / "checkpoints" / "step-00000003" / "deepspeed"
    assert json.loads((ckpt / "zero.json").read_text()) == {"zero_stage": zero, "ranks": 2,
                                                           "engines": ["policy", "value"]}


@pytest.mark.parametrize("engine,lora_r", [("builtin", 0), ("builtin", 4), ("vllm", 4)])
def test_sync_from_zero3_shards_gathers_one_bucket_at_a_time(world, tmp_path, engine, lora_r):
    """rollout.sync.load_buckets from a ZeRO-3 policy on 2 ranks into the built-in engine's plain copy with a 64 KiB
    bucket: the peak of gathered bytes, measured inside every gather over the whole model, stays below the bucket
    plus the largest layer (and far below the whole model); the copy equals the gathered weights (LoRA: merged per
    layer, compared with W + B A alpha / r on the full weights). vllm: a vLLM engine started from another seed's
    weights is streamed the same buckets (the peak measured in its own sync) and then passes the greedy check.
    The final export the trainers write under ZeRO-3 (common.loop.full_weights with a staging folder) gathers the
    same way, and its saved weights equal the consolidated ones."""
    report, bucket = tmp_path / "report.json", 64 * 1024
    subprocess.run([*accelerate_launch("zero3", tmp_path), str(REPO / "tests" / "zero3_sync_worker.py"),
                    str(world / "policy"), str(report), str(lora_r), str(bucket), engine],
                   env={**ENV, "PYTHONPATH": str(REPO)}, cwd=REPO, check=True, capture_output=True)
    r = json.loads(report.read_text())
    print(r)
    assert r["zero_limits"] == CPU_ZERO_LIMITS  # DeepSpeed's engine runs with them (its defaults: 5e8, 1e9, 1e9, 5e7)
    assert r["sharded_tensors"] > 0  # the embedding (128,000 elements) at least is split between the ranks
    assert r["buckets"] > 3
    assert 0 < r["peak_gathered_bytes"] < bucket + r["largest_unit_bytes"]
    assert r["peak_gathered_bytes"] < r["whole_model_bytes"] / 2
    assert r["max_abs_diff"] == 0.0 if not lora_r else r["max_abs_diff"] < 1e-6  # a copy; LoRA: fp32 matmul order
    assert r["compared"] == r["copy_tensors"]  # every weight of the copy compared
    saved = r["saved"]  # the trainers' final export under ZeRO-3: streamed, one bucket gathered at a time
    assert saved["keys_equal"]  # every weight, lm_head left out when tied (as transformers saves)
    assert saved["max_abs_diff"] == 0.0 if not lora_r else saved["max_abs_diff"] < 1e-6
    assert saved["buckets"] > 3 and 0 < saved["peak_gathered_bytes"] < bucket + r["largest_unit_bytes"]
    assert "model.safetensors" in saved["files"] and "config.json" in saved["files"] and not saved["staging_left"]
    if engine == "vllm":  # 3 prompts x 6 greedy tokens, each the policy's argmax with its log-prob within 1e-3
        assert r["greedy"]["tokens_compared"] + r["greedy"]["ties"] >= 3, r["greedy"]  # every row checked
        assert r["greedy"]["max_abs_logprob_diff"] < 1e-3


def test_ppo_zero3_resumes_exactly_and_refuses_other_launches(world, tmp_path, one_process):
    """A ZeRO-3 run stopped after step 2 (checkpoint: both engines' shards, KL controller, reward statistics, RNG)
    and resumed by a second launch logs the same step 3 and ends with the same weights as an uninterrupted run
    (one plain process, which test_ppo_under_zero_equals_one_process shows equals uninterrupted ZeRO-3). Resuming
    it under ZeRO-2, on one DeepSpeed rank or without DeepSpeed is refused with a message."""
    ds = args(world, tmp_path / "ds", "--save_every", "1")
    launch([*ds, "--stop_at_step", "2"], 3, tmp_path)
    ckpt = tmp_path / "ds" / "checkpoints" / "step-00000002" / "deepspeed"
    assert {"policy", "value", "zero.json"} <= {p.name for p in ckpt.iterdir()}
    other = launch(ds, 2, tmp_path, check=False)
    assert other.returncode != 0 and "written under ZeRO-3, resuming under ZeRO-2" in other.stderr
    plain = launch(ds, None, tmp_path, check=False)
    assert plain.returncode == 2 and "written under DeepSpeed ZeRO" in plain.stderr, plain.stderr[-3000:]
    one_rank = launch(ds, 3, tmp_path, check=False, ranks=1)
    assert one_rank.returncode != 0 and "saved by 2 ranks, resuming with 1" in one_rank.stderr
    second = launch(ds, 3, tmp_path)
    assert "resume from" in second.stdout and "step-00000002" in second.stdout
    assert_same_metrics(one_process, tmp_path / "ds", [0, 1, 2, 3])
    assert_same_weights(one_process / "final", tmp_path / "ds" / "final")


def test_lora_ppo_under_zero3_equals_one_process(world, tmp_path):
    """LoRA policy (the reference = the adapter disabled, through the policy's engine) under ZeRO-3 on 2 ranks vs one
    process: every metric, and the final merged policy, agree; the sampler's copy got the adapter merged per layer
    (greedy check after every sync)."""
    launch(args(world, tmp_path / "one", "--lora_r", "4"), None, tmp_path)
    launch(args(world, tmp_path / "ds", "--lora_r", "4"), 3, tmp_path)
    one = assert_same_metrics(tmp_path / "one", tmp_path / "ds", [0, 1, 2, 3])
    assert one[-1]["kl_k3"] > 0  # the adapter moved the policy away from its reference
    assert_same_weights(tmp_path / "one" / "final", tmp_path / "ds" / "final")
