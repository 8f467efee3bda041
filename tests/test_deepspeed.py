"""DeepSpeed ZeRO-2 and ZeRO-3 through the shipped accelerate configs, on 2 CPU ranks (gloo): the losses, the saved
Hugging Face weights and an interrupted-then-resumed run all equal one plain process on the same global batch.

The test model has a 1000 x 128 embedding (128,000 elements), above ZeRO-3's default persistence threshold
(100,000), so under ZeRO-3 the embedding and the untied output layer really are split between the ranks: saving
must gather them, and resuming must load each rank's shard.
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

from common.metrics import read_jsonl

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MODEL = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
         "tie_word_embeddings": False, "eos_token_id": 998, "pad_token_id": 996}
WORDS = "apple banana cherry dog egg fish grape house ice jam kite lemon".split()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(args: list[str], zero: int | None, tmp: Path, check: bool = True) -> subprocess.CompletedProcess:
    """One plain process (zero None) or `accelerate launch` with configs/accelerate/zero{2,3}.yaml on 2 ranks."""
    cmd = [sys.executable, *args]
    if zero is not None:  # bf16 in the config: the run config's precision auto wins (fp32 on CPU)
        cmd = [*accelerate_launch(f"zero{zero}", tmp), *args]
    out = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd |= load_file(f)
    return sd


def assert_same_weights(a: Path, b: Path, atol: float = 2e-5):
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert wa[k].shape == wb[k].shape, k  # a ZeRO-3 shard saved as is would have shape (0,)
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """one_process(args) -> the output folder of one plain process run with `args` (+ --output_dir), run once per
    module: the ZeRO-2 and ZeRO-3 cases of a test compare against the same reference run (`make test-slow`'s
    --dist loadfile keeps a file's tests on one worker)."""
    done: dict[tuple[str, ...], Path] = {}

    def reference(args: list[str]) -> Path:
        if tuple(args) not in done:
            out = tmp_path_factory.mktemp("one") / "run"
            run([*args, "--output_dir", str(out)], None, out.parent)
            done[tuple(args)] = out
        return done[tuple(args)]

    return reference


def one_then_resumed(args: list[str], zero: int, tmp: Path, one_process, between=None):
    """The same 4 steps with a global mini batch of 8: one process x micro 2 x accum 4 (the `one_process` fixture's
    shared run), and 2 DeepSpeed ranks x micro 2 x accum 2 into tmp/ds, stopped after step 2 and resumed by a second
    launch (`between(ds_args)` runs before it). `args` must hold --micro_batch_size_per_rank 2 --max_steps 4
    --save_every 2. Returns (the one-process output folder, the two DeepSpeed launches)."""
    one = one_process([*args, "--grad_accum_steps", "4"])
    ds = [*args, "--grad_accum_steps", "2", "--output_dir", str(tmp / "ds")]
    launches = [run([*ds, "--stop_at_step", "2"], zero, tmp)]
    if between is not None:
        between(ds)
    launches.append(run(ds, zero, tmp))
    assert len(losses(one)) == 4 and "resume from" in launches[1].stdout
    return one, launches


class Payload:
    """Unpickling this writes a marker file: stands for any code a planted file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def losses(out: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_jsonl(out / "metrics.jsonl") if key in r]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    (d / "model.json").write_text(json.dumps(MODEL))
    r = random.Random(0)
    with open(d / "sft.jsonl", "w") as f, open(d / "pairs.jsonl", "w") as g:
        for _ in range(32):
            q = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 6)))
            bad = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 5))) + " no"
            user = {"role": "user", "content": "Repeat: " + q}
            f.write(json.dumps({"messages": [user, {"role": "assistant", "content": q}]}) + "\n")
            g.write(json.dumps({"prompt": [user], "chosen": [{"role": "assistant", "content": q}],
                                "rejected": [{"role": "assistant", "content": bad}]}) + "\n")
    return d


@pytest.mark.parametrize("zero,lora_r", [(2, 0), (3, 0), (3, 4)])
def test_sft_under_zero_equals_one_process_and_resumes_exactly(files, tmp_path, one_process, zero, lora_r):
    """Global mini batch 8: one process x micro 2 x accum 4 vs 2 ranks x micro 2 x accum 2. The DeepSpeed run stops
    after step 2 (checkpoint with each rank's shard; LoRA: the adapter) and a second launch resumes it to step 4
    (LoRA: the final folder is the merged model)."""
    args = [str(REPO / "align" / "sft.py"), "--init_config", str(files / "model.json"), "--tokenizer", "small",
            "--train_files", str(files / "sft.jsonl"), "--seq_len", "128", "--micro_batch_size_per_rank", "2",
            "--max_steps", "4", "--warmup_steps", "1", "--lr", "1e-3", "--log_every", "1", "--save_every", "2",
            "--keep_last", "2", "--lora_r", str(lora_r)]

    def refusals(ds):
        if lora_r:
            return
        # a DeepSpeed checkpoint holds no optimizer state in its state file: resuming it without DeepSpeed is refused
        plain = run(ds, None, tmp_path, check=False)
        assert plain.returncode == 2 and "written under DeepSpeed ZeRO" in plain.stderr, plain.stderr[-3000:]
        if zero == 3:  # and its shards only fit the stage they were written with
            other = run(ds, 2, tmp_path, check=False)
            assert other.returncode != 0 and "written under ZeRO-3, resuming under ZeRO-2" in other.stderr
        if zero == 2:  # DeepSpeed unpickles its shards itself: ours are read with weights_only and an allow-list
            import shutil

            shutil.copytree(tmp_path / "ds", tmp_path / "evil")
            shard = tmp_path / "evil" / "checkpoints" / "step-00000002" / "deepspeed" / "zero" / \
                "zero_pp_rank_0_mp_rank_00_optim_states.pt"
            torch.save({"optimizer_state_dict": Payload(tmp_path / "pwned")}, shard)
            evil = run([*ds, "--output_dir", str(tmp_path / "evil")], zero, tmp_path, check=False)
            assert evil.returncode != 0 and "refused to load" in evil.stderr, evil.stderr[-3000:]
            assert not (tmp_path / "pwned").exists()

    one, (first, second) = one_then_resumed(args, zero, tmp_path, one_process, between=refusals)
    assert "ranks 2" in first.stdout and "DEEPSPEED" in first.stdout
    ckpt = tmp_path / "ds" / "checkpoints" / "step-00000002"
    assert json.loads((ckpt / "deepspeed" / "zero.json").read_text()) == {"zero_stage": zero, "ranks": 2}
    assert_same_weights(one / "checkpoints" / "step-00000002" / "model", ckpt / "model")
    assert "step-00000002" in second.stdout
    assert losses(tmp_path / "ds") == pytest.approx(losses(one), rel=1e-5)
    assert_same_weights(one / "final", tmp_path / "ds" / "final")
    assert (tmp_path / "ds" / "checkpoints" / "step-00000004" / "deepspeed").is_dir()


def test_reward_model_under_zero3_equals_one_process(files, tmp_path, one_process):
    """PMP-style stage on 2 ZeRO-3 ranks, interrupted after step 2 and resumed: losses, eval accuracy, the saved
    scalar-head model and its normalisation statistics equal one process."""
    from model.checkpoint import config_from_hf, save_causal_lm
    from model.qwen import QwenForCausalLM

    save_causal_lm(QwenForCausalLM(config_from_hf(MODEL)).init_weights(seed=0), tmp_path / "lm")
    args = [str(REPO / "reward" / "train.py"), "--model_path", str(tmp_path / "lm"), "--tokenizer", "small",
            "--train_files", str(files / "pairs.jsonl"), "--eval_files", str(files / "pairs.jsonl"), "--seq_len",
            "64", "--lr", "2e-3", "--max_steps", "4", "--save_every", "2", "--micro_batch_size_per_rank", "2"]
    one, _ = one_then_resumed(args, 3, tmp_path, one_process)
    assert losses(tmp_path / "ds") == pytest.approx(losses(one), rel=1e-5, abs=1e-5)  # fp32 sums
    assert losses(tmp_path / "ds", "eval_accuracy") == losses(one, "eval_accuracy")
    # The losses agree to ~2e-6 but Adam turns fp32 summation-order noise in near-zero gradient entries into
    # lr-sized (2e-3) steps (measured: up to 2.2e-4 after 4 steps); a shard gathered wrongly is off by ~0.02 (init)
    assert_same_weights(one / "final", tmp_path / "ds" / "final", atol=1e-3)
    stats = [json.loads((d / "final" / "reward_stats.json").read_text()) for d in (one, tmp_path / "ds")]
    # the statistics are scores of those weights, so they inherit that noise: measured 1.1e-4 absolute on a mean of
    # 7.22 (1.5e-5 relative) on an AVX2 machine; a wrong gather moves them by far more than 1e-4 relative
    assert stats[1]["mean"] == pytest.approx(stats[0]["mean"], rel=1e-4)
    assert stats[1]["std"] == pytest.approx(stats[0]["std"], rel=1e-4)


@pytest.mark.parametrize("zero", [2, 3])
def test_dpo_under_zero_resumes_exactly(files, tmp_path, one_process, zero):
    """DPO (cached reference, + NLL term) on 2 ZeRO ranks, interrupted after step 2 and resumed, equals one process.
    31 pairs scored in batches of 5: rank 0 has 16 (4 forwards), rank 1 has 15 (3), so rank 1 runs one forward
    more and drops it; without that, ZeRO-3 (a weight gather in every forward) would hang."""
    lines = (files / "pairs.jsonl").read_text().splitlines()[:31]
    (files / "pairs31.jsonl").write_text("\n".join(lines) + "\n")  # beside the others: the same args, one reference
    args = [str(REPO / "align" / "dpo.py"), "--init_config", str(files / "model.json"), "--tokenizer", "small",
            "--train_files", str(files / "pairs31.jsonl"), "--seq_len", "128", "--max_steps", "4", "--warmup_steps",
            "1", "--lr", "1e-3", "--sft_coef", "0.5", "--save_every", "2", "--micro_batch_size_per_rank", "2",
            "--ref_batch_size", "5"]
    one, _ = one_then_resumed(args, zero, tmp_path, one_process)
    assert losses(tmp_path / "ds") == pytest.approx(losses(one), rel=1e-5, abs=1e-5)
    assert_same_weights(one / "final", tmp_path / "ds" / "final", atol=1e-4)
