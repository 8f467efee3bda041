"""The whole recipe on the embedded demo, each stage a normal entry point run as its own process:

    base model (pretraining from random init) -> SFT -> reward PMP -> reward finetune -> reward benchmark
    -> PPO (with and without PPO-ptx) -> DPO -> KTO on thumbs-only ratings -> GRPO with the demo's rule as a
    verifiable reward -> evaluation on held-out prompts

    python -m align.pipeline [--out runs/demo] [--fresh] [--engine builtin|vllm]   (make demo runs this)

The RL stages use the built-in rollout engine by default: on a CPU at the demo's model size it samples faster than
vLLM and starts at once (vLLM's CPU start-up is about 12 s per run); `--engine vllm` runs PPO and GRPO on vLLM.

A stage whose final checkpoint exists is skipped, so an interrupted pipeline continues where it stopped; --fresh
starts over. Prints the commands it runs (copy one to rerun a stage alone) and ends with one table, saved beside
the stage outputs as summary.md with a summary.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common.config import ArgumentParser, user_errors
from common.preflight import check_output_dir

ROOT = Path(__file__).resolve().parents[1]


def stages(out: Path, engine: str) -> list[tuple[str, list[str], Path]]:
    """(name, command, the folder whose existence means the stage is done)."""
    py = [sys.executable]
    base, sft, pmp, rm = out / "base", out / "sft", out / "rm_pmp", out / "rm"
    ppo = ["align/ppo.py", "--config", "configs/ppo.yaml", "--policy_path", f"{sft}/final",
           "--reward_path", f"{rm}/final", "--engine", engine]
    policies = [f"SFT={sft}/final", f"PPO={out}/ppo/final", f"PPO without ptx={out}/ppo_noptx/final",
                f"DPO={out}/dpo/final", f"KTO={out}/kto/final", f"GRPO={out}/grpo/final"]
    return [
        ("base model", py + ["align/sft.py", "--config", "configs/pretrain.yaml", "--output_dir", str(base)],
         base / "final"),
        ("sft", py + ["align/sft.py", "--config", "configs/sft.yaml", "--model_path", f"{base}/final",
                      "--output_dir", str(sft)], sft / "final"),
        ("reward PMP", py + ["reward/train.py", "--config", "configs/reward_pmp.yaml", "--model_path",
                             f"{sft}/final", "--output_dir", str(pmp)], pmp / "final"),
        ("reward finetune", py + ["reward/train.py", "--config", "configs/reward_ft.yaml", "--model_path",
                                  f"{pmp}/final", "--output_dir", str(rm)], rm / "final"),
        ("reward benchmark", py + ["-m", "reward.bench", "--model", f"PMP={pmp}/final", "--model", f"RM={rm}/final",
                                   "--data", "demo rm_test=data/demo/rm_test.jsonl",
                                   "--data", "demo pmp (noisy)=data/demo/pmp.jsonl", "--max_pairs", "500",
                                   "--out_dir", str(out / "bench")], out / "bench" / "bench.md"),
        ("ppo", py + ppo + ["--output_dir", str(out / "ppo")], out / "ppo" / "final"),
        ("ppo without ptx", py + ppo + ["--ptx_coef", "0", "--output_dir", str(out / "ppo_noptx")],
         out / "ppo_noptx" / "final"),
        ("dpo", py + ["align/dpo.py", "--config", "configs/dpo.yaml", "--init_config", "null", "--model_path",
                      f"{sft}/final", "--output_dir", str(out / "dpo")], out / "dpo" / "final"),
        ("kto", py + ["align/kto.py", "--config", "configs/kto.yaml", "--model_path", f"{sft}/final",
                      "--output_dir", str(out / "kto")], out / "kto" / "final"),
        ("grpo", py + ["align/ppo.py", "--config", "configs/grpo.yaml", "--policy_path", f"{sft}/final",
                       "--engine", engine, "--output_dir", str(out / "grpo")], out / "grpo" / "final"),
        ("evaluate", py + ["-m", "align.evaluate", "--reference", f"{sft}/final", "--reward", f"{rm}/final",
                           *[x for p in policies for x in ("--policy", p)],
                           "--prompts", "data/demo/prompts_heldout.jsonl",
                           "--heldout", "data/demo/pretrain_heldout.jsonl", "--tokenizer", "demo",
                           "--out", str(out / "eval")], out / "eval" / "eval.md"),
    ]


def run_stage(name: str, cmd: list[str], done: Path, log_dir: Path) -> float:
    if done.exists():
        print(f"== {name}: done already ({done}), skipped", flush=True)
        return 0.0
    shown = " ".join(c if " " not in c else repr(c) for c in cmd).replace(sys.executable, "python")
    print(f"\n== {name}: {shown}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = log_dir / f"{name.replace(' ', '_')}.log"
    with open(log, "w") as f:  # stream to the terminal (progress bars) and keep a log
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            f.write(chunk.decode(errors="replace"))
        rc = proc.wait()
    if rc != 0:
        sys.exit(f"stage {name!r} failed (exit {rc}); its log: {log}. Fix and rerun: finished stages are skipped.")
    return time.perf_counter() - t0


def summary(out: Path, seconds: dict[str, float]) -> str:
    """The stages' own tables (reward/bench.py writes bench.md, align/evaluate.py eval.md) under one heading each."""
    ev = json.loads((out / "eval" / "eval.json").read_text())
    bench_md = (out / "bench" / "bench.md").read_text().split("\n\nLength bias")[0]
    lines = ["### Reward models: pairwise accuracy % (Qwen report Table 4 style)", "", bench_md, "",
             f"### Policies on {ev['prompts']} held-out prompts x {ev['n']} sampled replies", "",
             (out / "eval" / "eval.md").read_text().rstrip(), "",
             "true reward: the demo's checkable rule (data/demo/README.md); KL: sum over reply tokens of "
             "log pi - log pi_SFT on the policy's own samples; alignment tax: held-out pretraining-text LM loss "
             "minus the SFT model's.", "",
             "stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    return "\n".join(lines)


def plot_summary(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = json.loads((out / "eval" / "eval.json").read_text())["policies"]
    names = list(ev)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, title in zip(axes, ["true_reward", "kl", "alignment_tax"],
                              ["true reward (held-out)", "KL from SFT (nats/reply)", "alignment tax (LM loss rise)"]):
        bars = ax.bar(names, [ev[n][key] for n in names],
                      color=["grey", "tab:blue", "tab:cyan", "tab:orange", "tab:green", "tab:purple"][:len(names)])
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    ap = ArgumentParser(prog="python -m align.pipeline", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="folder for every stage's output")
    ap.add_argument("--fresh", action="store_true", help="delete --out first and run every stage")
    ap.add_argument("--engine", default="builtin", choices=["builtin", "vllm"], help="PPO and GRPO rollout engine")
    args = ap.parse_args(argv)
    out = (ROOT / args.out).resolve()
    with user_errors():
        check_output_dir(out, "--out")
    if args.fresh and out.exists():
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seconds = {name: run_stage(name, cmd, done, out / "logs") for name, cmd, done in stages(out, args.engine)}
    text = summary(out, seconds)
    (out / "summary.md").write_text(text + "\n")
    plot_summary(out)
    print("\n" + text)
    print(f"\n[pipeline] done in {time.perf_counter() - t0:.0f} s; table in {out / 'summary.md'}, "
          f"plots in {out}/summary.png, {out}/*/*.png; every */final folder loads in transformers.")


if __name__ == "__main__":
    main()
