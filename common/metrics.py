"""Metrics: a JSONL file always, TensorBoard and other trackers (`report_to`) during the run, a PNG of chosen curves
at the end.

report_to: comma-separated tracker names. "tensorboard" is written here (`<out_dir>/tb`, events after a resumed
checkpoint purged); every other name is one of accelerate's trackers (wandb, mlflow, aim, comet_ml, clearml, dvclive,
swanlab, trackio), started with the run's config and given the same rows as metrics.jsonl. wandb: project
"qwen-align", run name "<trainer>-<run id>", files under `<out_dir>/wandb` (WANDB_MODE=offline works without a
network), a resumed run continues the same wandb run (id = run id); mlflow: experiment "qwen-align", where
MLFLOW_TRACKING_URI points. "none" or "" = metrics.jsonl only.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes, atomic_write_text
from common.failpoint import armed, failpoint

JSONL_NAME = "metrics.jsonl"
PROJECT = "qwen-align"


def parse_report_to(value: str | None) -> list[str]:
    """Tracker names of a report_to value; ConfigError naming an unknown or uninstalled one (checked at start-up,
    before any model is loaded)."""
    from common.config import ConfigError

    names = [n.strip().lower() for n in (value or "").split(",") if n.strip() and n.strip().lower() != "none"]
    if not names:
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import imports

    for n in names:
        if n not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"report_to: unknown tracker {n!r}; use a comma-separated list of "
                              f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}, or none")
        check = getattr(imports, f"is_{n}_available", None)
        if n != "tensorboard" and check is not None and not check():
            raise ConfigError(f"report_to {n}: the {n} package is not installed (pip install {n.replace('_', '-')})")
    return list(dict.fromkeys(names))


def start_trackers(names: list[str], out_dir: Path, kind: str, run_id: str, config: dict | None) -> list:
    """accelerate trackers for the names other than tensorboard, started, with the run's config stored."""
    from accelerate import PartialState
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    PartialState()  # accelerate's trackers log through its logging, which needs the state (set by the Accelerator)
    trackers = []
    for n in names:
        if n == "tensorboard":
            continue
        if n == "wandb":
            out_dir.mkdir(parents=True, exist_ok=True)
            t = LOGGER_TYPE_TO_CLASS[n](PROJECT, name=f"{kind}-{run_id}", id=run_id, resume="allow", dir=str(out_dir))
        elif n == "mlflow":
            t = LOGGER_TYPE_TO_CLASS[n](PROJECT, run_name=f"{kind}-{run_id}")
        elif LOGGER_TYPE_TO_CLASS[n].requires_logging_directory:
            t = LOGGER_TYPE_TO_CLASS[n](PROJECT, str(out_dir / n))
        else:
            t = LOGGER_TYPE_TO_CLASS[n](PROJECT)
        t.start()
        if config:
            t.store_init_configuration({k: v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
                                        for k, v in config.items()})
        trackers.append(t)
    return trackers


class MetricsLogger:
    """Log `{name: number}` per step to `<out_dir>/metrics.jsonl` and TensorBoard (`<out_dir>/tb`).

    Resuming (resume_step set): the file is cut back to what it held when the resumed checkpoint was written, so it
    holds one consistent curve with no row twice: to its first `resume_rows` rows (the count the checkpoint
    recorded; rows logged after it at the same step, like a final eval row, go too), or without that count to the
    rows of steps <= resume_step. A torn last line (a crash or a full disk mid-write) is cut, and said. TensorBoard
    drops its events after resume_step. enabled=False (non-main ranks) makes every call a no-op. report_to: the
    trackers besides metrics.jsonl (module docstring; default TensorBoard, `tensorboard=False` drops it); kind,
    run_id and config name and describe the run to them.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True, resume_rows: int | None = None, say=print,
                 report_to: str | None = "tensorboard", kind: str = "run", run_id: str = "run",
                 config: dict | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / JSONL_NAME
        self.rows = 0
        self._tb = None
        self.trackers = []
        if not enabled:
            return
        names = parse_report_to(report_to)
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
        if tensorboard and "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter  # lazy: pulls in tensorboard

            purge = None if resume_step is None else resume_step + 1  # events of the interrupted run after it
            self._tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=purge)
        self.trackers = start_trackers(names, Path(out_dir), kind, run_id, config)

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
        if self.trackers:
            scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, float)}
            for t in self.trackers:
                t.log(scalars, step=int(step))

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        for t in self.trackers:
            t.finish()
        self.trackers = []


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
