"""DPO training steps: align/dpo.py's step vs TRL 1.16's DPOTrainer, same model, data and batches, in one run.

    python benchmarks/dpo_vs_trl.py [--hidden 128 --layers 2 --pairs 4 --warmup 2 --steps 6 --repeats 1]
    ATEN_CPU_CAPABILITY=default python benchmarks/dpo_vs_trl.py      # torch's portable kernels

Model: a transformers Qwen2ForCausalLM with the real Qwen2 vocabulary (151,936), random weights (seed 0), saved
once to a folder that both sides load. Data: the first (warmup + steps) x pairs comparisons of
data/demo/rm_train.jsonl, tokenised with the real Qwen2 tokenizer; step k trains on pairs [k*pairs, (k+1)*pairs)
on both sides (TRL with a sequential sampler), and the run checks that TRL's token ids equal ours and that both
report the same chosen log-prob at step 1. Both in fp32 (TRL's default bf16 autocast off), beta 0.1, AdamW with
gradient clipping 1.0 (TRL: its default fused AdamW; ours: common.optim.build_adamw, as align/dpo.py).

Each configuration runs in its own subprocess, one after the other, the four in turn `--repeats` times (medians),
so a machine whose speed drifts during the run (other jobs, a cloud VM's neighbours) does not favour one position
in the order. A step is a whole optimizer step as the trainer runs it (collate, forward, loss, backward, clip,
AdamW). On a shared machine the wall-clock steps/s move with the other load; the CPU seconds per step (all threads
of the process) and the page faults per step do not depend on it (`--threads 1` for steadier wall times too).
Prints the CPU vector path and the load average. Peak memory: the highest resident
set size during the timed steps (VmHWM, reset after warm-up, as benchmarks/model_step.py) minus the resident size
just before them; the absolute peak RSS of the process is shown too (it includes TRL's second model copy for the
reference).
Reference handling, the thing the two defaults differ in, is shown both ways:
  TRL default: a reference-model forward every step  |  TRL precompute_ref_log_probs=True: computed before training
  ours default ('cached'): computed before training  |  ours 'online': a reference forward every step
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import add_threads_arg, cpu_path, load_average, machine_line, worker_env  # noqa: E402
from benchmarks.model_step import V, rss_kb, start_peak  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "demo" / "rm_train.jsonl"
IMPLS = {"trl": "TRL DPOTrainer (reference forward each step, its default)",
         "trl_pre": "TRL DPOTrainer, precompute_ref_log_probs=True",
         "ours_online": "align/dpo.py, reference='online'",
         "ours": "align/dpo.py, reference='cached' (default)"}


def load_pairs(args, tokenizer):
    """Our tokenised pairs and the same records as ChatML text for TRL (it tokenises them itself)."""
    from data.chatml import IM_END, render
    from data.datasets import build_preference_examples, load_records

    records = load_records(str(DATA), kind="preference")[0][:args.pairs * (args.warmup + args.steps)]
    pairs, report = build_preference_examples(records, tokenizer, max_len=1024)
    if report.kept != len(records):
        raise SystemExit(f"{DATA}: {report.summary()}; the benchmark needs every record kept")
    text = [{"prompt": render(r["prompt"], add_generation_prompt=True),
             "chosen": r["chosen"][0]["content"] + IM_END, "rejected": r["rejected"][0]["content"] + IM_END}
            for r in records]
    return pairs, text


class Meter:
    """Call start() after the warm-up steps and stop() after the timed ones."""

    def start(self):
        gc.collect()
        self.base = start_peak()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def stop(self, steps: int) -> dict:
        dt = (time.perf_counter() - self.t0) / steps
        peak = rss_kb("VmHWM")
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults) / steps
        return {"step_s": dt, "cpu_s": (time.process_time() - self.c0) / steps,
                "peak_mib": (peak - self.base) / 1024, "rss_mib": peak / 1024, "page_faults": faults}


def run_trl(args, model_dir: Path, pairs, text) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from data.tokenizer import qwen2_tokenizer

    meter, out, first = Meter(), {}, {}

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                meter.start()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == args.warmup + args.steps:
                out.update(meter.stop(args.steps))

        def on_log(self, a, state, control, logs=None, **kw):
            if state.global_step == 1 and logs and "logps/chosen" in logs:
                first["chosen_logp"] = logs["logps/chosen"]

    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, beta=0.1, learning_rate=1e-6,
                    per_device_train_batch_size=args.pairs, max_steps=args.warmup + args.steps, max_length=None,
                    train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to=[],
                    disable_tqdm=True, precompute_ref_log_probs=args.impl == "trl_pre", seed=0)
    trainer = DPOTrainer(model=str(model_dir), args=cfg, train_dataset=Dataset.from_list(text),
                         processing_class=qwen2_tokenizer(), callbacks=[Timer()])
    for i in (0, len(pairs) - 1):  # same tokenisation as ours
        ex = trainer.train_dataset[i]
        assert [ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")] == \
            [pairs[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")], f"pair {i} tokenised differently"
    trainer.train()
    return out | first


def run_ours(args, model_dir: Path, pairs) -> dict:
    from align.dpo import DPOConfig, SequenceLogprobs, cache_reference, micro_step, pair_batch, reference_mode
    from common.config import build_config
    from common.loop import make_accelerator
    from common.optim import build_adamw
    from model.checkpoint import load_causal_lm

    c = build_config(DPOConfig, {"model_path": str(model_dir), "train_files": [str(DATA)], "beta": 0.1,
                                 "reference": "cached" if args.impl == "ours" else "online", "lr": 1e-6,
                                 "weight_decay": 0.0, "warmup_steps": 0, "micro_batch_size_per_rank": args.pairs,
                                 "grad_accum_steps": 1, "precision": "fp32"})
    acc = make_accelerator(c.precision, 1, args.pairs)
    model = SequenceLogprobs(load_causal_lm(model_dir).train(), c.chunk_size)
    optimizer = build_adamw(model, c.lr, c.betas, c.eps, c.weight_decay)
    pad_id = 151643
    ref, cache = None, None
    if c.reference == "cached":
        cache = cache_reference(acc, model, None, pairs, pad_id, c.ref_batch_size)  # before training, as dpo.train
    else:
        ref = SequenceLogprobs(load_causal_lm(model_dir).requires_grad_(False).eval(), c.chunk_size)

    def ref_fn(micro, batch):
        if cache is not None:
            return torch.cat([cache[micro, 0], cache[micro, 1]])
        with reference_mode(model, ref) as net:
            return net(**batch)

    meter, out = Meter(), {}
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            meter.start()
        micro = list(range(step * args.pairs, (step + 1) * args.pairs))
        batch = pair_batch([pairs[i] for i in micro], pad_id)
        n_tok = sum(len(pairs[i]["chosen_ids"]) for i in micro)
        sums = micro_step(c, acc, model, lambda b, m=micro: ref_fn(m, b), batch, n_tok, scale=1.0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            out["chosen_logp"] = -float(sums[1]) / args.pairs
    return out | meter.stop(args.steps)


def worker(args):
    from data.tokenizer import qwen2_tokenizer

    pairs, text = load_pairs(args, qwen2_tokenizer())
    model_dir = Path(args.model_dir)
    r = run_trl(args, model_dir, pairs, text) if args.impl.startswith("trl") else run_ours(args, model_dir, pairs)
    print(json.dumps({"impl": args.impl, **r, "cpu_path": cpu_path(), "threads": torch.get_num_threads()}))


def save_model(args, folder: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=V, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=False,
                      eos_token_id=151645, pad_token_id=151643)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=4, help="preference pairs per step (batch)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each configuration, in turn; medians reported")
    add_threads_arg(ap)
    ap.add_argument("--impl", choices=sorted(IMPLS), help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--model_dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:
        return worker(args)
    print(machine_line(args.threads), flush=True)
    runs = {impl: [] for impl in IMPLS}
    with tempfile.TemporaryDirectory() as d:
        save_model(args, Path(d))
        for r in range(args.repeats):
            for impl in IMPLS:
                cmd = [sys.executable, __file__, *sys.argv[1:], "--impl", impl, "--model_dir", d]
                t0 = time.perf_counter()
                res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                     env={**worker_env(args.threads), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
                if res.returncode:
                    sys.exit(f"{impl} failed:\n{res.stderr[-4000:]}")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                runs[impl].append(row)
                print(f"[bench] run {r + 1}/{args.repeats} {impl}: {1 / row['step_s']:.2f} steps/s, "
                      f"{row['cpu_s']:.2f} CPU s/step, {row['page_faults']:.0f} page faults/step "
                      f"({time.perf_counter() - t0:.0f} s); load average {load_average()}", file=sys.stderr,
                      flush=True)
    rows = {impl: median_row(v) for impl, v in runs.items()}
    logps = [r["chosen_logp"] for r in rows.values()]
    assert max(logps) - min(logps) < 1e-4 * abs(logps[0]), f"step-1 chosen log-probs differ: {logps}"
    report(args, rows)


def median_row(rows: list[dict]) -> dict:
    import statistics

    keys = ("step_s", "cpu_s", "peak_mib", "rss_mib", "page_faults")
    return rows[0] | {k: statistics.median(r[k] for r in rows) for k in keys}


def report(args, rows):
    r0 = rows["ours"]
    print(f"config: Qwen2 hidden {args.hidden}, layers {args.layers}, vocab {V} (untied), {args.pairs} pairs per "
          f"step from {DATA.relative_to(REPO)}, fp32, {r0['threads']} threads, CPU vector path {r0['cpu_path']}; "
          f"{args.steps} timed steps after {args.warmup} warm-up, medians of {args.repeats} run(s) each; step-1 mean "
          f"chosen log-prob {r0['chosen_logp']:.4f} on every side; load average after: {load_average()}")
    print("| trainer | steps/s | CPU s / step | page faults / step | step peak memory (MiB above pre-step RSS) | "
          "peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for impl, name in IMPLS.items():
        r = rows[impl]
        print(f"| {name} | {1 / r['step_s']:.2f} | {r['cpu_s']:.2f} | {r['page_faults']:.0f} | {r['peak_mib']:.0f} | "
              f"{r['rss_mib']:.0f} |")
    for ours, theirs, what in [("ours", "trl", "defaults"), ("ours", "trl_pre", "both cached"),
                               ("ours_online", "trl", "both online")]:
        o, t = rows[ours], rows[theirs]
        print(f"| **ratio ours / TRL, {what}** | **{t['step_s'] / o['step_s']:.2f}x** | "
              f"**{o['cpu_s'] / t['cpu_s']:.2f}x** | {o['page_faults'] / t['page_faults']:.2f}x | "
              f"**{o['peak_mib'] / t['peak_mib']:.2f}x** | **{o['rss_mib'] / t['rss_mib']:.2f}x** |")
    o, n = rows["ours"], rows["ours_online"]
    print(f"ours cached / online: {n['step_s'] / o['step_s']:.2f}x steps/s, {o['cpu_s'] / n['cpu_s']:.2f}x CPU s "
          f"per step (the cached reference skips the reference forward: it must be the cheaper one)")


if __name__ == "__main__":
    main()
