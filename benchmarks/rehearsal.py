"""A rehearsal at a real model's shape: SFT (LoRA), reward training (full finetuning: the reward trainer has no
LoRA), DPO (LoRA) and PPO (LoRA policy, built-in engine) on a randomly initialised Qwen2.5-0.5B-shaped model
(configs/qwen2.5-0.5b-shape.json) with the real Qwen2 tokenizer, each stage a few optimizer steps on short sequences,
each run through its normal entry point as its own process: once as one plain process and once as 2 ranks under
configs/accelerate/zero3.yaml (num_processes set to 2).

    python benchmarks/rehearsal.py [--shape configs/qwen2.5-0.5b-shape.json] [--stages sft,reward,dpo,ppo]
        [--modes one,zero3] [--steps 3] [--seq_len 128] [--out runs/rehearsal] [--max_rss_gb 14]

Set-up: tiny generated data (English "repeat" conversations, pairs and prompts) and the base model folder, built
from --shape with random weights and saved once (model.checkpoint.save_causal_lm, in a subprocess). Each mode runs
its own chain: SFT from the base, reward model from the base, DPO and PPO from that mode's SFT output, PPO scored
by that mode's reward model.

Measured per stage and mode:
- s/step: the trainer's own per-step time from its metrics.jsonl (SFT and reward `step_s`, DPO global pairs /
  `pairs_per_s`, PPO `time_step`), averaged over the steps after the first (the first also allocates everything;
  shown separately);
- wall s: the whole process from launch to exit (imports, model load, reference cache, save of the final folder);
- peak RSS: /proc/<pid>/statm of every process of the stage's process tree, polled every 0.1 s. "sum" is the
  largest total over the tree at one instant (the accelerate launcher included), "per rank" each rank's own peak.
  RSS counts the shared libraries once per process. Spikes shorter than the poll interval can be missed.
The load average at the start and end of each stage is recorded beside the times: on a shared machine the step
times are only as good as the CPU share the stage got (memory is not affected).
A stage whose tree goes over --max_rss_gb is killed and marked so (a guard for a shared machine).
ZeRO-3 runs get MALLOC_MMAP_THRESHOLD_=1 MiB (--mmap_threshold): glibc then gives the layers DeepSpeed gathers and
frees every step back to the OS instead of keeping them in a growing heap (about 20% slower steps, half the RSS).
Writes <out>/rehearsal.json and <out>/rehearsal.md (the table and the commands).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 2 ** 30
WORDS = ("apple banana cherry river mountain window garden yellow music paper orange silver winter summer "
         "coffee pencil").split()
STAGES = ("sft", "reward", "dpo", "ppo")


# ------------------------------------------------------------------------------------------------- set-up
def write_data(d: Path) -> None:
    """sft.jsonl (200 conversations), pairs.jsonl (16 pairs), pairs_eval.jsonl (4), prompts.jsonl (16)."""
    d.mkdir(parents=True, exist_ok=True)
    r = random.Random(0)

    def words(lo, hi):
        return " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi)))

    def pair():
        q = words(3, 8)
        user = {"role": "user", "content": "Repeat these words: " + q}
        return {"prompt": [user], "chosen": [{"role": "assistant", "content": q}],
                "rejected": [{"role": "assistant", "content": words(2, 6) + " no"}]}

    files = {"sft.jsonl": [], "pairs.jsonl": [pair() for _ in range(16)],
             "pairs_eval.jsonl": [pair() for _ in range(4)],
             "prompts.jsonl": [{"prompt": [{"role": "user", "content": "Tell me about " + words(2, 5)}]}
                               for _ in range(16)]}
    for _ in range(200):
        q = words(4, 12)
        files["sft.jsonl"].append({"messages": [{"role": "user", "content": "Repeat these words: " + q},
                                                {"role": "assistant", "content": q}]})
    for name, rows in files.items():
        (d / name).write_text("".join(json.dumps(x) + "\n" for x in rows))


def build_base(shape: Path, out: Path) -> None:
    """Runs in a subprocess (so the builder's copy of the weights is gone before the stages run)."""
    from data.tokenizer import qwen2_tokenizer
    from model.checkpoint import config_from_hf, save_causal_lm
    from model.qwen import QwenForCausalLM

    model = QwenForCausalLM(config_from_hf(json.loads(shape.read_text()), source=str(shape))).init_weights(seed=0)
    save_causal_lm(model, out, qwen2_tokenizer())
    n = sum(p.numel() for p in model.parameters())
    print(f"[rehearsal] base model {out}: {n / 1e6:.1f}M parameters", flush=True)


# ------------------------------------------------------------------------------------------------- stages
def stage_cmd(stage: str, mode: str, a, out: Path) -> tuple[list[str], int]:
    """(argv after the interpreter / launcher, global batch per step: rows, pairs or responses)."""
    W = 2 if mode == "zero3" else 1
    accum = str(2 // W)  # the same global batch of 2 in both modes
    data, run, base = out / "data", out / mode, out / "base"

    def made(st: str) -> Path:  # this mode's output of an earlier stage, else the other mode's (if that one failed)
        mine = run / st / "final"
        return mine if mine.exists() or not (out / ("one" if mode != "one" else "zero3") / st / "final").exists() \
            else out / ("one" if mode != "one" else "zero3") / st / "final"
    common = ["--seq_len", str(a.seq_len), "--max_steps", str(a.steps), "--warmup_steps", "0", "--log_every", "1",
              "--report_to", "none", "--precision", a.precision, "--resume", "false", "--overwrite_output_dir", "true"]
    if stage == "sft":
        return ["align/sft.py", "--model_path", str(base), "--train_files", str(data / "sft.jsonl"), "--lora_r", "8",
                "--lr", "1e-4", "--micro_batch_size_per_rank", "1", "--grad_accum_steps", accum,
                "--output_dir", str(run / "sft"), *common], 2
    if stage == "reward":
        return ["reward/train.py", "--model_path", str(base), "--train_files", str(data / "pairs.jsonl"),
                "--eval_files", str(data / "pairs_eval.jsonl"), "--eval_batch_size", "2", "--lr", "1e-5",
                "--micro_batch_size_per_rank", "1", "--grad_accum_steps", accum, "--output_dir", str(run / "reward"),
                *common], 2
    if stage == "dpo":
        return ["align/dpo.py", "--model_path", str(made("sft")), "--train_files",
                str(data / "pairs.jsonl"), "--lora_r", "8", "--lr", "1e-4", "--ref_batch_size", "2",
                "--micro_batch_size_per_rank", "1", "--grad_accum_steps", accum, "--output_dir", str(run / "dpo"),
                *common], 2
    assert stage == "ppo"
    return ["align/ppo.py", "--policy_path", str(made("sft")), "--reward_path", str(made("reward")),
            "--prompt_files", str(data / "prompts.jsonl"), "--lora_r", "8",
            "--engine", "builtin", "--rollout_batch_prompts", "2", "--samples_per_prompt", "2",
            "--max_new_tokens", "16", "--max_prompt_len", "64", "--micro_batch_size", "1", "--num_mini_batches", "1",
            "--value_warmup_steps", "0", "--max_steps", str(a.steps), "--policy_lr", "1e-5", "--value_lr", "1e-5",
            "--true_reward", "false", "--verify_sync_every", "1", "--report_to", "none", "--precision", a.precision,
            "--resume", "false", "--overwrite_output_dir", "true", "--output_dir", str(run / "ppo")], 4


def launcher(mode: str, out: Path) -> list[str]:
    if mode == "one":
        return [sys.executable]
    cfg = (REPO / "configs" / "accelerate" / "zero3.yaml").read_text().replace("num_processes: 8", "num_processes: 2")
    path = out / "zero3_2ranks.yaml"
    path.write_text(cfg)  # bf16 in it: the trainers' --precision wins
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]


def step_times(stage: str, metrics: Path, batch: int) -> list[float]:
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    if stage in ("sft", "reward"):
        return [r["step_s"] for r in rows if "step_s" in r]
    if stage == "dpo":
        return [batch / r["pairs_per_s"] for r in rows if r.get("pairs_per_s")]
    return [r["time_step"] for r in rows if "time_step" in r]


# ------------------------------------------------------------------------------------------------- memory
def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError):
        return 0


