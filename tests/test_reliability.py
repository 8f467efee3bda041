"""Run folders that never lose, mix or execute anything (README "Runs and checkpoints").

Fast tests (in-process or one small subprocess): pickle-free state round trip, planted pickle payloads never run,
`--resume false` into a used folder, a changed config is refused and a finished run says so, a torn metrics line,
the reward model's final eval row logged once, the NaN guard on weights, model-kind checks for PPO, the folder
lock, exit with the launcher, umask, an output_dir that is a file, a full disk / file-size limit during a save.
Slow tests (several trainer processes): kill -9 inside the save, prune and final-write windows and at random
moments for every trainer, then resume equals an uninterrupted run bit for bit; two runs into one folder; a killed
`accelerate launch`.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from launcher import accelerate_launch

import align.sft as sft
from align.sft import SFTConfig
from common.checkpoint import latest_checkpoint, list_checkpoints, read_meta
from common.config import build_config
from common.metrics import read_jsonl
from common.run import RunFinished, RunRefused
from common.safestate import UnsafeStateError, load_state, safe_torch_load, save_state

REPO = Path(__file__).resolve().parents[1]
TINY = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "eos_token_id": 998, "pad_token_id": 996}
WORDS = "apple banana cherry dog egg fish grape house ice jam kite lemon".split()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TIMING = ("time_", "tokens_per_s", "step_s", "pairs_per_s", "rows_per_s", "sync_share", "episodes_per_s")


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_tok):
    """tiny.json, sft.jsonl (24 conversations), pairs.jsonl / eval.jsonl (comparisons), prompts, pretraining text,
    policy/ (causal LM) and reward/ (scalar head on it) for PPO."""
    from model.checkpoint import config_from_hf, save_causal_lm
    from model.heads import ScalarHeadModel
    from model.qwen import QwenForCausalLM

    d = tmp_path_factory.mktemp("reliability")
    (d / "tiny.json").write_text(json.dumps(TINY))
    r = random.Random(0)
    with open(d / "sft.jsonl", "w") as f:
        for _ in range(24):
            q = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 6)))
            msgs = [{"role": "user", "content": "Repeat: " + q}, {"role": "assistant", "content": q}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    for name, n in (("pairs.jsonl", 24), ("eval.jsonl", 8)):
        with open(d / name, "w") as f:
            for _ in range(n):
                q = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 5)))
                bad = " ".join(r.choice(WORDS) for _ in range(r.randint(1, 5))) + " no"
                f.write(json.dumps({"prompt": [{"role": "user", "content": "Repeat: " + q}],
                                    "chosen": [{"role": "assistant", "content": q}],
                                    "rejected": [{"role": "assistant", "content": bad}]}) + "\n")
    with open(d / "prompts.jsonl", "w") as f:
        for _ in range(12):
            q = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 5)))
            f.write(json.dumps({"prompt": [{"role": "user", "content": "Tell me about " + q}]}) + "\n")
    for name, n in (("pretrain.jsonl", 40), ("heldout.jsonl", 8)):
        with open(d / name, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(r.choice(WORDS) for _ in range(20))}) + "\n")
    save_causal_lm(QwenForCausalLM(config_from_hf(TINY)).init_weights(seed=0), d / "policy", small_tok)
    ScalarHeadModel.from_pretrained(d / "policy", head_seed=1).save_pretrained(d / "reward", tokenizer=small_tok)
    return d


def sft_values(world, out, **kw) -> dict:
    values = dict(init_config=str(world / "tiny.json"), tokenizer="small", train_files=[str(world / "sft.jsonl")],
                  seq_len=128, micro_batch_size_per_rank=2, grad_accum_steps=2, max_steps=6, warmup_steps=1,
                  lr=1e-3, save_every=2, output_dir=str(out))
    return values | kw


def sft_config(world, out, **kw) -> SFTConfig:
    return build_config(SFTConfig, sft_values(world, out, **kw))


def cli(values: dict) -> list[str]:
    args = []
    for k, v in values.items():
        args += [f"--{k}", ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
    return args


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        sd |= load_file(f)
    return sd


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def metric_rows(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_jsonl(out / "metrics.jsonl")]


def stale(out: Path) -> list[str]:
    """Temporary / half-deleted entries left in a run folder (what the start-up sweep removes)."""
    found = []
    for d in (out, out / "checkpoints"):
        if d.is_dir():
            found += [p.name for p in d.iterdir() if p.name.startswith(".") and p.name.endswith(
                (".tmp", ".deleting", ".old"))]
    return found


class Payload:
    """Unpickling this writes a marker file: stands for any code an attacker would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


