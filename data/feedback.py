"""Import exported user feedback into SFT, preference-pair and unpaired (KTO) training files.

    python -m data.feedback INPUT... --out DIR [--format auto|openwebui|...] [--on-error skip|stop]
        [--decontaminate EVALFILE ...] [--ngram 13] [--near-dup-threshold 0.9] [--scrub-pii] [--no-dedupe]

Phases: 1. read and parse every input (data/formats.py), 2. turn parsed feedback into the three outputs,
3. clean each output (data/clean.py), 4. write sft.jsonl, pairs.jsonl, unpaired.jsonl and report.json atomically.
sft.jsonl holds the positively rated replies (Taiwan-LLM's "feedback SFT" set); pairs.jsonl the preferences;
unpaired.jsonl every single rating. Nothing is written before all inputs are read, so with --on-error stop an
error leaves the output folder exactly as it was.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from data.clean import CleanConfig, Decontaminator, clean_records, strings_in
from data.formats import PARSERS, parse_rows
from data.io import DEFAULT_MAX_LINE_BYTES, read_rows, write_json, write_jsonl

OUTPUTS = ("sft", "pairs", "unpaired")
_MAX_ERROR_EXAMPLES = 50


@dataclass
class FeedbackConfig:
    inputs: list[str]
    """Feedback exports: .json / .jsonl, optionally .gz."""
    out: str
    """Output folder for sft.jsonl, pairs.jsonl, unpaired.jsonl and report.json."""
    format: str = "auto"
    """Input format, or "auto" to detect it record by record."""
    on_error: str = "skip"
    """"skip": count malformed records and go on; "stop": exit non-zero at the first one, writing nothing."""
    decontaminate: list[str] = field(default_factory=list)
    """Evaluation files (.jsonl / .json: every string in a record; other files: every line) to decontaminate against."""
    ngram: int = 13
    """Decontamination n-gram length in tokens (Qwen report sec. 2.1)."""
    near_dup_threshold: float = 0.9
    """MinHash Jaccard similarity at or above which a record is a near duplicate."""
    scrub_pii: bool = False
    """Replace e-mail addresses and phone numbers with <EMAIL> / <PHONE>."""
    dedupe: bool = True
    """Drop exact and near duplicates."""
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    """Longest accepted JSONL line."""


class FeedbackError(RuntimeError):
    """A malformed input under --on-error stop, or an unusable setting."""


def _file_report() -> dict:
    return {"records_read": 0, "formats": Counter(), "kept": dict.fromkeys(OUTPUTS, 0), "dropped": Counter()}


def _read_and_parse(path: str, cfg: FeedbackConfig, rep: dict, errors: list[str]) -> dict[str, list[dict]]:
    """Phase 1 for one input: candidate records per output; malformed ones are counted (skip) or raised (stop)."""
    def fail(where: str, msg: str) -> None:
        if cfg.on_error == "stop":
            raise FeedbackError(f"{where}: {msg}")
        rep["dropped"]["malformed record"] += 1
        errors.append(f"{where}: {msg}")

    size = os.path.getsize(path) if os.path.isfile(path) else 0
    rows = []
    for where, obj, err in tqdm(read_rows(path, cfg.max_line_bytes), desc=os.path.basename(path), unit=" rec",
                                disable=size < 2**20, file=sys.stderr):
        rep["records_read"] += 1
        if err:
            fail(where, err)
        else:
            rows.append((where, obj))
    out = {name: [] for name in OUTPUTS}
    for fmt, p in parse_rows(rows, cfg.format):
        if p.error:
            fail(p.where, p.error)
            continue
        rep["formats"][fmt] += 1
        rep["dropped"].update(p.dropped)
        out["pairs"] += p.pairs
        out["unpaired"] += p.singles
        out["sft"] += [{"messages": s["prompt"] + s["completion"]} for s in p.singles if s["label"]]
    return out


def _decontaminator(cfg: FeedbackConfig) -> Decontaminator | None:
    """Evaluation texts from --decontaminate files; any problem in them stops the run (a silently skipped eval
    record would let contamination through)."""
    if not cfg.decontaminate:
        return None
    texts = []
    for path in cfg.decontaminate:
        if path.removesuffix(".gz").endswith((".jsonl", ".json")):
            for where, obj, err in read_rows(path, cfg.max_line_bytes):
                if err:
                    raise FeedbackError(f"{where}: {err} (in an evaluation file)")
                texts += strings_in(obj)
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    texts += [line for line in f if line.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise FeedbackError(f"{path}: cannot read evaluation file: {e}") from e
    return Decontaminator(texts, cfg.ngram)


def import_feedback(cfg: FeedbackConfig) -> tuple[dict[str, list[dict]], dict]:
    """Phases 1-3: returns ({"sft"|"pairs"|"unpaired": records}, report); writes nothing."""
    if cfg.format != "auto" and cfg.format not in PARSERS:
        raise FeedbackError(f"unknown --format {cfg.format!r}; choose auto or one of {', '.join(PARSERS)}")
    if cfg.on_error not in ("skip", "stop"):
        raise FeedbackError(f"--on-error must be skip or stop, got {cfg.on_error!r}")
    decon = _decontaminator(cfg)
    files, errors = {}, []
    cands = {name: [] for name in OUTPUTS}  # (input path, record)
    for path in cfg.inputs:  # 1. read and parse; 2. candidates per output
        files[path] = _file_report()
        for name, recs in _read_and_parse(path, cfg, files[path], errors).items():
            cands[name] += [(path, r) for r in recs]
    outputs, dropped_total = {}, Counter()
    clean_cfg = CleanConfig(dedupe=cfg.dedupe, near_dup_threshold=cfg.near_dup_threshold, decontaminator=decon,
                            scrub_pii=cfg.scrub_pii)
    for name in OUTPUTS:  # 3. clean
        kept, dropped = clean_records(name, [r for _, r in cands[name]], clean_cfg)
        outputs[name] = [r for _, r in kept]
        for i, _ in kept:
            files[cands[name][i][0]]["kept"][name] += 1
        for i, reason in dropped:
            files[cands[name][i][0]]["dropped"][f"{name}: {reason}"] += 1
    for rep in files.values():
        dropped_total.update(rep["dropped"])
    report = {
        "records_read": sum(r["records_read"] for r in files.values()),
        "kept": {name: len(outputs[name]) for name in OUTPUTS},
        "dropped": dict(sorted(dropped_total.items())),
        "errors": len(errors),
        "error_examples": errors[:_MAX_ERROR_EXAMPLES],
        "inputs": {p: {**r, "formats": dict(r["formats"]), "dropped": dict(sorted(r["dropped"].items()))}
                   for p, r in files.items()},
        "decontamination": None if decon is None else {
            "eval_files": cfg.decontaminate, "ngram": cfg.ngram, "eval_ngrams": len(decon.grams),
            "eval_texts_too_short": decon.too_short},
        "config": asdict(cfg),
    }
    return outputs, report


def write_outputs(out_dir: str, outputs: dict[str, list[dict]], report: dict) -> None:
    """Phase 4: every file atomically (a temp file in `out_dir`, then os.replace)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FeedbackError(f"--out {out_dir} exists and is not a folder")
    for name in OUTPUTS:
        write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), outputs[name])
    write_json(os.path.join(out_dir, "report.json"), report)


