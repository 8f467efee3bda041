"""Reward-model benchmark: pairwise accuracy of every model on every preference dataset (Qwen report Table 4).

    python -m reward.bench --model PMP=runs/pmp/final --model RM=runs/rm/final \\
        --data demo=data/demo/rm_test.jsonl --data hh=tests/fixtures/hh-rlhf/harmless-base-test.jsonl.gz

Rows are models, columns datasets, cells accuracy % (share of pairs where r(chosen) > r(rejected)), plus a mean
column. Also reports length bias: how often the human-chosen reply is the longer one, and how often each model
scores the longer reply higher. Writes bench.json and bench.png (atomically) into --out_dir.
Data files may be in any preference format the data layer reads (TRL prompt/chosen/rejected, HH-RLHF dialogues,
UltraFeedback, SHP, arena, ...). Each model is scored with the tokenizer saved in its folder
(docs/PITFALLS.md#tokenizer-mismatch).
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from common.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from common.config import ConfigError, InputError, cfg, parse_config, user_errors
from reward.model import load_reward_model, load_tokenizer, reward_token_id, score_pairs


@dataclass
class BenchConfig:
    model: list[str] = cfg([], "NAME=PATH of a reward-model folder (repeat the flag for several models)",
                           required=True)
    data: list[str] = cfg([], "NAME=PATH of a preference file in any format the data layer reads (repeatable)",
                          required=True)
    tokenizer: str = cfg("auto", "'auto' = the tokenizer saved in each model folder; else qwen2, small or a folder")
    max_len: int = cfg(2048, "longest prompt + response in tokens; longer prompts are cut from the left")
    max_pairs: Optional[int] = cfg(None, "score only the first N pairs of each dataset (quick looks)")
    batch_size: int = cfg(8, "pairs per forward")
    out_dir: str = cfg("runs/bench", "bench.json and bench.png go here")

    def validate(self):
        for what in ("model", "data"):
            items = getattr(self, what)
            if not items:
                raise ConfigError(f"give at least one --{what} NAME=PATH")
            names = [split_named(x, what)[0] for x in items]
            if len(set(names)) != len(names):
                raise ConfigError(f"--{what} names must be unique, got {names}")
        if self.batch_size < 1 or self.max_len < 2 or (self.max_pairs is not None and self.max_pairs < 1):
            raise ConfigError("need batch_size >= 1, max_len >= 2 and max_pairs >= 1 (or None)")


def split_named(item: str, what: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--{what} {item!r}: expected NAME=PATH")
    return name, path


def load_pairs(path: str) -> tuple[list[dict], dict]:
    """Canonical {prompt, chosen, rejected} records from any preference export, and counts of what was skipped."""
    from data.datasets import prepare_record
    from data.formats import parse_rows
    from data.io import FileError, read_rows

    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path) or path.endswith((".parquet", ".arrow")):
        from data.datasets import load_records

        return load_records(path, kind="preference")[0], {"malformed": 0, "dropped": 0}
    rows, errors = [], []
    for where, obj, err in read_rows(path):
        if isinstance(err, FileError):  # the whole file: missing, empty, not JSON
            raise InputError(f"{where}: {err}")
        (errors.append(f"{where}: {err}") if err else rows.append((where, obj)))
    pairs, dropped = [], 0
    for _, parsed in parse_rows(rows, "auto"):
        if parsed.error:
            errors.append(f"{parsed.where}: {parsed.error}")
        dropped += len(parsed.dropped)
        for pair in parsed.pairs:  # the trainers' validation (escaping, joined replies, identical replies dropped)
            try:
                rec, reason = prepare_record(pair, "preference", parsed.where)
            except ValueError as e:
                errors.append(str(e))
                continue
            if reason is None:
                pairs.append(rec)
            else:
                dropped += 1
    if not pairs:
        raise InputError(f"{path}: no preference pairs found" + (f"; first error: {errors[0]}" if errors else ""))
    if errors:
        print(f"[bench] {path}: skipped {len(errors)} malformed records, first: {errors[0]}", file=sys.stderr)
    return pairs, {"malformed": len(errors), "dropped": dropped}


def pair_metrics(rc: torch.Tensor, rr: torch.Tensor, len_c: torch.Tensor, len_r: torch.Tensor) -> dict[str, float]:
    """Accuracy % and length bias from scores (N,) and reply lengths in tokens (N,).

    prefers_longer %: among pairs whose replies differ in length, how often the longer one gets the higher score.
    """
    differ = len_c != len_r
    longer_is_chosen = len_c > len_r
    model_picks_chosen = rc > rr
    picks_longer = (model_picks_chosen == longer_is_chosen)[differ]
    return {"accuracy": 100.0 * model_picks_chosen.float().mean().item(),
            "prefers_longer": 100.0 * picks_longer.float().mean().item() if differ.any() else float("nan"),
            "mean_margin": (rc - rr).mean().item(), "n": int(rc.numel())}


def model_tokenizer(model_path: str, choice: str):
    if choice != "auto":
        return load_tokenizer(choice)
    if not (Path(model_path) / "tokenizer.json").is_file():
        raise ConfigError(f"{model_path}: no tokenizer saved in the model folder; pass --tokenizer")
    return load_tokenizer(model_path)


def run(c: BenchConfig) -> dict:
    """Score every model on every dataset; returns the JSON-able results."""
    from common.preflight import check_model_folder, check_output_dir
    from data.datasets import build_preference_examples
    from data.tokenizer import tokenizer_fingerprint

    check_output_dir(c.out_dir, "out_dir")  # the checks that need no model first
    for mname, mpath in (split_named(m, "model") for m in c.model):
        check_model_folder(mpath, f"--model {mname}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    datasets = {n: load_pairs(p) for n, p in (split_named(d, "data") for d in c.data)}
    results = {"models": {}, "datasets": {}, "config": {"max_len": c.max_len, "max_pairs": c.max_pairs}}
    cache: dict[tuple[str, str], list[dict]] = {}  # (tokenizer fingerprint, dataset) -> examples
    for mname, mpath in (split_named(m, "model") for m in c.model):
        tok = model_tokenizer(mpath, c.tokenizer)
        rid, fp = reward_token_id(tok), tokenizer_fingerprint(tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        net = load_reward_model(mpath).to(device).eval()
        results["models"][mname] = {"path": mpath, "scores": {}}
        for dname, (records, skipped) in datasets.items():
            if (fp, dname) not in cache:
                ex, report = build_preference_examples(records[:c.max_pairs] if c.max_pairs else records, tok,
                                                       c.max_len, reward_token=True, truncation="truncate")
                cache[(fp, dname)] = ex
                len_c = torch.tensor([len(e["chosen_ids"]) for e in ex])
                len_r = torch.tensor([len(e["rejected_ids"]) for e in ex])
                differ = len_c != len_r
                results["datasets"][dname] = {"pairs": len(ex), "skipped": skipped, "report": report.summary(),
                                              "chosen_longer": 100.0 * (len_c > len_r)[differ].float().mean().item()}
            ex = cache[(fp, dname)]
            rc, rr = score_pairs(net, ex, pad, rid, c.batch_size, device, desc=f"{mname} on {dname}")
            len_c = torch.tensor([len(e["chosen_ids"]) for e in ex])
            len_r = torch.tensor([len(e["rejected_ids"]) for e in ex])
            results["models"][mname]["scores"][dname] = pair_metrics(rc, rr, len_c, len_r)
        accs = [s["accuracy"] for s in results["models"][mname]["scores"].values()]
        results["models"][mname]["mean_accuracy"] = sum(accs) / len(accs)
    return results


def format_table(results: dict) -> str:
    """Markdown table: rows models, columns datasets (accuracy %), then the mean; then the length-bias table."""
    dnames = list(results["datasets"])
    lines = ["| Model | " + " | ".join(dnames) + " | Avg |", "|---" * (len(dnames) + 2) + "|"]
    for mname, m in results["models"].items():
        cells = [f"{m['scores'][d]['accuracy']:.1f}" for d in dnames]
        lines.append(f"| {mname} | " + " | ".join(cells) + f" | {m['mean_accuracy']:.1f} |")
    lines += ["", "Length bias (% of pairs with replies of different length where the longer reply wins):",
              "| | " + " | ".join(dnames) + " |", "|---" * (len(dnames) + 1) + "|",
              "| human label (chosen is longer) | "
              + " | ".join(f"{results['datasets'][d]['chosen_longer']:.1f}" for d in dnames) + " |"]
    for mname, m in results["models"].items():
        lines.append(f"| {mname} prefers longer | "
                     + " | ".join(f"{m['scores'][d]['prefers_longer']:.1f}" for d in dnames) + " |")
    lines.append("pairs: " + ", ".join(f"{d} {results['datasets'][d]['pairs']}" for d in dnames))
    return "\n".join(lines)


def plot(results: dict, png: str | Path) -> None:
    """Grouped bars: one group per dataset (and the mean), one bar per model; a dashed line at chance (50%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dnames = list(results["datasets"]) + ["Avg"]
    models = list(results["models"])
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(dnames), 3.4))
    for i, mname in enumerate(models):
        m = results["models"][mname]
        vals = [m["scores"][d]["accuracy"] for d in dnames[:-1]] + [m["mean_accuracy"]]
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(dnames))]
        bars = ax.bar(xs, vals, width, label=mname)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.axhline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(dnames)), dnames)
    ax.set_ylabel("pairwise accuracy %")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())


def main(argv: list[str] | None = None) -> dict:
    with user_errors():  # a config or input mistake: one paragraph, exit status 2
        c = parse_config(BenchConfig, sys.argv[1:] if argv is None else argv)
        results = run(c)
    out = Path(c.out_dir)
    atomic_write_json(out / "bench.json", results)
    plot(results, out / "bench.png")
    table = format_table(results)
    atomic_write_text(out / "bench.md", table + "\n")
    print(table)
    print(f"[bench] wrote {out / 'bench.json'}, {out / 'bench.md'} and {out / 'bench.png'}")
    return results


if __name__ == "__main__":
    main()
