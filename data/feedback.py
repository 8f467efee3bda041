"""Import exported user feedback into SFT, preference-pair and unpaired (KTO) training files.

    python -m data.feedback INPUT... --out DIR [--format auto|openwebui|...] [--on-error skip|stop]
        [--decontaminate EVALFILE ...] [--ngram 13] [--near-dup-threshold 0.9] [--scrub-pii] [--no-dedupe]

Phases: 1. read and parse every input (data/io.py, data/formats.py), 2. turn parsed feedback into rows of the three
outputs, 3. clean each output (data/clean.py), 4. the trainers' own validation (data.datasets.prepare_record), so
every row written loads in every trainer, 5. account for every input record, 6. write sft.jsonl, pairs.jsonl,
unpaired.jsonl and report.json into a temporary folder that then replaces DIR as a whole.

sft.jsonl holds the positively rated replies (Taiwan-LLM's "feedback SFT" set) with the conversation before them:
the rated reply's assistant messages carry "weight": 1 and earlier assistant messages "weight": 0, so the default
training learns the rated reply alone. pairs.jsonl holds the preferences, unpaired.jsonl every single rating.

Accounting (report.json, per input file and in total): records read = kept + dropped + malformed. A record is kept
when a written row was built from it (as the rated message, or as context: a tree's earlier messages); dropped when
valid but nothing written uses it, with one reason (a tie, "pairs: duplicate", ...); malformed when it cannot be
read or parsed, with file:line (or file[index] and its id). Rows removed by cleaning are also counted by output.

Exit status: 0 written; 2 written, but an input could not be read (entirely or to its end), named on stderr;
1 nothing written: --on-error stop hit a bad record, nothing was kept, or --out cannot be written. A usage error
(unknown flag, bad value) is one `config error:` line and exit status 2, before anything is read.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from common.config import ArgumentParser
from data.clean import CleanConfig, Decontaminator, clean_records, strings_in
from data.datasets import prepare_record
from data.formats import PARSERS, Parsed, parse_rows
from data.io import DEFAULT_MAX_LINE_BYTES, FileError, read_rows, write_json, write_jsonl

OUTPUTS = ("sft", "pairs", "unpaired")
FILES = tuple(f"{name}.jsonl" for name in OUTPUTS) + ("report.json",)
_KIND = {"sft": "sft", "pairs": "preference", "unpaired": "unpaired"}  # output -> data.datasets record kind
_MAX_ERROR_EXAMPLES = 50
NO_USE = "no feedback of its own, and no kept row uses it"


@dataclass
class FeedbackConfig:
    inputs: list[str]
    """Feedback exports: .json / .jsonl, optionally .gz."""
    out: str
    """Output folder for sft.jsonl, pairs.jsonl, unpaired.jsonl and report.json (replaced as a whole)."""
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
    """A malformed input under --on-error stop, or an unusable setting; nothing is written."""


@dataclass
class _Input:
    """One input file while it is imported: its records' outcomes, keyed by the reader's where."""
    path: str
    order: list[str] = field(default_factory=list)  # record keys in reading order
    malformed: dict[str, str] = field(default_factory=dict)  # key -> error
    reasons: dict[str, list[str]] = field(default_factory=dict)  # key -> why it yields nothing / its rows dropped
    kept: set[str] = field(default_factory=set)
    formats: Counter = field(default_factory=Counter)
    rows_kept: Counter = field(default_factory=Counter)
    rows_dropped: Counter = field(default_factory=Counter)
    error: str | None = None  # a FileError: the file could not be read (entirely, or past some line)
    decoded: int = 0  # records that were JSON

    def unreadable(self) -> bool:
        return self.error is not None or self.decoded == 0


# ------------------------------------------------------------------------------------------------ 1-2. parsing
def _sft_row(single: dict) -> dict:
    """A positively rated reply as an SFT conversation: earlier assistant turns weight 0, the rated reply 1."""
    weight = lambda msgs, w: [dict(m, weight=w) if m["role"] == "assistant" else m for m in msgs]  # noqa: E731
    row = {"messages": weight(single["prompt"], 0) + weight(single["completion"], 1)}
    return {**row, "tools": single["tools"]} if single.get("tools") else row


def _candidates(p: Parsed) -> list[tuple[str, dict, tuple[str, ...]]]:
    """(output, row, keys of the records it uses) for every row of one parsed record."""
    out = [("pairs", r, (p.key, *uses)) for r, uses in zip(p.pairs, p.pair_uses)]
    for r, uses in zip(p.singles, p.single_uses):
        out.append(("unpaired", r, (p.key, *uses)))
        if r["label"]:
            out.append(("sft", _sft_row(r), (p.key, *uses)))
    return out


def _read_and_parse(inp: _Input, cfg: FeedbackConfig, errors: list[str]) -> list[tuple[str, dict, tuple]]:
    """Phases 1-2 for one input: its candidate rows; malformed records are counted (skip) or raised (stop)."""
    def fail(key: str, where: str, msg: str) -> None:
        if cfg.on_error == "stop":
            raise FeedbackError(f"{where}: {msg}")
        inp.malformed[key] = msg
        errors.append(f"{where}: {msg}")

    size = os.path.getsize(inp.path) if os.path.isfile(inp.path) else 0
    rows = []
    for where, obj, err in tqdm(read_rows(inp.path, cfg.max_line_bytes), desc=os.path.basename(inp.path),
                                unit=" rec", disable=size < 2**20, file=sys.stderr):
        if isinstance(err, FileError):
            if cfg.on_error == "stop":
                raise FeedbackError(f"{where}: {err}")
            inp.error = f"{where}: {err}"
            errors.append(inp.error)
            continue
        inp.order.append(where)
        if err:
            fail(where, where, err)
        else:
            inp.decoded += 1
            rows.append((where, obj))
    cands = []
    for fmt, p in parse_rows(rows, cfg.format):
        if p.error:
            fail(p.key, p.where, p.error)
            continue
        inp.formats[fmt] += 1
        inp.reasons[p.key] = list(p.dropped)
        cands += _candidates(p)
    return cands


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


# ---------------------------------------------------------------------------------------------- 3-4. cleaning
def _clean(cands: list[tuple[_Input, str, dict, tuple]], name: str, clean_cfg: CleanConfig) -> list[dict]:
    """Clean one output's rows, then the trainers' validation; book kept and dropped rows on their records."""
    kept, dropped = clean_records(name, [r for _, _, r, _ in cands], clean_cfg)
    out = []
    for i, rec in kept:
        try:
            rec, reason = prepare_record(rec, _KIND[name], f"{name} row")
        except ValueError as e:  # a parser let through what the trainers refuse: a bug, but never a lost run
            rec, reason = None, f"not trainable: {e}"
        if reason:
            dropped.append((i, reason))
            continue
        inp, _, _, uses = cands[i]
        inp.kept.update(uses)
        inp.rows_kept[name] += 1
        out.append(rec)
    for i, reason in dropped:
        inp, key, _, _ = cands[i]
        inp.rows_dropped[f"{name}: {reason}"] += 1
        inp.reasons.setdefault(key, []).append(f"{name}: {reason}")
    return out


# -------------------------------------------------------------------------------------------- 5. accounting
def _file_report(inp: _Input) -> dict:
    """records read = kept + dropped + malformed, with the reason of each dropped record."""
    dropped = Counter()
    for key in inp.order:
        if key in inp.malformed or key in inp.kept:
            continue
        reasons = inp.reasons.get(key, [])
        rank = {"pairs": 0, "unpaired": 1, "sft": 2}  # a parser's reason first, then the most telling output
        reasons = sorted(reasons, key=lambda r: rank.get(r.split(":")[0], -1))
        dropped[reasons[0] if reasons else NO_USE] += 1
    counts = {"read": len(inp.order), "kept": sum(k in inp.kept and k not in inp.malformed for k in inp.order),
              "dropped": sum(dropped.values()), "malformed": len(inp.malformed)}
    assert counts["read"] == counts["kept"] + counts["dropped"] + counts["malformed"], counts
    return {"records": counts, "dropped": dict(sorted(dropped.items())), "kept": {n: inp.rows_kept[n] for n in OUTPUTS},
            "rows_dropped": dict(sorted(inp.rows_dropped.items())), "formats": dict(inp.formats), "error": inp.error}


def _total(files: dict[str, dict]) -> dict:
    total = {"records": Counter(), "dropped": Counter(), "kept": Counter(), "rows_dropped": Counter()}
    for rep in files.values():
        for k in total:
            total[k].update(rep[k])
    return {"records": {k: total["records"][k] for k in ("read", "kept", "dropped", "malformed")},
            "dropped": dict(sorted(total["dropped"].items())), "kept": {n: total["kept"][n] for n in OUTPUTS},
            "rows_dropped": dict(sorted(total["rows_dropped"].items()))}


def import_feedback(cfg: FeedbackConfig) -> tuple[dict[str, list[dict]], dict]:
    """Phases 1-5: returns ({"sft"|"pairs"|"unpaired": rows}, report); writes nothing."""
    if cfg.format != "auto" and cfg.format not in PARSERS:
        raise FeedbackError(f"unknown --format {cfg.format!r}; choose auto or one of {', '.join(PARSERS)}")
    if cfg.on_error not in ("skip", "stop"):
        raise FeedbackError(f"--on-error must be skip or stop, got {cfg.on_error!r}")
    decon = _decontaminator(cfg)
    inputs, errors = [_Input(path) for path in cfg.inputs], []
    cands = {name: [] for name in OUTPUTS}  # (input, record key, row, keys of the records the row uses)
    for inp in inputs:  # 1-2. read, parse, rows per output
        for name, row, uses in _read_and_parse(inp, cfg, errors):
            cands[name].append((inp, uses[0], row, uses))
    clean_cfg = CleanConfig(dedupe=cfg.dedupe, near_dup_threshold=cfg.near_dup_threshold, decontaminator=decon,
                            scrub_pii=cfg.scrub_pii)
    outputs = {name: _clean(cands[name], name, clean_cfg) for name in ("pairs", "unpaired", "sft")}  # 3-4.
    outputs = {name: outputs[name] for name in OUTPUTS}
    files = {}
    for inp in inputs:  # 5. the same path given twice is one entry: its counts add up
        rep = _file_report(inp)
        files[inp.path] = rep if inp.path not in files else _total({0: files[inp.path], 1: rep}) | {
            "formats": dict(Counter(files[inp.path]["formats"]) + Counter(rep["formats"])), "error": rep["error"]}
    report = {
        **_total(files),
        "unreadable_inputs": [inp.path for inp in inputs if inp.unreadable()],
        "errors": len(errors),
        "error_examples": errors[:_MAX_ERROR_EXAMPLES],
        "inputs": files,
        "decontamination": None if decon is None else {
            "eval_files": cfg.decontaminate, "ngram": cfg.ngram, "eval_ngrams": len(decon.grams),
            "eval_texts_too_short": decon.too_short},
        "config": asdict(cfg),
    }
    return outputs, report


# ---------------------------------------------------------------------------------------------------- 6. output
def check_out_dir(out_dir: str) -> None:
    """--out must be a folder this command may replace: new, empty, or holding only its own files."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise FeedbackError(f"--out {out_dir} is a file, not a folder")
    if any(p.exists() and not p.is_dir() for p in path.parents):
        raise FeedbackError(f"--out {out_dir}: {next(p for p in path.parents if p.exists() and not p.is_dir())} "
                            f"is a file, not a folder")
    if path.is_dir():
        try:
            others = sorted(set(os.listdir(path)) - set(FILES))
        except OSError as e:
            raise FeedbackError(f"--out {out_dir}: cannot list the folder: {e.strerror or e}") from None
        if others:
            raise FeedbackError(f"--out {out_dir} holds files this command did not write ({', '.join(others[:5])}"
                                f"{', ...' if len(others) > 5 else ''}); it replaces the whole folder, so give it a "
                                f"new or empty folder")


