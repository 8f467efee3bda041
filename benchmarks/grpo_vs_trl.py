"""GRPO side by side with TRL 1.16's GRPOTrainer: same policy, prompts, group size, reply length and reward; episodes/s
(replies trained on per second of training loop) and peak memory, in one run.

    .venv/bin/python benchmarks/grpo_vs_trl.py [--prompts-per-step 8 --group 4 --response-length 32 --steps 6]
                                               [--engine builtin|vllm] [--vocab 151936]

Both sides: a tiny random Qwen2 (configs/tiny_qwen2.json, vocab_size 151,936 with the real Qwen2 tokenizer unless
--vocab says otherwise), the demo's training prompts rendered as ChatML (TRL gets the rendered text; the run checks
that TRL's prompt token ids equal ours), G replies per prompt sampled at temperature 1 / top-p 1 up to
--response-length tokens, the demo's rule `data.demo_reward:true_reward` as the only reward (a verifiable reward: no
reward model on either side), group-normalised advantages (mean and std of the group), the KL to the reference as a
k3 loss term with coefficient 0.04 (so both load a reference model), PPO clip 0.2, one policy update per generation
batch (TRL: per_device_train_batch_size = prompts x G completions, num_iterations 1, gradient_accumulation_steps 1;
ours: one PPO epoch, one mini batch), token-mean loss (TRL's default loss_type 'dapo'), learning rate 1e-6, fp32.
TRL generates with transformers' generate (use_cpu; its vLLM modes need a GPU), with gradient checkpointing off
(its GRPOConfig default is on, which is slower; `--trl-gradient-checkpointing` measures that too) and no
missing-EOS penalty on either side.

Each side runs in its own process (peak RSS = that process's maximum resident memory, models included). Episodes/s
is reported over the whole loop and over steps 2..N (both sides timed per step: the first step carries one-time
costs). Prints a Markdown table.
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
KL_COEF, LR, CLIP = 0.04, 1e-6, 0.2


def build_world(d: Path, a) -> None:
    """policy/ (tiny Qwen2 causal LM, random init, the real Qwen2 tokenizer saved beside it) and prompts.jsonl."""
    from data.tokenizer import qwen2_tokenizer
    from model.checkpoint import config_from_hf, save_causal_lm
    from model.qwen import QwenForCausalLM

    hf = json.loads(a.config.read_text()) | ({"vocab_size": a.vocab} if a.vocab else {})
    tok = qwen2_tokenizer()
    hf |= {"eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"), "pad_token_id": tok.pad_token_id}
    hf.pop("bos_token_id", None)  # the config's ids are the test BPE's; TRL stops at the config's eos id too
    save_causal_lm(QwenForCausalLM(config_from_hf(hf)).init_weights(seed=0), d / "policy", tok)
    lines = (REPO / "data" / "demo" / "prompts_train.jsonl").read_text(encoding="utf-8").splitlines()
    (d / "prompts.jsonl").write_text("\n".join(lines[:a.prompts]) + "\n", encoding="utf-8")


def peak_rss_mib() -> float:
    from benchmarks.model_step import process_peak_mib  # VmHWM: ru_maxrss would include the driver's peak

    return process_peak_mib()


def run_ours(d: Path, a) -> dict:
    from align.ppo import PPOConfig, train
    from common.config import build_config

    c = build_config(PPOConfig, dict(
        policy_path=str(d / "policy"), reward_path=None, reward_funcs=["data.demo_reward:true_reward"],
        advantage="grpo", kl_in="loss", kl_coef=KL_COEF, prompt_files=[str(d / "prompts.jsonl")], pretrain_files=[],
        heldout_files=[], ptx_coef=0.0, true_reward=False, engine=a.engine, rollout_batch_prompts=a.prompts_per_step,
        samples_per_prompt=a.group, top_p=1.0, temperature=1.0, max_new_tokens=a.response_length,
        micro_batch_size=a.prompts_per_step * a.group, ppo_epochs=1, num_mini_batches=1, clip=CLIP,
        eos_missing_penalty=0.0, policy_lr=LR, max_steps=a.steps, output_dir=str(d / "ours"), resume=False,
        overwrite_output_dir=True, precision="fp32"))
    hist = train(c)
    step_s = [h["time_step"] for h in hist]
    return {"episodes_per_s": a.prompts_per_step * a.group * a.steps / sum(step_s), "step_s": step_s,
            "peak_rss_mib": peak_rss_mib(), "rollout_share": sum(h["time_rollout"] for h in hist[1:]) / sum(step_s[1:]),
            "mean_response_length": sum(h["response_length"] for h in hist) / len(hist),
            "mean_reward": sum(h["score"] for h in hist) / len(hist)}


def run_trl(d: Path, a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from data.chatml import render
    from data.datasets import build_prompt_examples, load_records
    from data.demo_reward import true_reward

    tok = AutoTokenizer.from_pretrained(str(d / "policy"))
    ours, _ = build_prompt_examples(load_records(d / "prompts.jsonl", kind="prompt")[0], tok, 256)
    text = [render(p["messages"], add_generation_prompt=True) for p in ours]
    if [tok(t)["input_ids"] for t in text] != [p["prompt_ids"] for p in ours]:
        raise SystemExit("TRL would tokenise the rendered prompts differently from ours; the comparison is off")
    users = [p["messages"][-1]["content"] for p in ours]
    ds = Dataset.from_dict({"prompt": text, "user": users})
    rewards: list[float] = []

    def demo_true_reward(prompts, completions, user, **_):  # TRL's reward-function signature
        out = [true_reward(u, c) for u, c in zip(user, completions)]
        rewards.extend(out)
        return out

    args = GRPOConfig(output_dir=str(d / "trl"), per_device_train_batch_size=a.prompts_per_step * a.group,
                      gradient_accumulation_steps=1, num_generations=a.group, max_completion_length=a.response_length,
                      temperature=1.0, top_p=1.0, top_k=0, beta=KL_COEF, epsilon=CLIP, num_iterations=1,
                      loss_type="dapo", scale_rewards="group", learning_rate=LR, max_steps=a.steps, use_cpu=True,
                      bf16=False, gradient_checkpointing=a.trl_gradient_checkpointing, disable_dropout=True,
                      report_to=[], save_strategy="no", logging_steps=10**6, seed=0, log_completions=False)
    marks: list[float] = []

    class StepClock(TrainerCallback):  # a timestamp when the loop starts and after every optimizer step
        def on_train_begin(self, *_, **__):
            marks.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            marks.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(str(d / "policy"), dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=[demo_true_reward], args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[StepClock()])
    t0 = time.perf_counter()
    trainer.train()
    loop_s = time.perf_counter() - t0
    step_s = [y - x for x, y in zip(marks, marks[1:])]
    return {"episodes_per_s": a.prompts_per_step * a.group * a.steps / loop_s, "step_s": step_s,
            "peak_rss_mib": peak_rss_mib(), "mean_reward": sum(rewards) / max(len(rewards), 1)}


def steady(r: dict, a) -> float:
    """Episodes/s over steps 2..N (without the first step's one-time costs), both sides measured the same way."""
    return a.prompts_per_step * a.group * (len(r["step_s"]) - 1) / sum(r["step_s"][1:])


def table(res: dict, a) -> str:
    ours = res["ours"]
    names = {"ours": f"ours (align/ppo.py --advantage grpo, {a.engine} engine)", "trl": "TRL 1.16 GRPOTrainer",
             "trl_gc": "TRL 1.16 GRPOTrainer, gradient checkpointing (its default)"}
    rows = [f"| {names[k]} | {r['episodes_per_s']:.2f} | {steady(r, a):.2f} | {r['peak_rss_mib']:.0f} | "
            f"{r['mean_reward']:.3f} |" for k, r in res.items()]
    n = a.prompts_per_step * a.group
    lines = [f"GRPO, {a.prompts_per_step} prompts x {a.group} replies = {n} episodes/step, reply length "
             f"{a.response_length}, {a.steps} steps, model {a.config.name} with vocab {a.vocab or 'of the config'} "
             f"(policy and reference), reward data.demo_reward:true_reward, CPU {os.cpu_count()} cores, load average "
             f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end",
             "", "| trainer | episodes/s, whole loop | episodes/s, steps 2..N | peak RSS (MiB) | mean reward |",
             "|---|---|---|---|---|", *rows, ""]
    for k in res:
        if k != "ours":
            lines.append(f"speed-up vs {names[k]}: {ours['episodes_per_s'] / res[k]['episodes_per_s']:.2f}x over the "
                         f"whole loop, {steady(ours, a) / steady(res[k], a):.2f}x over steps 2..N; memory "
                         f"{ours['peak_rss_mib'] / res[k]['peak_rss_mib']:.2f}x")
    lines.append(f"our rollout share of steps 2..N: {100 * ours['rollout_share']:.0f}%")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group", type=int, default=4, help="replies per prompt (num_generations)")
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--engine", choices=["builtin", "vllm"], default="builtin", help="our rollout engine")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "tiny_qwen2.json", help="Qwen2 config.json")
    p.add_argument("--vocab", type=int, default=151936,
                   help="vocab_size of the model (default: the real Qwen2 vocabulary; 0 = the config's)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="also run TRL with its default gradient checkpointing")
    p.add_argument("--side", choices=["ours", "trl", "trl_gc"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side:  # child process: run one side, print one JSON line
        a.trl_gradient_checkpointing = a.side == "trl_gc"
        print("RESULT " + json.dumps((run_ours if a.side == "ours" else run_trl)(a.workdir, a)), flush=True)
        return
    if a.vocab and a.vocab < 151646:
        sys.exit("--vocab must hold the Qwen2 tokenizer's 151,646 ids (or 0 for the config's, if it does)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(REPO))
        build_world(Path(tmp), a)
        for side in ("ours", "trl") + (("trl_gc",) if a.trl_gradient_checkpointing else ()):
            cmd = [sys.executable, __file__, "--side", side, "--workdir", tmp, "--prompts-per-step",
                   str(a.prompts_per_step), "--group", str(a.group), "--response-length", str(a.response_length),
                   "--steps", str(a.steps), "--config", str(a.config), "--engine", a.engine, "--vocab", str(a.vocab)]
            env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO),
                       VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                sys.exit(f"{side} run failed (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            results[side] = json.loads(line[-1][len("RESULT "):])
    print(table(results, a))


if __name__ == "__main__":
    main()
