"""Run by tests/test_ppo_deepspeed.py::test_sync_from_zero3_shards_gathers_one_bucket_at_a_time under `accelerate
launch` with configs/accelerate/zero3.yaml on 2 ranks (not a test module itself).

A policy (optionally with a LoRA adapter whose B matrices are non-zero, so the merge matters) is prepared as a ZeRO-3
engine exactly as align/ppo.py does; rollout.sync.load_buckets copies it into a plain copy with a small bucket. The
main process writes a JSON report: the sync's measured peak of gathered bytes, the bucket size, the largest unit and
the whole model's bytes, and the largest difference between the copy and the full (gathered, LoRA-merged) weights.

engine "vllm": in addition, a vLLM engine on every rank is started from a folder of OTHER weights (another seed) and
synced from the shards with the same bucket (streamed into reload_weights); its stats replace the built-in copy's,
and its greedy tokens and log-probs are checked against the sharded policy's own forward (raises on a mismatch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(model_dir: str, out: str, lora_r: int, bucket_bytes: int, engine_kind: str) -> None:
    from align.models import with_lora
    from align.zero import ModelCall, check_deepspeed
    from common.loop import full_weights, make_accelerator
    from model.checkpoint import load_causal_lm
    from rollout.sync import load_buckets, unwrap

    acc = make_accelerator("fp32", 1, 2)
    check_deepspeed(acc, 1.0)
    policy = load_causal_lm(model_dir)
    if lora_r:
        policy = with_lora(policy, lora_r, 16.0, ["q_proj", "v_proj", "down_proj"], 0.0, None)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    engine, _ = acc.prepare(ModelCall(policy), opt)
    copy = load_causal_lm(model_dir)
    with torch.no_grad():
        for p in copy.parameters():
            p.zero_()  # every weight must be written by the sync
    sharded = sum(1 for p in unwrap(policy).parameters() if p.numel() == 0 or getattr(p, "ds_numel", 0) != p.numel())
    stats = load_buckets(copy, policy, bucket_bytes)
    greedy = None
    if engine_kind == "vllm":
        stats, greedy = vllm_sync(acc, engine, policy, model_dir, out, bucket_bytes)
    whole = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in unwrap(policy).parameters())
    zc = engine._config.zero_config  # what DeepSpeed runs with (CPU ranks: common.loop.CPU_ZERO_LIMITS)
    report = {}
    with full_weights(acc, engine):  # no staging folder: consolidated on the main process (the reference)
        if acc.is_main_process:
            full = {n: p.detach().clone() for n, p in unwrap(policy).named_parameters()}
            if lora_r:  # the obvious merge on the gathered weights: W + B @ A x alpha / r
                for n in [n for n in full if n.endswith(".base_layer.weight")]:
                    stem = n[:-len(".base_layer.weight")]
                    a, b = full[f"{stem}.lora_A.default.weight"], full[f"{stem}.lora_B.default.weight"]
                    full[stem + ".weight"] = full.pop(n) + b @ a * (16.0 / lora_r)
                full = {n.replace(".base_layer.", "."): v for n, v in full.items() if ".lora_" not in n}
            mine = dict(copy.named_parameters())
            diff = max(float((mine[n] - v).abs().max()) for n, v in full.items())
            report = {**stats, "whole_model_bytes": whole, "max_abs_diff": diff, "sharded_tensors": sharded,
                      "compared": len(full), "copy_tensors": len(mine), "greedy": greedy,
                      "zero_limits": {"reduce_bucket_size": zc.reduce_bucket_size,
                                      "stage3_max_live_parameters": zc.max_live_parameters,
                                      "stage3_max_reuse_distance": zc.max_reuse_distance,
                                      "stage3_prefetch_bucket_size": zc.prefetch_bucket_size}}
    report["saved"] = saved(acc, engine, policy, full if acc.is_main_process else None, Path(out).parent, bucket_bytes)
    if acc.is_main_process:
        with open(out, "w") as f:
            json.dump(report, f)
    acc.wait_for_everyone()


def saved(acc, engine, policy, full: dict, root, bucket_bytes: int) -> dict:
    """The final export as the trainers write it under ZeRO-3 (common.loop.full_weights with a staging folder:
    streamed bucket by bucket, LoRA merged per layer), read back and compared with the consolidated weights."""
    from align.models import save_model
    from common.loop import STAGED, full_weights
    from model.checkpoint import read_state_dict

    with full_weights(acc, engine, stage_dir=root, bucket_bytes=bucket_bytes) as stats:
        if acc.is_main_process:
            save_model(policy, root / "final", None, merge=True)
    if not acc.is_main_process:
        return {}
    sd = read_state_dict(root / "final")
    tied = policy.config.tie_word_embeddings if hasattr(policy, "config") else None
    expect = {n for n in full if not (tied and n == "lm_head.weight")}
    return {"keys_equal": set(sd) == expect, "n": len(sd), "tied": bool(tied),
            "max_abs_diff": max(float((sd[n] - full[n]).abs().max()) for n in expect),
            "peak_gathered_bytes": stats["peak_gathered_bytes"], "buckets": stats["buckets"],
            "files": sorted(p.name for p in (root / "final").iterdir()),
            "staging_left": sorted(p.name for p in root.glob(STAGED + "*"))}


def vllm_sync(acc, engine, policy, model_dir: str, out: str, bucket_bytes: int):
    """Start vLLM on another seed's weights, sync it from the ZeRO-3 policy, greedy-check it: (stats, check)."""
    from pathlib import Path

    from data.tokenizer import load_tokenizer
    from model.checkpoint import load_causal_lm, save_causal_lm
    from rollout.vllm_engine import VLLMEngine

    other = Path(out).parent / f"other-{acc.process_index}"
    save_causal_lm(load_causal_lm(model_dir).init_weights(seed=1), other, load_tokenizer(model_dir))
    vllm = VLLMEngine(other, max_model_len=64, bucket_bytes=bucket_bytes)
    vllm.sync_weights(policy)
    prompts = [[5, 17, 300, 42], [9, 8, 7], [123, 456, 789, 10, 11]]
    check = vllm.greedy_check(policy, prompts, max_tokens=6, call=lambda fn, *a: engine(fn, *a))
    return vllm.last_sync, check


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else "builtin")
