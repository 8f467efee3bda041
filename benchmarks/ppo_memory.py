"""Per-rank memory of one trained PPO model (weights + gradients + AdamW state) on 2 CPU ranks: plain data parallel
(configs/accelerate/multi_cpu.yaml) vs DeepSpeed ZeRO-2 and ZeRO-3 (configs/accelerate/zero2.yaml, zero3.yaml,
num_processes set to 2), the way align/ppo.py prepares its policy (align.zero.ModelCall, AdamW, fp32).

    python benchmarks/ppo_memory.py [--hidden 768 --layers 8 --vocab 32000]

Each launch starts 2 ranks; every rank measures its resident memory (RSS, /proc/self/statm) after imports and the
accelerator (baseline), then builds the model, prepares it, runs 2 optimizer steps on a 1 x 32-token batch
(activations negligible) and measures again; the difference is what the model and its optimizer hold on that rank.
It also counts the bytes of the tensors the rank holds: its weights (ZeRO-3: its shard), and the optimizer's state
(ZeRO: its partition of the fp32 master weights and both Adam moments). Prints a table and the per-parameter bytes,
and what they give for a 7B model on 8 ranks. Not a timing benchmark: run it on an idle machine for stable RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def worker(a) -> None:
    import gc

    import torch

    from align.zero import ModelCall
    from common.loop import make_accelerator
    from model.checkpoint import config_from_hf
    from model.logprobs import causal_lm_logprobs
    from model.qwen import QwenForCausalLM

    torch.manual_seed(0)
    acc = make_accelerator("fp32", 1, 1)
    if acc.distributed_type.value == "DEEPSPEED":
        acc.state.deepspeed_plugin.deepspeed_config["managed_gradient_accumulation"] = False
    gc.collect()
    base = rss_bytes()
    cfg = {"model_type": "qwen2", "vocab_size": a.vocab, "hidden_size": a.hidden, "intermediate_size": a.hidden * 8 // 3,
           "num_hidden_layers": a.layers, "num_attention_heads": a.hidden // 64, "num_key_value_heads": 2,
           "max_position_embeddings": 512, "tie_word_embeddings": True}
    model = QwenForCausalLM(config_from_hf(cfg)).init_weights(seed=0).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, opt = acc.prepare(ModelCall(model), opt)
    ids = torch.randint(0, a.vocab, (1, 32), generator=torch.Generator().manual_seed(acc.process_index))

    def nll(m, ids):
        return -causal_lm_logprobs(m, ids, torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)).sum()
    ds = acc.distributed_type.value == "DEEPSPEED"
    for _ in range(2):
        loss = engine(nll, ids)
        if ds:  # as align/ppo.py: the engine's own backward and step
            from align.zero import backward, step

            backward(engine, loss, acc.num_processes)
            step(engine)
        else:
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
    gc.collect()
    after = rss_bytes()
    weights = sum(tensor_bytes(getattr(p, "ds_tensor", p)) for p in model.parameters())
    inner = getattr(opt, "optimizer", opt)
    state = sum(tensor_bytes(v) for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    masters = getattr(inner, "single_partition_of_fp32_groups", None) or getattr(inner, "fp32_partitioned_groups_flat",
                                                                                 None) or []
    state += sum(tensor_bytes(t) for t in masters)
    out = {"rank": acc.process_index, "mode": a.mode, "params": n_params, "rss_delta": after - base,
           "weights_held": weights, "optimizer_state_held": state}
    Path(a.out, f"{a.mode}-{acc.process_index}.json").write_text(json.dumps(out))
    acc.wait_for_everyone()


def launch(mode: str, a, tmp: Path) -> None:
    yaml = {"dp": "multi_cpu.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml"}[mode]
    cfg = (REPO / "configs" / "accelerate" / yaml).read_text().replace("num_processes: 8", "num_processes: 2")
    (tmp / yaml).write_text(cfg)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp / yaml),
                    "--num_processes", "2", __file__, "--worker", "--mode", mode, "--out", str(tmp),
                    "--hidden", str(a.hidden), "--layers", str(a.layers), "--vocab", str(a.vocab)],
                   env=env, cwd=REPO, check=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="dp", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        for mode in ("dp", "zero2", "zero3"):
            launch(mode, a, tmp)
            rows += [json.loads((tmp / f"{mode}-{r}.json").read_text()) for r in range(2)]
    n = rows[0]["params"]
    gb = 2 ** 30
    print(f"model: {n / 1e6:.1f}M parameters (hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}), fp32, 2 ranks")
    print(f"{'mode':7} {'rank':>4} {'RSS delta GB':>13} {'B/param':>8} {'weights GB':>11} {'opt state GB':>13}")
    for r in rows:
        print(f"{r['mode']:7} {r['rank']:>4} {r['rss_delta'] / gb:13.3f} {r['rss_delta'] / n:8.1f} "
              f"{r['weights_held'] / gb:11.3f} {r['optimizer_state_held'] / gb:13.3f}")
    print("7B on 8 ranks, from the measured bytes per parameter (fp32 as here; the sharded parts / 8 instead of / 2):")
    for mode in ("dp", "zero2", "zero3"):
        r = next(x for x in rows if x["mode"] == mode and x["rank"] == 0)
        w, o = r["weights_held"] / n, r["optimizer_state_held"] / n  # bytes per parameter on this rank
        at8 = (w if mode != "zero3" else w * 2 / 8) + (o if mode == "dp" else o * 2 / 8)
        print(f"  {mode:6}: {w + o:5.1f} B/param per rank on 2 ranks -> {at8:5.2f} B/param on 8 ranks = "
              f"{at8 * 7e9 / 1e9:6.1f} GB per rank for 7B (weights + AdamW state, gradients not counted)")

if __name__ == "__main__":
    main()
