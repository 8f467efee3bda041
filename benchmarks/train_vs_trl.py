"""Our SFT and reward-model training vs TRL 1.16's SFTTrainer and RewardTrainer, side by side in one run.

    python benchmarks/train_vs_trl.py [--steps 20] [--batch 4] [--hidden 128] [--repeats 1] [--out runs/bench_trl]
    ATEN_CPU_CAPABILITY=default python benchmarks/train_vs_trl.py    # torch's portable kernels

Same tiny Qwen2 (2 layers, the real 151,936-token vocabulary, random weights), same tokenizer (the real Qwen2 BPE),
same records (data/demo/sft.jsonl, data/demo/rm_train.jsonl), same batch size and sequence length, no packing,
fp32 on CPU, AdamW. Each trainer runs in its own subprocess, alternating ours / TRL `--repeats` times (medians).
Throughput = non-pad tokens / seconds over the optimizer steps after the first (median per-step tokens/s); also CPU
seconds per step (all threads). On a machine shared with other jobs, `--threads 1` gives steadier ratios (with two
threads each parallel op waits for, and spins on, a descheduled partner thread).
Memory, two numbers: the step peak = the highest resident set size during steps 2..N (VmHWM, reset after step 1)
minus the resident size then, i.e. what a training step adds on top of the model, its gradients' and optimizer's
persistent state (as benchmarks/model_step.py and dpo_vs_trl.py measure it); and the process's peak RSS
(VmHWM from its start: imports, the tokenizer, model, optimizer state, steps and the final save together; not
ru_maxrss, which Linux makes at least the driver's RSS in a spawned worker). torch takes about 220 MB on both
sides; loading the Qwen2 tokenizer about 280 MB through transformers (TRL's side), of which 180 MB is the heap its
tokenizer.json parse freed and glibc kept, which data.tokenizer hands back (ours: about 100 MB).
Prints the CPU vector path and the load average. Keep it to a few steps: it shares the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = "RESULT "
sys.path.insert(0, str(REPO))
from benchmarks.machine import add_threads_arg, cpu_path, load_average, machine_line, worker_env  # noqa: E402


class StepMeter:
    """Resets the resident-set high-water mark after the first optimizer step; reports the step peak above the
    resident size then, and CPU seconds per step, over the steps after the first."""

    def __init__(self):
        self.base = None

    def after_step(self, step: int, last: int) -> None:
        from benchmarks.model_step import rss_kb, start_peak

        if step == 1:
            self.base = start_peak()
            self.cpu0, self.n = time.process_time(), last - 1
        elif step == last and self.base is not None:
            self.cpu = (time.process_time() - self.cpu0) / max(self.n, 1)
            self.peak = (rss_kb("VmHWM") - self.base) / 1024

    def result(self) -> dict:
        return {"step_peak_mib": self.peak, "cpu_s": self.cpu} if self.base is not None else {}


def prepare(out: Path, hidden: int, n_records: int) -> None:
    """The shared tiny model folder (transformers Qwen2ForCausalLM + Qwen2 tokenizer) and the record subsets."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from data.tokenizer import qwen2_tokenizer

    tok = qwen2_tokenizer()
    cfg = Qwen2Config(vocab_size=151936, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    for name in ("sft", "rm_train"):
        lines = (REPO / "data" / "demo" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n_records]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def tokens_per_s(step_tokens: list[int], step_seconds: list[float]) -> float:
    """Median per-step throughput over the steps after the first (one-time costs: allocator warm-up, lazy init).
    The median, not the total, because the machine is shared and single steps get stalled by other jobs."""
    import statistics

    return statistics.median(t / s for t, s in zip(step_tokens[1:], step_seconds[1:]))


def run_ours(kind: str, out: Path, steps: int, batch: int, seq_len: int) -> dict:
    from common import metrics
    from common.config import build_config
    from common.metrics import read_jsonl

    meter, log = StepMeter(), metrics.MetricsLogger.log

    def metered_log(self, step, values):  # the trainers log every step right after the optimizer step
        log(self, step, values)
        if "loss" in values:
            meter.after_step(step, steps)
    metrics.MetricsLogger.log = metered_log

    common = dict(tokenizer=str(out / "model"), seq_len=seq_len, micro_batch_size_per_rank=batch,
                  grad_accum_steps=1, max_steps=steps, precision="fp32", resume=False, overwrite_output_dir=True,
                  lr=1e-5, output_dir=str(out / f"ours_{kind}"), report_to="none")  # as TRL's report_to=[]
    if kind == "sft":
        from align.sft import SFTConfig, train

        c = build_config(SFTConfig, dict(common, model_path=str(out / "model"), train_files=[str(out / "sft.jsonl")],
                                         packing=False, warmup_steps=0))
    else:
        from reward.train import RewardConfig, train

        c = build_config(RewardConfig, dict(common, model_path=str(out / "model"), eval_files=[],
                                            norm_files=[str(out / "rm_train.jsonl")], norm_max_pairs=batch,
                                            train_files=[str(out / "rm_train.jsonl")]))
    train(c)
    rows = [r for r in read_jsonl(Path(c.output_dir) / "metrics.jsonl") if "loss" in r]
    return {"tokens": [r["tokens_per_s"] * r["step_s"] for r in rows], "seconds": [r["step_s"] for r in rows],
            "loss": [r["loss"] for r in rows]} | meter.result()


def run_trl(kind: str, out: Path, steps: int, batch: int, seq_len: int) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)

    tok = AutoTokenizer.from_pretrained(out / "model")
    record: dict = {"tokens": [], "seconds": [], "loss": []}
    meter = StepMeter()

    class StepTimer(TrainerCallback):  # wall time of each optimizer step (forward, backward, clip, AdamW)
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            record["seconds"].append(time.perf_counter() - self.t0)
            meter.after_step(state.global_step, steps)

    def counting(trainer_cls):
        class Counting(trainer_cls):  # count the non-pad tokens each step feeds the model
            def training_step(self, model, inputs, *a, **k):
                mask = inputs.get("attention_mask")
                record["tokens"].append(int(mask.sum()) if mask is not None else
                                        int((inputs["input_ids"] != tok.pad_token_id).sum()))
                loss = super().training_step(model, inputs, *a, **k)
                record["loss"].append(float(loss))
                return loss
        return Counting

    common = dict(output_dir=str(out / f"trl_{kind}"), per_device_train_batch_size=batch, max_steps=steps,
                  learning_rate=1e-5, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                  max_length=seq_len, dataloader_num_workers=0, seed=0, bf16=False)
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        ds = load_dataset("json", data_files=str(out / "sft.jsonl"), split="train")
        model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
        trainer = counting(SFTTrainer)(model=model, args=SFTConfig(**common, packing=False), train_dataset=ds,
                                       processing_class=tok, callbacks=[StepTimer()])
    else:
        from trl import RewardConfig, RewardTrainer

        ds = load_dataset("json", data_files=str(out / "rm_train.jsonl"), split="train")
        model = AutoModelForSequenceClassification.from_pretrained(out / "model", num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        trainer = counting(RewardTrainer)(model=model, args=RewardConfig(**common), train_dataset=ds,
                                          processing_class=tok, callbacks=[StepTimer()])
    trainer.train()
    return record | meter.result()


def worker(name: str, out: Path, steps: int, batch: int, seq_len: int) -> None:
    who, kind = name.split("_", 1)
    rec = (run_ours if who == "ours" else run_trl)(kind, out, steps, batch, seq_len)
    from benchmarks.model_step import process_peak_mib

    rec["peak_rss_mb"] = process_peak_mib() * 1.048576  # MB
    rec["tokens_per_s"] = tokens_per_s(rec["tokens"], rec["seconds"])
    rec["cpu_path"] = cpu_path()
    import torch

    rec["threads"] = torch.get_num_threads()
    print(RESULT + json.dumps(rec), flush=True)


def spawn(name: str, args) -> dict:
    env = {**worker_env(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, __file__, "--worker", name, "--out", args.out, "--steps", str(args.steps),
           "--batch", str(args.batch), "--seq_len", str(args.seq_len)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def median_run(runs: list[dict]) -> dict:
    """One row from repeated runs of a trainer: the median of each number (losses of the first run)."""
    import statistics

    keys = ("tokens_per_s", "peak_rss_mb", "step_peak_mib", "cpu_s")
    return runs[0] | {k: statistics.median(r[k] for r in runs) for k in keys if all(k in r for r in runs)}


def table(results: dict) -> str:
    lines = ["| task | trainer | tokens/s | CPU s / step | step peak (MiB) | process peak RSS (MB) | "
             "first / last loss |", "|---|---|---|---|---|---|---|"]
    for task in [t for t in ("sft", "rm") if f"ours_{t}" in results]:
        for who in ("ours", "trl"):
            r = results[f"{who}_{task}"]
            lines.append(f"| {task} | {'ours' if who == 'ours' else 'TRL 1.16'} | {r['tokens_per_s']:.0f} | "
                         f"{r['cpu_s']:.3f} | {r['step_peak_mib']:.0f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['loss'][0]:.3f} / {r['loss'][-1]:.3f} |")
        o, t = results[f"ours_{task}"], results[f"trl_{task}"]
        lines.append(f"| {task} | **ours / TRL** | **{o['tokens_per_s'] / t['tokens_per_s']:.2f}x** | "
                     f"{o['cpu_s'] / t['cpu_s']:.2f}x | **{o['step_peak_mib'] / t['step_peak_mib']:.2f}x** | "
                     f"{o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per trainer (the first is not timed)")
    p.add_argument("--batch", type=int, default=4, help="sequences (SFT) or pairs (RM) per optimizer step")
    p.add_argument("--seq_len", type=int, default=512, help="max tokens per sequence")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the tiny 2-layer Qwen2")
    p.add_argument("--out", default="runs/bench_trl", help="work folder; results.json is written here")
    p.add_argument("--tasks", default="sft,rm", help="comma-separated: sft, rm")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each trainer; medians are reported")
    add_threads_arg(p)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    if args.worker:
        return worker(args.worker, out, args.steps, args.batch, args.seq_len)
    print(machine_line(args.threads), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    prepare(out, args.hidden, n_records=args.steps * args.batch)
    runs: dict[str, list] = {}
    tasks = args.tasks.split(",")
    for r in range(args.repeats):
        for name in [f"{who}_{t}" for t in tasks for who in ("ours", "trl")]:
            res = spawn(name, args)
            runs.setdefault(name, []).append(res)
            print(f"[bench] run {r + 1}/{args.repeats} {name}: {res['tokens_per_s']:.0f} tokens/s, "
                  f"{res['cpu_s']:.3f} CPU s/step, step peak {res['step_peak_mib']:.0f} MiB; load average "
                  f"{load_average()}", flush=True)
    results = {k: median_run(v) for k, v in runs.items()}
    from common.atomic import atomic_write_json

    atomic_write_json(out / "results.json", {"args": vars(args), "results": results, "runs": runs})
    print(table(results))
    print(f"[bench] {args.steps} steps x batch {args.batch}, seq_len {args.seq_len}, vocab 151,936, hidden "
          f"{args.hidden}; CPU vector path {results[next(iter(results))]['cpu_path']}, "
          f"{results[next(iter(results))]['threads']} threads; tokens/s = median over steps "
          f"2..N, medians of {args.repeats} alternating run(s); load average after: {load_average()}; details in "
          f"{out / 'results.json'}")


if __name__ == "__main__":
    main()
