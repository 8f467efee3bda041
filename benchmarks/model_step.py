"""One training step (forward + next-token loss + backward): the custom model vs transformers' Qwen2ForCausalLM.

    python benchmarks/model_step.py [--hidden 256 --layers 4 --batch 4 --seq 256 --steps 5 --repeats 3 --chunk 512]
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/model_step.py      # the AVX2 path on an AVX-512 machine
    ATEN_CPU_CAPABILITY=default python benchmarks/model_step.py   # torch's portable kernels

Same weights, same tokens, vocab 151,936. --chunk: rows of logits per chunk in our log-prob kernel (default: the
library's, model.logprobs.auto_chunk: 2 x hidden within [256, 512], so 512 at hidden 256); each chunk holds
chunk x V fp32 logits, so it trades memory for fewer, larger matmuls. Each implementation runs in its own
subprocess, so their peak memories do not mix: peak = the highest resident set size during the timed steps (VmHWM, reset after warm-up) minus the
resident size just before them, i.e. the activation / logits memory of the step itself. The subprocesses alternate
(transformers, ours, transformers, ours, ...) `--repeats` times and the table gives medians, so a shared machine's
load changing during the run hits both sides alike; the load average is printed before and after. Also measures
the machine's fp32 matmul FLOP/s in the same run and reports model FLOP utilisation, and prints the CPU vector
path (AVX-512, AVX2, or DEFAULT under ATEN_CPU_CAPABILITY=default). A Markdown table with the ratios (ours /
transformers) for README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import add_threads_arg, cpu_path, load_average, machine_line, worker_env  # noqa: E402

V = 151936


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


_PEAK_BEFORE_RESETS = [0]  # KiB: the highest VmHWM that reset_peak cleared


def reset_peak():
    _PEAK_BEFORE_RESETS[0] = max(_PEAK_BEFORE_RESETS[0], rss_kb("VmHWM"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux)


def process_peak_mib() -> float:
    """This process's own peak resident set size (MiB) from its start: VmHWM, across reset_peak calls.
    Not getrusage's ru_maxrss: Linux carries the parent's peak across fork + exec into the child's ru_maxrss, so a
    worker spawned by a benchmark driver holding 700 MB (torch, the tokenizer, the model it just wrote) would
    report at least 700 MB."""
    return max(_PEAK_BEFORE_RESETS[0], rss_kb("VmHWM")) / 1024


def start_peak() -> int:
    """Begin a step-peak measurement; returns the base RSS (KiB). Freed memory the allocator still holds (glibc
    keeps freed heap pages resident) is handed back first, so the base is the live memory and the later peak minus
    the base is what the steps allocate, whoever's allocator kept what from the warm-up."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the base may include freed memory
        pass
    base = rss_kb("VmRSS")
    reset_peak()
    return base


def build(args):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=V, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=4096,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(cfg)
    if args.impl == "hf":
        hf.config._attn_implementation = "sdpa"
        return hf.to(DTYPES[args.dtype]).train()
    import tempfile
    from model.checkpoint import load_causal_lm
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        return load_causal_lm(d, dtype=DTYPES[args.dtype]).train()


def step_fn(args, model):
    from model.logprobs import auto_chunk, weighted_logprob_sum
    args.chunk = args.chunk or auto_chunk(args.hidden)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (args.batch, args.seq), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((args.batch, 1), -100)], 1)
    coef = -(labels != -100).float() / (labels != -100).sum()  # token-mean NLL, as transformers' loss

    def ours():
        hidden = model.get_decoder()(ids)  # (B, T, H)
        loss = weighted_logprob_sum(hidden, model.get_output_embeddings().weight, labels, coef, chunk_size=args.chunk)
        loss.backward()
        return loss.item()

    def hf():
        loss = model(input_ids=ids, labels=ids).loss  # transformers shifts internally
        loss.backward()
        return loss.item()

    return ours if args.impl == "ours" else hf


