"""GPU readiness in one process (benchmarks/gpu_check.sh runs it): model parity of the custom model against
transformers' Qwen2ForCausalLM in bf16, then a few optimizer steps of SFT, reward training, DPO and PPO (built-in
engine) through the trainers' own `train` functions, with tokens/s. Prints one table and writes it to
<out>/gpu_check.md and gpu_check.json.

    python benchmarks/gpu_check.py --out runs/gpu_check                  # CUDA, Qwen2.5-0.5B shape, real tokenizer
    python benchmarks/gpu_check.py --out /tmp/gc --device cpu --tiny      # the same rows on a tiny model (tests)

Parity: one random-weight model (the --shape config; biases and norms randomised too, so every term is exercised)
saved once, loaded by both implementations in bf16 on the device, and by the custom model in float64 (the
reference). The tolerance is derived, not tuned: the custom model's bf16 logits must be as close to the float64
logits as transformers' bf16 logits are (max error <= 2x transformers' own, and likewise the mean); the float64
pair (custom vs transformers, both float64) must agree to 1e-6 of the logit scale (same function).

Steps: each trainer runs --steps optimizer steps (the first includes CUDA start-up and allocation); the table shows
the mean of the later steps. Precision 'auto': bf16 autocast on a GPU that has it, fp32 on a CPU. Tokens/s: SFT and
reward count the non-padding tokens of the step's batch, DPO every token of its chosen and rejected sequences,
PPO the sampled response tokens of the step (episodes/s x mean response length) over the whole step (rollout,
scoring, log-probs, update).

The check also asserts that none of deepspeed, datasets, trl or vllm was imported: the GPU machine has none of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABSENT = ("deepspeed", "datasets", "trl", "vllm")  # not installed on the GPU machine: must not be needed
TINY = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "bos_token_id": 996, "eos_token_id": 998,
        "pad_token_id": 996}
ROWS = ["parity fp64", "parity bf16", "sft", "reward", "dpo", "ppo", "imports"]


class ImportWatch:
    """Who first really imports each of ABSENT (not an availability probe such as importlib.util.find_spec): the
    file holding the import statement. `ours` {module: file:line} are imports by this repository (they would fail
    on the GPU machine); `others` are by the libraries, which import them only when installed (accelerate's
    unwrap_model imports deepspeed if it is there), so on the GPU machine they do not happen."""

    def __init__(self):
        self.ours: dict[str, str] = {}
        self.others: dict[str, str] = {}

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ABSENT and top not in self.ours and top not in self.others:
            import traceback

            stack = traceback.extract_stack()[:-1]
            if len(stack) >= 2 and stack[-1].name == "_find_spec" and stack[-2].name == "_find_and_load_unlocked":
                caller = [f for f in stack if not f.filename.startswith("<frozen")][-1]
                here = Path(caller.filename).resolve()
                if here.is_relative_to(REPO) and "site-packages" not in str(here):
                    self.ours[top] = f"{here.relative_to(REPO)}:{caller.lineno}"
                else:
                    self.others[top] = f"{'/'.join(here.parts[-2:])}:{caller.lineno}"
        return None  # never changes what gets imported


def build_model_folder(cfg: dict, folder: Path, tok) -> None:
    """Random weights from the shape config; biases and norm weights randomised too (init_weights zeroes / ones them)."""
    import torch

    from model.checkpoint import config_from_hf, save_causal_lm
    from model.qwen import QwenForCausalLM

    model = QwenForCausalLM(config_from_hf(cfg)).init_weights(seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
    save_causal_lm(model, folder, tok)


def parity(folder: Path, device: str, seq_len: int) -> list[dict]:
    """Custom vs transformers logits on one batch: float64 (same function) and bf16 (within transformers' own error)."""
    import torch
    from transformers import AutoModelForCausalLM

    from model.checkpoint import load_causal_lm

    cfg = json.loads((folder / "config.json").read_text())
    ids = torch.randint(0, cfg["vocab_size"], (2, seq_len), generator=torch.Generator().manual_seed(0)).to(device)

    def logits(model):
        with torch.no_grad():
            out = model(ids)
        return (out if isinstance(out, torch.Tensor) else out.logits).double()

    def hf(dtype):
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()

    rows = []
    ref = logits(load_causal_lm(folder, dtype=torch.float64).to(device))  # (B, T, V)
    scale = float(ref.abs().max())
    ref_hf = logits(hf(torch.float64))
    d64 = float((ref_hf - ref).abs().max())
    rows.append({"row": "parity fp64", "ok": d64 <= 1e-6 * scale,
                 "detail": f"max |custom - transformers| {d64:.2e} (logit scale {scale:.2f}, limit 1e-6 x scale)"})
    del ref_hf
    t0 = time.perf_counter()
    ours = logits(load_causal_lm(folder, dtype=torch.bfloat16).to(device))
    theirs = logits(hf(torch.bfloat16))
    e_ours, e_hf = (ours - ref).abs(), (theirs - ref).abs()
    ok = float(e_ours.max()) <= 2 * float(e_hf.max()) and float(e_ours.mean()) <= 2 * float(e_hf.mean())
    agree = float((ours.argmax(-1) == ref.argmax(-1)).double().mean())
    agree_hf = float((theirs.argmax(-1) == ref.argmax(-1)).double().mean())
    rows.append({"row": "parity bf16", "ok": ok, "seconds": time.perf_counter() - t0,
                 "detail": f"vs float64: max err custom {float(e_ours.max()):.3e} / transformers "
                           f"{float(e_hf.max()):.3e}, mean {float(e_ours.mean()):.2e} / {float(e_hf.mean()):.2e}; "
                           f"argmax agreement {agree:.3f} / {agree_hf:.3f}; custom vs transformers max "
                           f"{float((ours - theirs).abs().max()):.3e}"})
    return rows


def steady(values: list[float]) -> float:
    """Mean over the steps after the first (the first has the start-up); the only one if there is one."""
    later = values[1:] or values
    return sum(later) / len(later)


def run_stages(work: Path, a) -> list[dict]:
    from align.dpo import DPOConfig, train as train_dpo
    from align.ppo import PPOConfig, train as train_ppo
    from align.sft import SFTConfig, train as train_sft
    from common.config import build_config
    from common.metrics import read_jsonl
    from reward.train import RewardConfig, train as train_reward

    data, base = work / "data", str(work / "base")
    run = dict(max_steps=a.steps, report_to="none", resume=False, overwrite_output_dir=True)
    batch = dict(micro_batch_size_per_rank=a.batch, grad_accum_steps=1, seq_len=a.seq_len, warmup_steps=0)
    rows = []

    def row(name, out, seconds, step_s, tokens_per_s):
        """step_s(r), tokens_per_s(r): the step's seconds and tokens/s from one metrics.jsonl row."""
        m = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r or "time_step" in r]
        rows.append({"row": name, "ok": len(m) == a.steps, "steps": len(m),
                     "step_s": steady([step_s(r) for r in m]) if m else None,
                     "tokens_per_s": steady([tokens_per_s(r) for r in m]) if m else None, "seconds": seconds,
                     "detail": f"{len(m)} of {a.steps} steps logged"})

    t0 = time.perf_counter()
    out = work / "sft"
    train_sft(build_config(SFTConfig, dict(model_path=base, train_files=[str(data / "sft.jsonl")], lr=1e-5,
                                           output_dir=str(out), **batch, **run)))
    row("sft", out, time.perf_counter() - t0, lambda r: r["step_s"], lambda r: r["tokens_per_s"])

    t0 = time.perf_counter()
    out = work / "reward"
    train_reward(build_config(RewardConfig, dict(model_path=base, train_files=[str(data / "pairs.jsonl")],
                                                 eval_files=[str(data / "pairs_eval.jsonl")], lr=1e-5,
                                                 eval_batch_size=a.batch, output_dir=str(out), **batch, **run)))
    row("reward", out, time.perf_counter() - t0, lambda r: r["step_s"], lambda r: r["tokens_per_s"])

    t0 = time.perf_counter()
    out = work / "dpo"
    train_dpo(build_config(DPOConfig, dict(model_path=str(work / "sft" / "final"),
                                           train_files=[str(data / "pairs.jsonl")], lr=1e-6, ref_batch_size=a.batch,
                                           output_dir=str(out), **batch, **run)))
    row("dpo", out, time.perf_counter() - t0, lambda r: a.batch / r["pairs_per_s"], lambda r: r["tokens_per_s"])

    t0 = time.perf_counter()
    out = work / "ppo"
    n_prompts = max(2, a.batch)
    train_ppo(build_config(PPOConfig, dict(
        policy_path=str(work / "sft" / "final"), reward_path=str(work / "reward" / "final"),
        prompt_files=[str(data / "prompts.jsonl")], engine="builtin", rollout_batch_prompts=n_prompts,
        samples_per_prompt=2, max_new_tokens=a.new_tokens, micro_batch_size=n_prompts, num_mini_batches=1,
        value_warmup_steps=0, true_reward=False, verify_sync_every=1, output_dir=str(out), policy_lr=1e-6,
        max_steps=a.steps, report_to="none", resume=False, overwrite_output_dir=True)))
    row("ppo", out, time.perf_counter() - t0, lambda r: r["time_step"],
        lambda r: r["episodes_per_s"] * r["response_length"])  # sampled response tokens over the whole step
    return rows


