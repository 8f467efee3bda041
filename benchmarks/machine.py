"""What every benchmark prints about the machine it ran on: torch's CPU vector path, threads and the load.

fp32 kernels (exp, softmax, reductions) take another code path on AVX-512, AVX2 and the portable build
(`ATEN_CPU_CAPABILITY=default`), and a shared machine's load moves wall-clock times, so a ratio means little
without both. `ATEN_CPU_CAPABILITY=avx2` (or `default`) in the environment selects a path below the CPU's best;
benchmark subprocesses inherit it.
"""

from __future__ import annotations

import os


def cpu_path() -> str:
    """torch's CPU vector path in this process, e.g. 'AVX2', 'AVX512', 'DEFAULT'."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_line(threads: int | None = None) -> str:
    """One line for a benchmark's header: vector path (and whether forced), the workers' threads, cores, load."""
    import torch

    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    how = f" (ATEN_CPU_CAPABILITY={forced})" if forced else " (native)"
    return (f"CPU vector path {cpu_path()}{how}, torch {torch.__version__}, {threads or torch.get_num_threads()} "
            f"threads per worker on {os.cpu_count()} cores, load average {load_average()}")


def worker_env(threads: int | None = None) -> dict:
    """Environment for a benchmark's worker subprocess: this one, plus OMP_NUM_THREADS when `threads` is given.
    One thread per side makes a ratio measurable on a machine shared with other jobs: with two threads, every
    parallel op waits for a descheduled partner thread (and spins meanwhile), which inflates wall and CPU time by
    whatever the other jobs do."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def add_threads_arg(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in each worker (default: torch's default, one per core); 1 gives "
                             "steadier ratios on a machine shared with other jobs")
