"""Metrics: TensorBoard + a JSONL file during the run, a PNG of chosen curves at the end."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes, atomic_write_text
from common.failpoint import armed, failpoint

JSONL_NAME = "metrics.jsonl"


class MetricsLogger:
    """Log `{name: number}` per step to `<out_dir>/metrics.jsonl` and TensorBoard (`<out_dir>/tb`).

    Resuming (resume_step set): the file is cut back to what it held when the resumed checkpoint was written, so it
    holds one consistent curve with no row twice: to its first `resume_rows` rows (the count the checkpoint
    recorded; rows logged after it at the same step, like a final eval row, go too), or without that count to the
    rows of steps <= resume_step. A torn last line (a crash or a full disk mid-write) is cut, and said. TensorBoard
    drops its events after resume_step. enabled=False (non-main ranks) makes every call a no-op.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True, resume_rows: int | None = None, say=print):
        self.enabled = enabled
        self.path = Path(out_dir) / JSONL_NAME
        self.rows = 0
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            rows, notes = _rows_for_resume(self.path, resume_step, resume_rows)
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
            self.rows = len(rows)
            for note in notes:
                say(f"[run] {self.path}: {note}")
        elif resume_step is None and self.path.is_file():
            self.path.unlink()  # a fresh run starts a fresh curve
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: pulls in tensorboard

            purge = None if resume_step is None else resume_step + 1  # events of the interrupted run after it
            self._tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=purge)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in values.items():
            row[k] = float(v.item()) if hasattr(v, "item") else (float(v) if isinstance(v, (int, float)) else v)
        line = json.dumps(row) + "\n"
        if armed("metrics.torn", step):  # reliability tests: die mid-line, as a full disk or a kill can
            self._file.write(line[:len(line) // 2])
            self._file.flush()
            failpoint("metrics.torn", step)
        self._file.write(line)
        self._file.flush()
        self.rows += 1
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _rows_for_resume(path: Path, resume_step: int, resume_rows: int | None) -> tuple[list[dict], list[str]]:
    """The rows a resumed run keeps, and notes on what was cut. Only the last line may be torn (the file is
    append-only); a bad line before it is an error naming the line."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline; else a line whose newline never got written
    notes, rows = [], []
    if tail.strip():
        try:
            json.loads(tail)
            lines.append(tail)  # complete JSON without its newline: keep
        except ValueError:
            notes.append(f"cut a torn last line ({len(tail)} bytes) left by the interrupted run")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) and not tail.strip():
                notes.append(f"cut a torn last line ({len(line)} bytes) left by the interrupted run")
                continue
            raise ValueError(f"{path}:{i}: invalid JSON line: {e}") from None
    if resume_rows is not None:
        if len(rows) < resume_rows:
            notes.append(f"holds {len(rows)} rows, fewer than the {resume_rows} logged before the checkpoint "
                         f"(edited or lost); keeping them")
        kept = rows[:resume_rows]
    else:
        kept = [r for r in rows if r.get("step", 0) <= resume_step]
    if len(kept) < len(rows):
        notes.append(f"dropped {len(rows) - len(kept)} row(s) logged after the checkpoint of step {resume_step}")
    return kept, notes


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: invalid JSON line: {e}") from None
    return rows


def plot_metrics(jsonl: str | Path, png: str | Path, keys: list[str], title: str | None = None) -> Path:
    """One subplot per key (x = step); keys missing from the file are an error. Written atomically. With 20 points
    or more a trailing 10-step mean is drawn over the raw curve (per-step RL metrics are noisy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(jsonl)
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if not pts:
            plt.close(fig)
            raise ValueError(f"{jsonl}: no finite values for metric {key!r}")
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="." if len(pts) < 50 else None, alpha=0.45 if len(pts) >= 20 else 1.0)
        if len(pts) >= 20:
            mean = [sum(ys[max(0, i - 9):i + 1]) / len(ys[max(0, i - 9):i + 1]) for i in range(len(ys))]
            ax.plot(xs, mean, color="tab:red", linewidth=1.5, label="10-step mean")
            ax.legend(fontsize=7, loc="best")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())
    return Path(png)