def write_outputs(out_dir: str, outputs: dict[str, list[dict]], report: dict) -> None:
    """Phase 6: all four files into a temporary sibling folder, which then replaces `out_dir` (common.atomic)."""
    from common.atomic import atomic_dir

    check_out_dir(out_dir)
    try:
        with atomic_dir(Path(out_dir).resolve()) as tmp:
            for name in OUTPUTS:
                write_jsonl(os.path.join(tmp, f"{name}.jsonl"), outputs[name])
            write_json(os.path.join(tmp, "report.json"), report)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise FeedbackError(f"cannot write --out {out_dir}{where}: {e.strerror or e}") from None


def summary(report: dict, out_dir: str | None) -> str:
    """A few lines for the terminal; report.json has everything."""
    rec, kept = report["records"], ", ".join(f"{n} {report['kept'][n]}" for n in OUTPUTS)
    lines = [f"read {rec['read']} records from {len(report['inputs'])} file(s): kept {rec['kept']}, dropped "
             f"{rec['dropped']}, malformed {rec['malformed']}", f"rows written: {kept}"]
    if report["dropped"]:
        lines.append("dropped: " + ", ".join(f"{k} {v}" for k, v in report["dropped"].items()))
    lines += [f"  {e}" for e in report["error_examples"][:5]]
    if report["errors"] > 5:
        lines.append(f"  ... {report['errors'] - 5} more errors in report.json")
    if out_dir is not None:
        lines.append(f"wrote {os.path.join(out_dir, '{sft,pairs,unpaired}.jsonl')} and report.json")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> FeedbackConfig:
    ap = ArgumentParser(prog="python -m data.feedback", description=__doc__.split("\n\n")[0],
                        epilog="Exit status: 0 written; 2 written, but an input could not be read (or a usage "
                               "error: one `config error:` line, nothing done); 1 nothing written.")
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
        check_out_dir(cfg.out)  # before the work, so a typo in --out costs nothing
        outputs, report = import_feedback(cfg)
        if not any(outputs.values()):
            print(summary(report, None), file=sys.stderr)
            raise FeedbackError(f"nothing kept from {len(cfg.inputs)} input(s); {cfg.out} was left as it was")
        write_outputs(cfg.out, outputs, report)
    except FeedbackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(report, cfg.out))
    if report["unreadable_inputs"]:
        print("error: could not read " + "; ".join(report["inputs"][p]["error"] or f"{p}: no record is JSON"
                                                   for p in report["unreadable_inputs"])
              + " (the other inputs were written)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
