"""benchmarks/gpu_check.py, the python part of the GPU readiness script, run on the CPU at a tiny shape: every row
of its table (parity in float64 and bf16 against transformers, one SFT, reward, DPO and PPO step each, and the
import check: none of deepspeed, datasets, trl, vllm imported by this package) is present and passed."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_on_cpu_has_every_row(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path),
                          "--device", "cpu", "--tiny", "--seq_len", "64", "--batch", "2", "--new_tokens", "4",
                          "--steps", "2"], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    assert list(rows) == ["parity fp64", "parity bf16", "sft", "reward", "dpo", "ppo", "imports"]
    assert all(r["ok"] for r in rows.values()), rows
    for name in ("sft", "reward", "dpo", "ppo"):
        assert rows[name]["steps"] == 2 and rows[name]["step_s"] > 0 and rows[name]["tokens_per_s"] > 0, rows[name]
    md = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} | yes |" in md for name in rows), md
    assert "imported by this package" in rows["imports"]["detail"] and "none of" in rows["imports"]["detail"]