def model_flops(args) -> float:
    """6 x tokens x matmul parameters (lm_head included, embedding lookup not) + causal attention scores."""
    H, L, T, tokens = args.hidden, args.layers, args.seq, args.batch * args.seq
    kv = max(1, H // 256) * 64
    per_layer = H * H * 2 + H * kv * 2 + 3 * H * (H * 11 // 4)
    attn = 6 * L * H * T * tokens  # QK^T and AV, forward 2 x 2 x H x T/2 per token, times 3 for backward
    return 6 * tokens * (L * per_layer + H * V) + attn


def worker(args):
    torch.manual_seed(0)
    model = build(args)
    step = step_fn(args, model)
    loss0 = step()  # warm-up (allocator, kernels)
    model.zero_grad(set_to_none=False)
    base = start_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
        model.zero_grad(set_to_none=False)
    dt = (time.perf_counter() - t0) / args.steps
    cpu_s = (time.process_time() - c0) / args.steps  # all threads; moves less with other jobs' load than wall time
    peak = rss_kb("VmHWM") - base
    print(json.dumps({"impl": args.impl, "loss": loss0, "step_s": dt, "tokens_per_s": args.batch * args.seq / dt,
                      "cpu_s": cpu_s,
                      "peak_mib": peak / 1024, "tflops": model_flops(args) / dt / 1e12, "cpu_path": cpu_path(),
                      "threads": torch.get_num_threads()}))


def matmul_tflops(n=2048, reps=5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--chunk", type=int, default=None, help="ours: rows of logits per chunk (default: the library's)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each side; medians are reported")
    add_threads_arg(ap)
    ap.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args()
    if args.impl:
        return worker(args)
    if args.threads:
        torch.set_num_threads(args.threads)  # the matmul peak below, and the workers through OMP_NUM_THREADS
    print(machine_line(args.threads), flush=True)
    peak = matmul_tflops()
    runs = {"hf": [], "ours": []}
    for r in range(args.repeats):
        for impl in ["hf", "ours"]:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--impl", impl]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**worker_env(args.threads),
                                                                            "HF_HUB_OFFLINE": "1"})
            if out.returncode:
                sys.exit(f"{impl} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            runs[impl].append(row)
            print(f"[bench] run {r + 1}/{args.repeats} {impl}: {row['tokens_per_s']:.0f} tokens/s, "
                  f"{row['peak_mib']:.0f} MiB; load average {load_average()}", file=sys.stderr, flush=True)
    from model.logprobs import auto_chunk

    hf, ours = (summary(runs[k]) for k in ("hf", "ours"))
    assert abs(hf["loss"] - ours["loss"]) < 1e-3 * max(1.0, abs(hf["loss"])), (hf["loss"], ours["loss"])
    print(f"config: hidden {args.hidden}, layers {args.layers}, vocab {V}, batch {args.batch} x seq {args.seq}, "
          f"log-prob chunk {args.chunk or auto_chunk(args.hidden)} rows, {args.dtype}, {ours['threads']} threads; "
          f"CPU vector path {ours['cpu_path']}; fp32 matmul peak "
          f"{peak:.3f} TFLOP/s; medians of {args.repeats} alternating runs; load average after: {load_average()}")
    print("| implementation | tokens/s | CPU s / step | step peak memory (MiB) | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for name, r in [("transformers Qwen2ForCausalLM", hf), ("custom model + chunked log-probs", ours)]:
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['cpu_s']:.2f} | {r['peak_mib']:.0f} | {r['tflops']:.3f} | "
              f"{r['tflops'] / peak:.0%} |")
    ratios = [o["tokens_per_s"] / h["tokens_per_s"] for o, h in zip(runs["ours"], runs["hf"])]
    print(f"| **ratio ours / transformers** | **{ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x** | "
          f"{ours['cpu_s'] / hf['cpu_s']:.2f}x | **{ours['peak_mib'] / hf['peak_mib']:.2f}x** | | |")
    print(f"per-run tokens/s ratios (ours / the transformers run just before): "
          f"{', '.join(f'{x:.2f}' for x in ratios)}")


def summary(rows: list[dict]) -> dict:
    """Median of each number over the runs of one side (the loss of the first run: all runs are identical)."""
    return {k: statistics.median(r[k] for r in rows) for k in ("step_s", "tokens_per_s", "cpu_s", "peak_mib", "tflops")} | \
        {k: rows[0][k] for k in ("loss", "cpu_path", "threads")}


if __name__ == "__main__":
    main()
