"""Op-by-op profile of one training step of benchmarks/model_step.py (ours or transformers), on this CPU's path.

    python benchmarks/profile_step.py --impl ours [--steps 2 --hidden 256 --layers 4 --batch 4 --seq 256]
    ATEN_CPU_CAPABILITY=default python benchmarks/profile_step.py --impl hf

torch.profiler over `--steps` steps after one warm-up step; prints the CPU vector path and the ops sorted by self
CPU time (with input shapes), so the two implementations and the two vector paths can be compared line by line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.model_step import build, step_fn  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=["ours", "hf"], required=True)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--chunk", type=int, default=None, help="ours: rows of logits per chunk (default: the library's)")
    ap.add_argument("--rows", type=int, default=30, help="ops to print")
    ap.add_argument("--shapes", action="store_true", help="group by input shapes too")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 gives op times "
                    "that other jobs on a shared machine distort less (no waiting for a descheduled thread)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    step = step_fn(args, model)
    step()
    model.zero_grad(set_to_none=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            step()
            model.zero_grad(set_to_none=False)
    print(f"impl {args.impl}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, {args.steps} steps")
    avg = prof.key_averages(group_by_input_shape=args.shapes)
    print(avg.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40,
                    max_shapes_column_width=60))


if __name__ == "__main__":
    main()