def table(rows: list[dict], head: str) -> str:
    f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    lines = [head, "", "| check | ok | s/step | tokens/s | stage s | detail |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {'yes' if r['ok'] else 'NO'} | {f(r.get('step_s'), '.3f')} | "
                     f"{f(r.get('tokens_per_s'), '.0f')} | {f(r.get('seconds'), '.1f')} | {r.get('detail', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the table (gpu_check.md/.json) and the runs")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shape", default=str(REPO / "configs" / "qwen2.5-0.5b-shape.json"), help="model config.json")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide, 1000-token model and the small test "
                                                        "tokenizer (the CPU test)")
    ap.add_argument("--tokenizer", default="qwen2", help="'qwen2' (the real Qwen2 BPE) or 'small'")
    ap.add_argument("--seq_len", type=int, default=512, help="parity sequence length; SFT/reward/DPO seq_len")
    ap.add_argument("--batch", type=int, default=4, help="rows / pairs per step; PPO: prompts (x 2 samples)")
    ap.add_argument("--new_tokens", type=int, default=64, help="PPO response length limit")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per trainer")
    a = ap.parse_args(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # accelerate then picks the CPU
    if a.tiny:
        a.tokenizer = "small"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    watch = ImportWatch()
    sys.meta_path.insert(0, watch)
    import torch

    from benchmarks.rehearsal import write_data
    from data.tokenizer import load_tokenizer

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda but torch sees no GPU (torch.cuda.is_available() is False); use "
                 "--device cpu for the CPU rehearsal of this check")
    out = Path(a.out).resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    cfg = TINY if a.tiny else json.loads(Path(a.shape).read_text())
    t_all = time.perf_counter()
    tok = load_tokenizer(a.tokenizer)
    write_data(work / "data")
    build_model_folder(cfg, work / "base", tok)
    rows = parity(work / "base", a.device, a.seq_len)
    rows += run_stages(work, a)
    rows.append({"row": "imports", "ok": not watch.ours,
                 "detail": (f"imported by this package: {watch.ours}" if watch.ours else
                            f"none of {', '.join(ABSENT)} imported by this package") +
                           (f"; by libraries, only where installed: {watch.others}" if watch.others else "")})
    dev = torch.cuda.get_device_name(0) if a.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    head = (f"gpu_check on {dev}, torch {torch.__version__}, model {cfg['num_hidden_layers']} layers x "
            f"{cfg['hidden_size']}, vocab {cfg['vocab_size']}, tokenizer {a.tokenizer}; seq_len {a.seq_len}, "
            f"batch {a.batch}, {a.steps} steps per trainer (s/step: mean after the first); total "
            f"{time.perf_counter() - t_all:.0f} s")
    text = table(rows, head)
    (out / "gpu_check.md").write_text(text + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"head": head, "rows": rows}, indent=2))
    print("\n" + text + f"\n\n[gpu_check] written: {out / 'gpu_check.md'}", flush=True)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