# ---------------------------------------------------------------------------------------------------- fast tests
def test_state_round_trip_is_exact_and_pickle_free(tmp_path):
    """Optimizer state (int keys, tuples, 0-d and bf16 tensors), RNG states (NumPy array, Python tuple), NaN/inf
    floats and a 2-shard split come back equal and of the same types; the files are JSON and safetensors."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.95))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    np.random.rand(3), random.random()
    obj = {"optimizer": opt.state_dict(), "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                                  "torch": torch.get_rng_state()},
           "x": [float("nan"), float("-inf"), 1e-310, None, True, "s"], "bf16": torch.randn(5).bfloat16(),
           "__weird": {(1, 2): "tuple key"}}
    save_state(tmp_path, obj, max_shard_bytes=64)
    back = load_state(tmp_path)
    assert len(list(tmp_path.glob("state-*-of-*.safetensors"))) > 1
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    for k, st in opt.state_dict()["state"].items():
        assert all(torch.equal(st[n], back["optimizer"]["state"][k][n]) for n in st)
    assert back["rng"]["python"] == obj["rng"]["python"]
    np.testing.assert_array_equal(back["rng"]["numpy"][1], obj["rng"]["numpy"][1])
    assert back["rng"]["numpy"][1].dtype == np.uint32 and back["rng"]["numpy"][2:] == obj["rng"]["numpy"][2:]
    assert torch.equal(back["rng"]["torch"], obj["rng"]["torch"]) and back["bf16"].dtype == torch.bfloat16
    assert str(back["x"]) == str(obj["x"]) and back["__weird"] == {(1, 2): "tuple key"}
    np.random.set_state(back["rng"]["numpy"])  # usable as is
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".safetensors"}


def test_state_with_views_and_shared_storage_round_trips(tmp_path):
    """save_state writes CPU tensors in place and copies only what safetensors cannot take as is: a view sharing
    storage with a tensor already in the shard, a non-contiguous view, the same tensor twice."""
    base = torch.arange(12, dtype=torch.float32)
    obj = {"a": base, "b": base[2:6], "c": base.view(3, 4).t(), "d": base, "e": torch.zeros(0)}
    save_state(tmp_path, obj)
    back = load_state(tmp_path)
    assert all(torch.equal(back[k], obj[k]) for k in obj) and back["c"].shape == (4, 3)
    assert torch.equal(base, torch.arange(12, dtype=torch.float32))


def test_planted_pickle_payloads_never_run(world, tmp_path, capsys):
    """A checkpoint with a pickle payload as its state (legacy state.pt), in place of the safetensors state, or as
    model/pytorch_model.bin, and a payload in DeepSpeed's shard format: each is refused with a message naming the
    file, and the payload's code never runs."""
    marker = tmp_path / "pwned"
    sft.train(sft_config(world, tmp_path / "run", stop_at_step=2))
    ck = tmp_path / "run" / "checkpoints" / "step-00000002"
    good = {p.name: p.read_bytes() for p in ck.iterdir() if p.is_file()}

    def plant(name, keep=()):
        for f in ck.iterdir():
            if f.is_file():
                f.unlink()
        for n in keep:
            (ck / n).write_bytes(good[n])
        (ck / name).write_bytes(pickle.dumps({"x": Payload(marker)}))

    plant("state.pt", keep=["meta.json"])
    with pytest.raises(UnsafeStateError, match="state.pt .*never loaded"):
        sft.train(sft_config(world, tmp_path / "run"))
    plant("state.safetensors", keep=["meta.json", "state.json"])
    with pytest.raises(UnsafeStateError, match="not a readable safetensors file"):
        sft.train(sft_config(world, tmp_path / "run"))
    plant("state.json", keep=["meta.json", "state.safetensors"])
    with pytest.raises(UnsafeStateError, match="not a JSON state file"):
        sft.train(sft_config(world, tmp_path / "run"))
    for n, data in good.items():
        (ck / n).write_bytes(data)
    (ck / "model" / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeStateError, match="pytorch_model.bin: a pickle file inside a checkpoint"):
        sft.train(sft_config(world, tmp_path / "run"))
    torch.save({"optimizer_state_dict": Payload(marker)}, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UnsafeStateError, match="refused to load"):
        safe_torch_load(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert not marker.exists()
    # from the command line: one line, exit 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sft.main(cli(sft_values(world, tmp_path / "run")))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("run error: ") and err.count("\n") == 1 and "pickle" in err
    assert not marker.exists()
    (ck / "model" / "pytorch_model.bin").unlink()  # the real checkpoint resumes
    sft.train(sft_config(world, tmp_path / "run"))
    assert not marker.exists()


def test_resume_false_into_a_used_folder(world, tmp_path):
    """The run in a folder is never mixed with a new one: `--resume false` is refused; with overwrite_output_dir the
    old run (here 12 steps, keep_last 1) is deleted first, so the new run's checkpoints are not pruned as "older"
    than the old step 12, `latest` names the new run's, and a plain resume continues the new run, not the old."""
    out = tmp_path / "run"
    sft.train(sft_config(world, out, max_steps=12))
    assert [d.name for d in list_checkpoints(out / "checkpoints")] == ["step-00000012"]
    with pytest.raises(RunRefused, match=r"holds sft run .* \(finished\); --resume false would start a new run"):
        sft.train(sft_config(world, out, resume=False, stop_at_step=4))
    old_id = json.loads((out / "run.json").read_text())["run_id"]
    first = sft.train(sft_config(world, out, resume=False, overwrite_output_dir=True, stop_at_step=4))
    info = json.loads((out / "run.json").read_text())
    assert info["run_id"] != old_id and info["status"] == "running"
    assert [d.name for d in list_checkpoints(out / "checkpoints")] == ["step-00000004"]
    assert latest_checkpoint(out / "checkpoints", info["run_id"]).name == "step-00000004"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert not (out / "final").exists() and stale(out) == []
    rest = sft.train(sft_config(world, out))
    full = sft.train(sft_config(world, tmp_path / "full"))
    assert first + rest == full and [r["loss"] for r in read_jsonl(out / "metrics.jsonl")] == full
    assert same_weights(out / "final", tmp_path / "full" / "final")


def test_resume_checks_the_config_and_a_finished_run_says_so(world, tmp_path, capsys):
    """Re-running into a folder with a changed lr (or data) is refused with the list of differences and rewrites
    nothing; fields that only decide when to save, log or stop may change; a finished run says so and exits 0."""
    out = tmp_path / "run"
    sft.train(sft_config(world, out, stop_at_step=2))
    config_yaml = (out / "config.yaml").read_text()
    with pytest.raises(RunRefused, match="another config: train_files: ") as e:
        sft.train(sft_config(world, out, lr=2e-3, train_files=[str(world / "sft.jsonl")] * 2))
    assert "; lr: 0.001 -> 0.002. Resuming would mix two configs" in str(e.value)
    assert (out / "config.yaml").read_text() == config_yaml
    sft.train(sft_config(world, out, save_every=3, log_every=1, keep_last=2))  # run-control fields: fine
    with pytest.raises(RunFinished, match="holds a finished sft run"):
        sft.train(sft_config(world, out))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sft.main(cli(sft_values(world, out)))
    assert e.value.code == 0 and "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        sft.main(cli(sft_values(world, out, max_steps=8)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "max_steps: 6 -> 8" in err


def test_resume_without_chunk_size_takes_the_saved_one(world, tmp_path, capsys):
    """chunk_size None means "pick for me": resuming a run saved with an explicit chunk (as every run was before the
    default became auto) takes the saved value, says so, and ends equal to an uninterrupted run with that chunk; an
    explicit other chunk is still refused."""
    out = tmp_path / "run"
    sft.train(sft_config(world, out, chunk_size=64, stop_at_step=2))
    with pytest.raises(RunRefused, match="another config: chunk_size: 64 -> 128"):
        sft.train(sft_config(world, out, chunk_size=128))
    capsys.readouterr()
    rest = sft.train(sft_config(world, out))
    assert "[run] chunk_size: the saved run's 64 (not set now" in capsys.readouterr().out
    assert "chunk_size: 64" in (out / "config.yaml").read_text()
    full = sft.train(sft_config(world, tmp_path / "full", chunk_size=64))
    assert [r["loss"] for r in read_jsonl(out / "metrics.jsonl")] == full and rest == full[2:]
    assert same_weights(out / "final", tmp_path / "full" / "final")


def test_output_dir_that_is_a_file_is_one_line(world, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        sft.main(cli(sft_values(world, tmp_path / "file")))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"config error: output_dir {tmp_path / 'file'} is a file, not a folder; " \
                                        f"give a folder path (it is created if missing)\n"  # phase 0, no model loaded


def test_torn_metrics_line_is_cut_on_resume(world, tmp_path, capsys):
    """A crash (or a full disk) mid-row leaves a torn last line: resume cuts it, says so, and drops the rows logged
    after the checkpoint once, so the file equals an uninterrupted run's."""
    full = sft.train(sft_config(world, tmp_path / "full", max_steps=4))
    sft.train(sft_config(world, tmp_path / "cut", max_steps=4, stop_at_step=2, save_every=0))
    torn = '{"step": 4, "lo'
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.0}\n' + torn)  # a row past the checkpoint, then a torn one
    capsys.readouterr()
    sft.train(sft_config(world, tmp_path / "cut", max_steps=4, save_every=0))
    said = capsys.readouterr().out
    assert f"cut a torn last line ({len(torn)} bytes)" in said
    assert "dropped 1 row(s) logged after the checkpoint" in said
    assert [r["loss"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")] == full


def test_reward_final_eval_row_is_logged_once(world, tmp_path):
    """Killed after the final eval row was logged but before final/ was written, the rerun does not log it again."""
    from reward.train import RewardConfig
    from reward.train import train as train_rm

    c = dict(model_path=str(world / "policy"), tokenizer="small", train_files=[str(world / "pairs.jsonl")],
             eval_files=[str(world / "eval.jsonl")], seq_len=64, micro_batch_size_per_rank=2, grad_accum_steps=2,
             max_steps=4, lr=1e-3, save_every=2, eval_every=2, output_dir=str(tmp_path / "rm"))
    train_rm(build_config(RewardConfig, c))
    done = read_jsonl(tmp_path / "rm" / "metrics.jsonl")
    assert [r["step"] for r in done if "eval_accuracy" in r] == [2, 4]
    # the state a kill between the final eval row and final/ leaves: the row is logged, final/ is not there
    import shutil

    shutil.rmtree(tmp_path / "rm" / "final")
    info = json.loads((tmp_path / "rm" / "run.json").read_text())
    (tmp_path / "rm" / "run.json").write_text(json.dumps(info | {"status": "running"}))
    train_rm(build_config(RewardConfig, c))
    assert read_jsonl(tmp_path / "rm" / "metrics.jsonl") == done
    assert (tmp_path / "rm" / "final" / "reward_stats.json").is_file()


def test_nan_guard_checks_the_weights(world, tmp_path, monkeypatch):
    """A learning rate that overflows the weights while the loss and gradient are finite: the run stops after the
    optimizer step, names the last good checkpoint, and no checkpoint with non-finite weights is ever written."""
    from common.guard import NonFiniteLossError

    out = tmp_path / "run"
    sft.train(sft_config(world, out, stop_at_step=2))
    import common.optim

    # resumed, the schedule makes step 4's learning rate 1e-3 x 1e42: the fp32 weights overflow in that step
    monkeypatch.setattr(common.optim, "warmup_cosine", lambda *a: 1e42)
    with pytest.raises(NonFiniteLossError, match=r"step 4: \d+ of \d+ weight tensors hold NaN or inf.*"
                                                 r"kept at .*step-00000002"):
        sft.train(sft_config(world, out))
    assert [d.name for d in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
    assert all(torch.isfinite(w).all() for w in weights(out / "checkpoints" / "step-00000002" / "model").values())


def test_nonfinite_weight_count_by_hand():
    """NaN and -inf tensors count; a finite tensor whose sum overflows fp32 (2 x 3e38) does not; empty ones not."""
    from common.guard import nonfinite_tensors

    t = [torch.ones(3), torch.tensor([1.0, float("nan")]), torch.tensor([3e38, 3e38]), torch.tensor([-float("inf")]),
         torch.empty(0), torch.tensor([1.0, float("inf")]).bfloat16()]
    assert nonfinite_tensors(t) == 3 and nonfinite_tensors(t[2:3]) == 0


def test_ppo_model_kinds_and_nan_message(world, tmp_path, monkeypatch):
    """PPO refuses a causal LM as its reward model or value init (a random head would score noise), and its NaN
    message names the checkpoint that exists."""
    import align.ppo as ppo
    from common.config import ConfigError
    from common.guard import NonFiniteLossError

    def config(out, **kw):
        values = dict(policy_path=str(world / "policy"), reward_path=str(world / "reward"),
                      prompt_files=[str(world / "prompts.jsonl")], pretrain_files=[], heldout_files=[],
                      rollout_batch_prompts=4, samples_per_prompt=2, max_new_tokens=4, micro_batch_size=4,
                      value_warmup_steps=1, max_steps=3, policy_lr=1e-3, value_lr=1e-3, ptx_coef=0.0,
                      true_reward=False, save_every=1, output_dir=str(out))
        return build_config(ppo.PPOConfig, values | kw)

    with pytest.raises(ConfigError, match=r"reward_path .*policy is not a reward model \(Qwen2ForCausalLM, no "
                                          r"trained score head\)"):
        ppo.train(config(tmp_path / "a", reward_path=str(world / "policy")))
    with pytest.raises(ConfigError, match="value_path .* is not a reward model"):
        ppo.train(config(tmp_path / "a", value_path=str(world / "policy")))
    calls = {"n": 0}
    real = ppo.value_loss

    def poisoned(*a, **kw):  # 2 micro batches per step: step 2's first is call 3
        calls["n"] += 1
        loss, stats = real(*a, **kw)
        return (loss * float("nan") if calls["n"] >= 3 else loss), stats

    monkeypatch.setattr(ppo, "value_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 2: .*kept at .*step-00000001"):
        ppo.train(config(tmp_path / "b"))


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = ("import sys, time; from common.lock import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder / "run.lock")], env=ENV, cwd=REPO,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(world, tmp_path):
    from common.lock import LockedError, RunLock

    out = tmp_path / "run"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        with pytest.raises(LockedError, match=rf"in use by another run: pid {holder.pid} on host "):
            RunLock(out / "run.lock").acquire()
        with pytest.raises(RunRefused, match=rf"in use by another run: pid {holder.pid}"):
            sft.train(sft_config(world, out))
        assert not (out / "run.json").exists()  # refused before touching anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(out / "run.lock")
    note = lock.acquire()
    assert note.startswith(f"took over the lock of pid {holder.pid} on host ") and note.endswith("no longer running")
    lock.release()
    assert (out / "run.lock").read_text() == ""  # released: no owner named


def test_exit_with_parent(tmp_path):
    """A trainer started by a launcher (its environment) dies with it: the child asks for SIGTERM on its parent's
    death; killing the parent with SIGKILL ends the child within seconds."""
    child = ("import os, time; from common.lock import exit_with_parent; exit_with_parent(); "
             "print(os.getpid(), flush=True); time.sleep(120)")
    parent = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
              f"time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", parent], env={**ENV, "ACCELERATE_DYNAMO_BACKEND": "NO"}, cwd=REPO,
                         stdout=subprocess.PIPE, text=True)
    pid = int(p.stdout.readline())
    os.kill(pid, 0)  # alive
    p.send_signal(signal.SIGKILL)
    p.wait()
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower():
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the child outlived its parent")


def test_output_folders_follow_the_umask(world, tmp_path):
    """Checkpoint and final folders were created 0700 (files 0600) whatever the umask: a serving account could
    not read an exported model. Now they get 0777 / 0666 minus the umask, like any other file."""
    old = os.umask(0o027)
    try:
        sft.train(sft_config(world, tmp_path / "run", max_steps=2))
    finally:
        os.umask(old)
    out = tmp_path / "run"
    for d in (out / "final", out / "checkpoints" / "step-00000002", out / "checkpoints" / "step-00000002" / "model"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o750, d
    for f in list((out / "final").iterdir()) + [out / "metrics.jsonl", out / "run.json",
                                                  out / "checkpoints" / "step-00000002" / "state.json"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f


def last_line(text: str) -> str:
    """The last line of a process's stderr (progress bars redraw with carriage returns before it)."""
    return text.rstrip("\n").split("\n")[-1].split("\r")[-1]


def _limited(limit_bytes: int):
    def preexec():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return preexec


def test_file_size_limit_during_a_save_is_one_line(world, tmp_path):
    """`ulimit -f` smaller than the optimizer state: the resumed run fails writing checkpoint 4 with one line that
    names the step and the intact checkpoint 2, exits 1, leaves no temporary folder, and the same command without
    the limit resumes from step 2."""
    out = tmp_path / "run"
    sft.train(sft_config(world, out, max_steps=4, stop_at_step=2))
    state = out / "checkpoints" / "step-00000002" / "state.safetensors"
    model = out / "checkpoints" / "step-00000002" / "model" / "model.safetensors"
    limit = (state.stat().st_size + model.stat().st_size) // 2  # the weights fit, the optimizer state does not
    r = subprocess.run([sys.executable, str(REPO / "align" / "sft.py"), *cli(sft_values(world, out, max_steps=4))],
                       env=ENV, cwd=REPO, capture_output=True, text=True, preexec_fn=_limited(limit))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert last_line(r.stderr) == (
        f"error: file too large for the file system or the file-size limit (ulimit -f) writing checkpoint step 4 in "
        f"{out / 'checkpoints'}; the previous checkpoint step 2 is intact ({out / 'checkpoints' / 'step-00000002'}); "
        f"free space and rerun the same command to resume from it")
    assert [d.name for d in list_checkpoints(out / "checkpoints")] == ["step-00000002"] and stale(out) == []
    sft.train(sft_config(world, out, max_steps=4))
    assert (out / "final" / "model.safetensors").is_file()


def _can_mount_tmpfs() -> bool:
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d && rmdir $d"],
                       capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and mount namespaces for a real small tmpfs")
def test_full_disk_and_read_only_folder_are_one_line(world, tmp_path):
    """A real full file system (a tmpfs sized for one checkpoint and a bit, in a private mount namespace): the
    second checkpoint does not fit. One line, exit 1, checkpoint 2 intact and `latest`, no temporaries left. Then
    the same file system remounted read-only: one line naming it, exit 1."""
    probe = tmp_path / "probe"
    sft.train(sft_config(world, probe, max_steps=4, stop_at_step=2))
    size = sum(f.stat().st_size for f in (probe / "checkpoints" / "step-00000002").rglob("*") if f.is_file())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = mnt / "run"
    cmd = " ".join([sys.executable, str(REPO / "align" / "sft.py"), *cli(sft_values(world, out, max_steps=4))])
    kb = (int(size * 1.5) + 200_000) // 1024
    e1, e2, listing = tmp_path / "err1", tmp_path / "err2", tmp_path / "listing"
    script = (f"mount -t tmpfs -o size={kb}k tmpfs {mnt} || exit 9; {cmd} >/dev/null 2>{e1}; echo rc1=$?; "
              f"ls -a {out} {out}/checkpoints > {listing}; cat {out}/checkpoints/latest >> {listing}; "
              f"mount -o remount,ro {mnt} && {cmd} >/dev/null 2>{e2}; echo rc2=$?")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=ENV, cwd=REPO,
                       capture_output=True, text=True)
    assert "rc1=1" in r.stdout and "Traceback" not in e1.read_text(), e1.read_text()[-3000:]
    assert last_line(e1.read_text()) == (
        f"error: no space left on device writing checkpoint step 4 in {out / 'checkpoints'}; the previous "
        f"checkpoint step 2 is intact ({out / 'checkpoints' / 'step-00000002'}); free space and rerun the same "
        f"command to resume from it")
    names = listing.read_text().split()
    assert "step-00000002" in names and not any(n.endswith((".tmp", ".deleting")) for n in names)
    assert names[-1] == "step-00000002"  # latest
    assert "rc2=1" in r.stdout and e2.read_text() == f"error: read-only file system: cannot create or lock " \
                                                      f"output_dir {out}\n"


# ---------------------------------------------------------------------------------------------------- slow tests
def trainer_values(kind: str, world: Path, out: Path) -> tuple[str, dict]:
    """(script, CLI values) of a small 8-step run of each trainer, checkpoints every 2 steps, keep_last 1."""
    common = dict(max_steps=8, save_every=2, keep_last=1, output_dir=str(out))
    if kind == "sft":
        return "align/sft.py", sft_values(world, out) | common
    if kind == "reward":
        return "reward/train.py", dict(model_path=str(world / "policy"), tokenizer="small",
                                       train_files=[str(world / "pairs.jsonl")], eval_files=[str(world / "eval.jsonl")],
                                       seq_len=64, micro_batch_size_per_rank=2, grad_accum_steps=2, lr=1e-3,
                                       eval_every=2) | common
    if kind == "dpo":
        return "align/dpo.py", dict(init_config=str(world / "tiny.json"), tokenizer="small",
                                    train_files=[str(world / "pairs.jsonl")], seq_len=64, micro_batch_size_per_rank=2,
                                    grad_accum_steps=2, warmup_steps=1, lr=1e-3) | common
    if kind == "kto":  # a preference file gives one thumbs-up and one thumbs-down row per pair
        return "align/kto.py", dict(init_config=str(world / "tiny.json"), tokenizer="small",
                                    train_files=[str(world / "pairs.jsonl")], seq_len=64, micro_batch_size_per_rank=2,
                                    grad_accum_steps=2, warmup_steps=1, lr=1e-3) | common
    return "align/ppo.py", dict(policy_path=str(world / "policy"), reward_path=str(world / "reward"),
                                prompt_files=[str(world / "prompts.jsonl")],
                                pretrain_files=[str(world / "pretrain.jsonl")],
                                heldout_files=[str(world / "heldout.jsonl")], ptx_seq_len=32, heldout_rows=4,
                                rollout_batch_prompts=4, samples_per_prompt=2, max_new_tokens=6, micro_batch_size=4,
                                value_warmup_steps=1, policy_lr=1e-3, value_lr=1e-3, ptx_coef=0.5, ptx_rows=2,
                                kl_adaptive=True, tax_every=1, true_reward=False) | common


def launch(script: str, values: dict, failpoint: str | None = None, kill_after: float | None = None,
           extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a trainer as its own process; with `failpoint` it kills itself there (common/failpoint.py), with
    `kill_after` it gets SIGKILL after that many seconds."""
    env = ENV | ({"QWEN_ALIGN_FAILPOINT": failpoint} if failpoint else {}) | (extra_env or {})
    p = subprocess.Popen([sys.executable, str(REPO / script), *cli(values)], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def assert_consistent(out: Path) -> None:
    """What any kill must leave: every checkpoint under a live name is complete (weights, state, meta of this run),
    and `latest` names one of them."""
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    root = out / "checkpoints"
    live = sorted(d for d in root.glob("step-*")) if root.is_dir() else []
    for d in live:
        meta = read_meta(d)
        assert meta is not None and meta["run_id"] == run_id, d
        assert (d / "state.json").is_file() and (d / "state.safetensors").is_file(), d
        assert list((d / "model").glob("*.safetensors")) or (d / "model" / "adapter_config.json").is_file(), d
    if (root / "latest").is_file():
        assert (root / (root / "latest").read_text().strip()) in live


KILLS = ["atomic_dir:step-00000004",  # save window: checkpoint 4 written, not renamed into place
         "checkpoint.renamed@4",  # checkpoint 4 in place, `latest` not updated, 2 not pruned
         "prune@2",  # (resumed from 4, saving 6) checkpoint 2 renamed for deletion, not deleted
         "metrics.torn@7",  # half of step 7's metrics row written
         "atomic_dir:final",  # final/ written, not renamed (reward: after its final eval row)
         "final.written"]  # final/ in place, run.json not yet "finished"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "reward", "dpo", "kto", "ppo"])
def test_kill_9_anywhere_then_resume_equals_uninterrupted(world, tmp_path, kind):
    """Each trainer, 8 steps: (a) killed at each named crash point in turn, resumed by the same command each time;
    (b) killed twice at random moments (seeded), resumed. Both end with metrics rows (timings aside) and final
    weights bit-identical to an uninterrupted run, no row twice, no temporary left, run.json finished; every kill
    leaves complete checkpoints only, with `latest` naming one."""
    script, ref_values = trainer_values(kind, world, tmp_path / "ref")
    t0 = time.perf_counter()
    ref = launch(script, ref_values)
    wall = time.perf_counter() - t0
    assert ref.returncode == 0, ref.stderr[-3000:]

    def finish_and_compare(out: Path):
        done = launch(script, trainer_values(kind, world, out)[1])
        assert done.returncode == 0, done.stderr[-3000:]
        assert metric_rows(out) == metric_rows(tmp_path / "ref")
        assert same_weights(out / "final", tmp_path / "ref" / "final")
        if kind == "reward":
            assert (out / "final" / "reward_stats.json").read_text() == \
                (tmp_path / "ref" / "final" / "reward_stats.json").read_text()
        assert stale(out) == [] and json.loads((out / "run.json").read_text())["status"] == "finished"
        again = launch(script, trainer_values(kind, world, out)[1])
        assert again.returncode == 0 and "nothing to do" in again.stdout

    out = tmp_path / "points"
    for point in KILLS:
        r = launch(script, trainer_values(kind, world, out)[1], failpoint=point)
        assert r.returncode == -signal.SIGKILL, (point, r.stderr[-3000:])
        assert_consistent(out)
    assert (out / "final").is_dir()  # the last kill came after final/ was in place
    finish_and_compare(out)

    out, rng = tmp_path / "random", random.Random(f"kill-{kind}")
    for _ in range(2):
        r = launch(script, trainer_values(kind, world, out)[1], kill_after=rng.uniform(0.3, 0.7) * wall)
        assert r.returncode in (-signal.SIGKILL, 0), r.stderr[-3000:]
        if (out / "run.json").is_file():
            assert_consistent(out)
    finish_and_compare(out)


def _wait_for_owner(out: Path, timeout: float = 300) -> int:  # generous: a neighbour test may share the cores
    for _ in range(int(timeout * 10)):
        text = (out / "run.lock").read_text() if (out / "run.lock").is_file() else ""
        if text.strip() and (out / "run.json").is_file():
            return json.loads(text)["pid"]
        time.sleep(0.1)
    raise AssertionError(f"no run took {out}")


@pytest.mark.slow
def test_two_runs_into_one_folder(world, tmp_path):
    """While a run is live, a second one into its folder is refused in one line naming the owner, and writes
    nothing; the first finishes unharmed. A kill -9 of the owner frees the folder: the next start says it took the
    lock over and resumes."""
    out = tmp_path / "run"
    values = sft_values(world, out, max_steps=12, save_every=4, micro_batch_size_per_rank=1)
    first = subprocess.Popen([sys.executable, str(REPO / "align" / "sft.py"), *cli(values)], env=ENV, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    owner = _wait_for_owner(out)
    assert owner == first.pid
    first.send_signal(signal.SIGSTOP)  # live but paused: the second start cannot race past its end
    try:
        config = (out / "config.yaml").read_text()
        second = launch("align/sft.py", values | {"lr": 5e-4})
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and last_line(second.stderr).startswith(
        f"run error: {out} is in use by another run: pid {first.pid} on host "), second.stderr[-2000:]
    assert (out / "config.yaml").read_text() == config
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, 13))
    assert json.loads((out / "run.json").read_text())["status"] == "finished"

    out2 = tmp_path / "run2"
    values2 = values | {"output_dir": str(out2)}
    victim = subprocess.Popen([sys.executable, str(REPO / "align" / "sft.py"), *cli(values2)], env=ENV, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_owner(out2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    after = launch("align/sft.py", values2)
    assert after.returncode == 0 and f"took over the lock of pid {victim.pid}" in after.stdout, after.stderr[-2000:]
    assert metric_rows(out2) == metric_rows(out)


@pytest.mark.slow
def test_trainer_exits_when_accelerate_launch_is_killed(world, tmp_path):
    """kill -9 of the `accelerate launch` parent: the trainer (its child) gets SIGTERM and ends within seconds
    instead of running on as an orphan; the same command then resumes the run to the end."""
    out = tmp_path / "run"
    values = sft_values(world, out, max_steps=200, save_every=20, micro_batch_size_per_rank=1)
    launcher = subprocess.Popen([*accelerate_launch("one_process", tmp_path, 1), str(REPO / "align" / "sft.py"),
                                 *cli(values)], env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    trainer = _wait_for_owner(out)
    assert trainer != launcher.pid
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    for _ in range(150):
        status = Path(f"/proc/{trainer}/status")
        if not status.exists() or "zombie" in status.read_text().lower():
            break
        time.sleep(0.1)
    else:
        os.kill(trainer, signal.SIGKILL)
        pytest.fail("the trainer outlived its launcher")
    again = launch("align/sft.py", values)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, 201))