def kill_tree(root: int) -> None:
    """SIGKILL a stage's every process: torch's launcher starts each rank in its own session, so killing the
    launcher's process group would leave the ranks running."""
    for pid in _tree(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _label(pid: int) -> str:
    """'rank N' for a process with LOCAL_RANK in its environment, 'launcher' for accelerate's, else 'process'."""
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        cmd = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return "process"
    if b"accelerate.commands.launch" in cmd:
        return "launcher"
    for kv in env:
        if kv.startswith(b"LOCAL_RANK="):
            return f"rank {kv.split(b'=', 1)[1].decode()}"
    return "process"


class MemoryWatch:
    """Polls the RSS of a process tree every `every` s: peak total and each process's own peak; kills the tree
    (its process group) above `limit` bytes."""

    def __init__(self, proc: subprocess.Popen, limit: float, every: float = 0.1):
        self.proc, self.limit, self.every = proc, limit, every
        self.peak_sum, self.peak = 0, {}
        self.labels: dict[int, str] = {}
        self.killed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while self.proc.poll() is None:
            total = 0
            for pid in _tree(self.proc.pid):
                rss = _rss(pid)
                total += rss
                if rss > self.peak.get(pid, 0):
                    self.peak[pid] = rss
                if pid not in self.labels or self.labels[pid] == "process":
                    self.labels[pid] = _label(pid)
            self.peak_sum = max(self.peak_sum, total)
            if total > self.limit and not self.killed:
                self.killed = True
                kill_tree(self.proc.pid)
            time.sleep(self.every)

    def join(self):
        self._thread.join()

    def per_rank(self) -> dict[str, float]:
        """{'rank 0': GB, ...} (one process: {'process': GB})."""
        out: dict[str, float] = {}
        for pid, rss in self.peak.items():
            label = self.labels.get(pid, "process")
            if label != "launcher":
                out[label] = max(out.get(label, 0.0), rss / GB)
        return dict(sorted(out.items()))


def run_stage(stage: str, mode: str, a, out: Path) -> dict:
    argv, batch = stage_cmd(stage, mode, a, out)
    cmd = launcher(mode, out) + argv
    shown = " ".join(cmd).replace(sys.executable, "python").replace(str(REPO) + "/", "")
    log = out / "logs" / f"{mode}-{stage}.log"
    print(f"\n== {mode} {stage}: {shown}\n   log: {log}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if mode == "zero3":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
        if a.mmap_threshold:  # glibc: blocks above this size are mmapped and given back to the OS when freed
            env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        watch = MemoryWatch(proc, a.max_rss_gb * GB)
        try:
            rc = proc.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            rc = proc.wait()
            watch.killed = "timeout"
        watch.join()
    wall = time.perf_counter() - t0
    times = step_times(stage, out / mode / stage / "metrics.jsonl", batch)
    status = "ok" if rc == 0 else ("killed: over --max_rss_gb" if watch.killed is True else
                                   f"killed: over --timeout {a.timeout:g} s" if watch.killed == "timeout" else
                                   f"failed (exit {rc}), see {log}")
    row = {"stage": stage, "mode": mode, "status": status, "steps": len(times), "step_s": times,
           "s_per_step": sum(times[1:]) / len(times[1:]) if len(times) > 1 else (times[0] if times else None),
           "first_step_s": times[0] if times else None, "wall_s": wall, "peak_rss_sum_gb": watch.peak_sum / GB,
           "peak_rss_per_rank_gb": watch.per_rank(), "load_avg": [load0, os.getloadavg()[0]], "command": shown}
    print(f"   {status}: wall {wall:.0f} s, step times {[round(t, 1) for t in times]}, peak RSS "
          f"{watch.peak_sum / GB:.2f} GB {row['peak_rss_per_rank_gb']}", flush=True)
    if rc != 0:
        print("   " + "\n   ".join(log.read_text(errors="replace").splitlines()[-15:]), flush=True)
    return row


# ------------------------------------------------------------------------------------------------- report
STAGE_NAMES = {"sft": "SFT (LoRA r 8)", "reward": "reward model (full)", "dpo": "DPO (LoRA r 8)",
               "ppo": "PPO (LoRA r 8, builtin)"}
MODE_NAMES = {"one": "1 process", "zero3": "2 ranks ZeRO-3"}


def table(rows: list[dict]) -> str:
    f = lambda x, p=1: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    lines = ["| stage | run | steps | s/step | first step s | wall s | peak RSS GB (sum) | peak RSS GB per rank | "
             "load (start, end) | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ranks = " / ".join(f"{v:.2f}" for v in r["peak_rss_per_rank_gb"].values()) or "-"
        lines.append(f"| {STAGE_NAMES[r['stage']]} | {MODE_NAMES[r['mode']]} | {r['steps']} | {f(r['s_per_step'])} | "
                     f"{f(r['first_step_s'])} | {r['wall_s']:.0f} | {r['peak_rss_sum_gb']:.2f} | {ranks} | "
                     f"{r['load_avg'][0]:.1f}, {r['load_avg'][1]:.1f} | {r['status']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="configs/qwen2.5-0.5b-shape.json", help="model config.json (random init)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--modes", default="one,zero3", help="one (plain process), zero3 (2 ranks, zero3.yaml)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per stage (PPO: no value warmup, so the "
                                                         "second step syncs the sampler and checks it greedily)")
    ap.add_argument("--seq_len", type=int, default=128, help="tokens per SFT row / longest pair")
    ap.add_argument("--out", default="runs/rehearsal")
    ap.add_argument("--max_rss_gb", type=float, default=14.0, help="kill a stage whose processes hold more")
    ap.add_argument("--mmap_threshold", type=int, default=2**20,
                    help="zero3 runs: MALLOC_MMAP_THRESHOLD_ in bytes (0: glibc's dynamic default). ZeRO-3 gathers and "
                         "frees every layer each step; with glibc's default the freed 1-32 MB blocks stay in the "
                         "heap and each rank's RSS grows by GBs (0.5B LoRA SFT: 6.1 vs 3.4 GB on rank 1)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="the trainers' --precision (bf16: DeepSpeed keeps bf16 weights and fp32 master copies)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="kill a stage running longer (s)")
    ap.add_argument("--build_base", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.build_base:
        return build_base(Path(a.shape), Path(a.build_base))
    stages = [s for s in a.stages.split(",") if s]
    modes = [m for m in a.modes.split(",") if m]
    bad = [s for s in stages if s not in STAGES] + [m for m in modes if m not in MODE_NAMES]
    if bad:
        ap.error(f"unknown stage or mode: {bad}")
    out = (REPO / a.out).resolve() if not Path(a.out).is_absolute() else Path(a.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    shape = (REPO / a.shape).resolve() if not Path(a.shape).is_absolute() else Path(a.shape)
    write_data(out / "data")
    stamp = out / "base" / "shape.json"  # rebuild the base model when --shape changed
    if not stamp.exists() or stamp.read_text() != shape.read_text():
        shutil.rmtree(out / "base", ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--shape", str(shape), "--build_base", str(out / "base")],
                       cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
        stamp.write_text(shape.read_text())
        print(f"[rehearsal] base model built and saved in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for stage in stages:  # stage by stage, both modes, so a cut-short rehearsal still compares the modes
        for mode in modes:
            rows.append(run_stage(stage, mode, a, out))
            report(rows, shape, a, out)


def report(rows: list[dict], shape: Path, a, out: Path) -> None:
    """Writes rehearsal.md / .json (after every stage: a cut-short rehearsal keeps what it measured) and prints."""
    md = table(rows)
    cfg = json.loads(shape.read_text())
    head = (f"Shape {shape.name}: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, vocab "
            f"{cfg['vocab_size']}, {a.precision}; {a.steps} steps, seq_len {a.seq_len}, global batch 2 rows/pairs "
            f"(PPO: 2 prompts x 2 samples, 16 new tokens); {os.cpu_count()} CPU cores; ZeRO-3 runs with "
            f"MALLOC_MMAP_THRESHOLD_={a.mmap_threshold or 'glibc default'}.")
    cmds = "\n".join(f"- {r['mode']} {r['stage']}: `{r['command']}`" for r in rows)
    (out / "rehearsal.md").write_text(f"{head}\n\n{md}\n\nCommands:\n{cmds}\n")
    (out / "rehearsal.json").write_text(json.dumps({"shape": cfg, "steps": a.steps, "seq_len": a.seq_len,
                                                    "rows": rows}, indent=2))
    print(f"\n{head}\n\n{md}\n\n[rehearsal] written: {out / 'rehearsal.md'}, {out / 'rehearsal.json'}")


if __name__ == "__main__":
    main()
