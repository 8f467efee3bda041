"""PPO side by side with TRL 1.12's PPOTrainer: same policy / reference / reward / value sizes, prompts and response
length; episodes/s (responses trained on per second of training loop), peak memory and our weight-sync share.

    .venv/bin/pip install --no-deps --target .cache/trl112 trl==1.12.0     # TRL 1.12 (last with PPO), separately
    .venv/bin/python benchmarks/ppo_vs_trl.py [--episodes-per-step 8 --response-length 16 --steps 4]
                                              [--engine builtin|vllm] [--vocab 151936]

Each side runs in its own process (peak RSS = that process's maximum resident memory, models included); only the
TRL process puts .cache/trl112 first on sys.path. TRL samples with top_k 0 / top_p 1.0, so ours runs with top_p 1.0
here too; KL 0.04, value clip 0.15, one PPO epoch, one mini batch, no value warmup and no ptx on both sides.
The models get the real Qwen2 vocabulary (151,936) unless --vocab says otherwise. Episodes/s is reported over the
whole loop and over steps 2..N (both sides timed per step; the first step carries one-time costs such as vLLM
building its CPU kernels). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRL_DIR = REPO / ".cache" / "trl112"
sys.path.insert(0, str(REPO))  # benchmarks.* in the driver and in each side's process


def build_world(d: Path, n_prompts: int, config: Path, vocab: int | None = None) -> None:
    """policy/ (tiny Qwen2 causal LM, random init; vocab_size overridden by `vocab`) and reward/ (same backbone +
    scalar head), prompts.jsonl. The tokenizer is the 1,000-token test BPE: its ids fit any larger vocabulary."""
    from data.tokenizer import small_tokenizer
    from model.checkpoint import config_from_hf, save_causal_lm
    from model.heads import ScalarHeadModel
    from model.qwen import QwenForCausalLM

    tok = small_tokenizer()
    hf = json.loads(config.read_text()) | ({"vocab_size": vocab} if vocab else {})
    save_causal_lm(QwenForCausalLM(config_from_hf(hf)).init_weights(seed=0), d / "policy", tok)
    ScalarHeadModel.from_pretrained(d / "policy", head_seed=1).save_pretrained(d / "reward", tokenizer=tok)
    lines = (REPO / "data" / "demo" / "prompts_train.jsonl").read_text(encoding="utf-8").splitlines()[:n_prompts]
    (d / "prompts.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def peak_rss_mib() -> float:
    from benchmarks.model_step import process_peak_mib  # VmHWM: ru_maxrss would include the driver's peak

    return process_peak_mib()


def run_ours(d: Path, a) -> dict:
    from align.ppo import PPOConfig, train
    from common.config import build_config

    c = build_config(PPOConfig, dict(
        policy_path=str(d / "policy"), reward_path=str(d / "reward"), prompt_files=[str(d / "prompts.jsonl")],
        heldout_files=[], ptx_coef=0.0, true_reward=False, engine=a.engine,
        rollout_batch_prompts=a.episodes_per_step // 2, samples_per_prompt=2, top_p=1.0, temperature=1.0,
        max_new_tokens=a.response_length, micro_batch_size=a.episodes_per_step, value_warmup_steps=0,
        max_steps=a.steps, output_dir=str(d / "ours"), resume=False, overwrite_output_dir=True, precision="fp32"))
    hist = train(c)
    step_s = [h["time_step"] for h in hist]
    loop_s = sum(step_s)
    return {"episodes_per_s": a.episodes_per_step * a.steps / loop_s, "step_s": step_s, "peak_rss_mib": peak_rss_mib(),
            # shares over steps 2..N, like the steady episodes/s (the first step has no sync and a slow first rollout)
            "sync_share": sum(h["time_sync"] for h in hist[1:]) / sum(step_s[1:]),
            "rollout_share": sum(h["time_rollout"] for h in hist[1:]) / sum(step_s[1:]),
            "mean_response_length": sum(h["response_length"] for h in hist) / len(hist)}


def run_trl(d: Path, a) -> dict:
    sys.path.insert(0, str(TRL_DIR))  # TRL 1.12 in this process only
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast,
                              TrainerCallback)

    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from data.chatml import IM_END, special_id
    from data.datasets import build_prompt_examples, load_records

    tok = PreTrainedTokenizerFast.from_pretrained(str(d / "policy"))
    prompts, _ = build_prompt_examples(load_records(d / "prompts.jsonl", kind="prompt")[0], tok, 256)
    ds = Dataset.from_dict({"input_ids": [p["prompt_ids"] for p in prompts]})
    lm = lambda: AutoModelForCausalLM.from_pretrained(str(d / "policy"), dtype=torch.float32)  # noqa: E731
    sc = lambda: AutoModelForSequenceClassification.from_pretrained(  # noqa: E731
        str(d / "reward"), num_labels=1, dtype=torch.float32)
    args = PPOConfig(output_dir=str(d / "trl"), per_device_train_batch_size=a.episodes_per_step,
                     gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1,
                     total_episodes=a.episodes_per_step * a.steps, response_length=a.response_length,
                     stop_token_id=special_id(tok, IM_END), temperature=1.0, missing_eos_penalty=1.0, kl_coef=0.04,
                     cliprange_value=0.15, learning_rate=1e-6, local_rollout_forward_batch_size=a.episodes_per_step,
                     num_sample_generations=0, use_cpu=True, report_to=[], save_strategy="no", logging_steps=10**6,
                     seed=0)
    marks: list[float] = []

    class StepClock(TrainerCallback):  # a timestamp when the loop starts and after every PPO update
        def on_train_begin(self, *_, **__):
            marks.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            marks.append(time.perf_counter())

    trainer = PPOTrainer(args=args, processing_class=tok, model=lm(), ref_model=lm(), reward_model=sc(),
                         train_dataset=ds, value_model=sc(), callbacks=[StepClock()])
    t0 = time.perf_counter()
    trainer.train()
    loop_s = time.perf_counter() - t0
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    return {"episodes_per_s": a.episodes_per_step * a.steps / loop_s, "step_s": step_s, "peak_rss_mib": peak_rss_mib()}


def steady(r: dict, a) -> float:
    """Episodes/s over steps 2..N: without the first step's one-time costs (vLLM's first generate builds its CPU
    kernels, about 3 s; TRL's first step warms up too). Both sides measured the same way."""
    return a.episodes_per_step * (len(r["step_s"]) - 1) / sum(r["step_s"][1:])


