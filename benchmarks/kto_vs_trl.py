"""KTO training steps: align/kto.py's step vs TRL 1.16's KTOTrainer, same model, data and batches, in one run.

    python benchmarks/kto_vs_trl.py [--hidden 128 --layers 2 --rows 8 --warmup 2 --steps 6]

Model: a transformers Qwen2ForCausalLM with the real Qwen2 vocabulary (151,936), random weights (seed 0), saved
once to a folder that both sides load. Data: the first (warmup + steps) x rows thumbs ratings of
data/demo/kto_train.jsonl (data.feedback's unpaired format), tokenised with the real Qwen2 tokenizer; step k trains
on rows [k*rows, (k+1)*rows) on both sides (TRL with its sequential sampler), each prompt also paired with the
previous row's completion for the KL reference point (TRL's shifted completions; ours the same within the mini
batch). The run checks that TRL's token ids and KL completions equal ours and that both report the same mean
desirable log-prob at step 1. Both in fp32 (TRL's default bf16 autocast off), beta 0.1, AdamW with gradient
clipping 1.0 (TRL: its default fused AdamW; ours: common.optim.build_adamw, as align/kto.py).

Each configuration runs in its own subprocess, one after the other. A step is a whole optimizer step as the trainer
runs it (collate, the KL pass, forward, loss, backward, clip, AdamW). On a shared machine the wall-clock steps/s
move with the other load; the CPU seconds per step (all threads of the process) move less. Peak memory: the highest
resident set size during the timed steps (VmHWM, reset after warm-up, as benchmarks/model_step.py) minus the
resident size just before them; the absolute peak RSS of the process is shown too (it includes TRL's second model
copy for the reference). Reference handling and TRL's default gradient checkpointing are shown both ways:
  TRL default: a reference-model forward every step, gradient checkpointing on (its KTOConfig default)
  TRL without gradient checkpointing (as ours)  |  TRL precompute_ref_log_probs=True: computed before training
  ours default ('cached'): computed before training  |  ours 'online': a reference forward every step
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.model_step import V, rss_kb, start_peak  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "demo" / "kto_train.jsonl"
IMPLS = {"trl": "TRL KTOTrainer (reference forward each step, gradient checkpointing: its defaults)",
         "trl_nogc": "TRL KTOTrainer, gradient_checkpointing=False",
         "trl_pre": "TRL KTOTrainer, precompute_ref_log_probs=True",
         "ours_online": "align/kto.py, reference='online'",
         "ours": "align/kto.py, reference='cached' (default)"}


def load_rows(args, tokenizer):
    """Our tokenised rows and the same records as ChatML text for TRL (it tokenises them itself)."""
    from data.chatml import IM_END, render
    from data.datasets import build_unpaired_examples, load_records

    records = load_records(str(DATA), kind="unpaired")[0][:args.rows * (args.warmup + args.steps)]
    rows, report = build_unpaired_examples(records, tokenizer, max_len=1024)
    if report.kept != len(records):
        raise SystemExit(f"{DATA}: {report.summary()}; the benchmark needs every record kept")
    text = [{"prompt": render(r["prompt"], add_generation_prompt=True),
             "completion": r["completion"][0]["content"] + IM_END, "label": r["label"]} for r in records]
    return rows, text


class Meter:
    """Call start() after the warm-up steps and stop() after the timed ones."""

    def start(self):
        gc.collect()
        self.base = start_peak()
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def stop(self, steps: int) -> dict:
        dt = (time.perf_counter() - self.t0) / steps
        peak = rss_kb("VmHWM")
        return {"step_s": dt, "cpu_s": (time.process_time() - self.c0) / steps,
                "peak_mib": (peak - self.base) / 1024, "rss_mib": peak / 1024}


def run_trl(args, model_dir: Path, rows, text) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import KTOConfig, KTOTrainer

    from align.kto import kl_donors
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
                first["desirable_logp"] = logs["logps/chosen"]

    cfg = KTOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, beta=0.1, learning_rate=5e-6,
                    per_device_train_batch_size=args.rows, max_steps=args.warmup + args.steps, max_length=None,
                    logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                    precompute_ref_log_probs=args.impl == "trl_pre", seed=0,
                    gradient_checkpointing=args.impl != "trl_nogc")
    trainer = KTOTrainer(model=str(model_dir), args=cfg, train_dataset=Dataset.from_list(text),
                         processing_class=qwen2_tokenizer(), callbacks=[Timer()])
    donors = kl_donors(list(range(args.rows)))
    for i in (0, args.rows - 1, len(rows) - 1):  # same tokenisation and the same mismatched pairs as ours
        ex, mine = trainer.train_dataset[i], rows[i]
        assert [ex[k] for k in ("prompt_ids", "completion_ids", "label")] == \
            [mine[k] for k in ("prompt_ids", "completion_ids", "label")], f"row {i} tokenised differently"
        donor = i - i % args.rows + donors[i % args.rows]
        assert ex["KL_completion_ids"] == rows[donor]["completion_ids"], f"row {i}: another KL completion"
    trainer.train()
    return out | first


def run_ours(args, model_dir: Path, rows) -> dict:
    import align.kto as kto
    from common.config import build_config
    from common.loop import make_accelerator
    from common.optim import build_adamw
    from model.checkpoint import load_causal_lm

    c = build_config(kto.KTOConfig, {"model_path": str(model_dir), "train_files": [str(DATA)], "beta": 0.1,
                                     "reference": "cached" if args.impl == "ours" else "online", "lr": 5e-6,
                                     "weight_decay": 0.0, "warmup_steps": 0, "micro_batch_size_per_rank": args.rows,
                                     "grad_accum_steps": 1, "precision": "fp32"})
    acc = make_accelerator(c.precision, 1, args.rows)
    model = kto.SequenceLogprobs(load_causal_lm(model_dir).train(), c.chunk_size)
    optimizer = build_adamw(model, c.lr, c.betas, c.eps, c.weight_decay)
    pad_id, total = 151643, args.warmup + args.steps
    plan = lambda s: list(range(s * args.rows, (s + 1) * args.rows))  # noqa: E731  TRL's sequential batches
    # as kto.train: the cached tables before training, or a frozen copy of the start model for 'online'
    _, ref_fn = kto.setup_reference(c, acc, model, rows, plan, total, pad_id, None, False)

    meter, out = Meter(), {}
    for step in range(total):
        if step == args.warmup:
            meter.start()
        idx = plan(step)
        z0, _ = kto.reference_point(acc, model, ref_fn, rows, step, [idx], kto.kl_donors(idx), pad_id)
        sums = kto.micro_step(c, acc, model, ref_fn, step, idx, rows, z0, pad_id)
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            out["desirable_logp"] = float(sums[4] / sums[1])
    return out | meter.stop(args.steps)


def worker(args):
    from data.tokenizer import qwen2_tokenizer

    rows, text = load_rows(args, qwen2_tokenizer())
    model_dir = Path(args.model_dir)
    r = run_trl(args, model_dir, rows, text) if args.impl.startswith("trl") else run_ours(args, model_dir, rows)
    print(json.dumps({"impl": args.impl, **r}))


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
    ap.add_argument("--rows", type=int, default=8, help="rated replies per step (batch); >= 2 for the KL pairs")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--impl", choices=sorted(IMPLS), help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--model_dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rows < 2:
        ap.error("--rows must be >= 2: TRL's KL pairs need two rows per batch")
    if args.impl:
        return worker(args)
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        save_model(args, Path(d))
        for impl in IMPLS:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--impl", impl, "--model_dir", d]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
            if res.returncode:
                sys.exit(f"{impl} failed:\n{res.stderr[-4000:]}")
            rows[impl] = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"[bench] {impl}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    logps = [r["desirable_logp"] for r in rows.values()]
    assert max(logps) - min(logps) < 1e-4 * abs(logps[0]), f"step-1 desirable log-probs differ: {logps}"
    report(args, rows)


def report(args, rows):
    print(f"config: Qwen2 hidden {args.hidden}, layers {args.layers}, vocab {V} (untied), {args.rows} rated replies "
          f"per step (+ {args.rows} KL pairs) from {DATA.relative_to(REPO)}, fp32, {torch.get_num_threads()} "
          f"threads; {args.steps} timed steps after {args.warmup} warm-up; step-1 mean desirable log-prob "
          f"{rows['ours']['desirable_logp']:.4f} on every side")
    print("| trainer | steps/s | CPU s / step | step peak memory (MiB above pre-step RSS) | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for impl, name in IMPLS.items():
        r = rows[impl]
        print(f"| {name} | {1 / r['step_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_mib']:.0f} | {r['rss_mib']:.0f} |")
    for ours, theirs, what in [("ours", "trl", "defaults"), ("ours", "trl_pre", "both cached"),
                               ("ours_online", "trl_nogc", "both online, no checkpointing")]:
        o, t = rows[ours], rows[theirs]
        print(f"| **ratio ours / TRL, {what}** | **{t['step_s'] / o['step_s']:.2f}x** | "
              f"**{o['cpu_s'] / t['cpu_s']:.2f}x** | **{o['peak_mib'] / t['peak_mib']:.2f}x** | "
              f"**{o['rss_mib'] / t['rss_mib']:.2f}x** |")


if __name__ == "__main__":
    main()