def summary(report: dict, out_dir: str) -> str:
    """A few lines for the terminal; report.json has everything."""
    kept = ", ".join(f"{n} {report['kept'][n]}" for n in OUTPUTS)
    lines = [f"read {report['records_read']} records from {len(report['inputs'])} file(s)", f"kept: {kept}"]
    if report["dropped"]:
        lines.append("dropped: " + ", ".join(f"{k} {v}" for k, v in report["dropped"].items()))
    lines += [f"  {e}" for e in report["error_examples"][:5]]
    if report["errors"] > 5:
        lines.append(f"  ... {report['errors'] - 5} more malformed records in report.json")
    lines.append(f"wrote {os.path.join(out_dir, '{sft,pairs,unpaired}.jsonl')} and report.json")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> FeedbackConfig:
    ap = argparse.ArgumentParser(prog="python -m data.feedback", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", metavar="INPUT")
    ap.add_argument("--out", required=True, metavar="DIR")
    ap.add_argument("--format", default="auto", choices=["auto", *PARSERS])
    ap.add_argument("--on-error", default="skip", choices=["skip", "stop"])
    ap.add_argument("--decontaminate", nargs="+", action="extend", default=[], metavar="EVALFILE")
    ap.add_argument("--ngram", type=int, default=13)
    ap.add_argument("--near-dup-threshold", type=float, default=0.9)
    ap.add_argument("--scrub-pii", action="store_true")
    ap.add_argument("--no-dedupe", dest="dedupe", action="store_false")
    ap.add_argument("--max-line-bytes", type=int, default=DEFAULT_MAX_LINE_BYTES)
    ns = ap.parse_args(argv)
    if ns.ngram < 1 or not 0 < ns.near_dup_threshold:
        ap.error("--ngram must be >= 1 and --near-dup-threshold > 0")
    return FeedbackConfig(**vars(ns))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        outputs, report = import_feedback(cfg)
        write_outputs(cfg.out, outputs, report)
    except FeedbackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(report, cfg.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