def table(ours: dict, trl: dict, a) -> str:
    rows = [f"| ours (align/ppo.py, {a.engine} engine) | {ours['episodes_per_s']:.2f} | {steady(ours, a):.2f} | "
            f"{ours['peak_rss_mib']:.0f} | {100 * ours['sync_share']:.1f}% (rollout {100 * ours['rollout_share']:.0f}%) |",
            f"| TRL 1.12 PPOTrainer | {trl['episodes_per_s']:.2f} | {steady(trl, a):.2f} | {trl['peak_rss_mib']:.0f} | n/a |"]
    return "\n".join([
        f"PPO, {a.episodes_per_step} episodes/step, response length {a.response_length}, {a.steps} steps, "
        f"model {a.config.name} with vocab {a.vocab or 'of the config'} (policy, reference, reward and value the same "
        f"size), CPU {os.cpu_count()} cores",
        "", "| trainer | episodes/s, whole loop | episodes/s, steps 2..N | peak RSS (MiB) | weight-sync share of steps 2..N |",
        "|---|---|---|---|---|", *rows, "",
        f"speed-up: {ours['episodes_per_s'] / trl['episodes_per_s']:.2f}x TRL's episodes/s over the whole loop, "
        f"{steady(ours, a) / steady(trl, a):.2f}x over steps 2..N"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes-per-step", type=int, default=8)
    p.add_argument("--response-length", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--engine", choices=["builtin", "vllm"], default="builtin", help="our rollout engine")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "tiny_qwen2.json", help="Qwen2 config.json")
    p.add_argument("--vocab", type=int, default=151936,
                   help="vocab_size of the models (default: the real Qwen2 vocabulary; 0 = the config's)")
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side:  # child process: run one side, print one JSON line
        print("RESULT " + json.dumps((run_ours if a.side == "ours" else run_trl)(a.workdir, a)), flush=True)
        return
    from benchmarks.machine import machine_line

    print(machine_line(), flush=True)
    if not (TRL_DIR / "trl").is_dir():
        sys.exit(f"TRL 1.12 not found in {TRL_DIR}: .venv/bin/pip install --no-deps --target {TRL_DIR} trl==1.12.0")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_world(Path(tmp), a.prompts, a.config, a.vocab)
        for side in ("ours", "trl"):
            cmd = [sys.executable, __file__, "--side", side, "--workdir", tmp, "--episodes-per-step",
                   str(a.episodes_per_step), "--response-length", str(a.response_length), "--steps", str(a.steps),
                   "--config", str(a.config), "--engine", a.engine]
            env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                       VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                sys.exit(f"{side} run failed (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            results[side] = json.loads(line[-1][len("RESULT "):])
    print(table(results["ours"], results["trl"], a))


if __name__ == "__main__":
    main()
