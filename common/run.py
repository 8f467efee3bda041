"""Run folders: one owner, one run, safe re-runs, errors in words. Every trainer gets this through `open_run`
(called by common.loop.begin_run) and the returned RunDir.

An output folder holds one run at a time:
    run.lock          the owner while a run is live (common/lock.py)
    run.json          the run's id, trainer, status (running / finished) and the config that changes its result
    config.yaml       the resolved config of the latest start
    checkpoints/      step-N/ folders of this run (meta.json names the run id), `latest`
    metrics.jsonl, tb/, *.png, final/

At start (`open_run`), with the lock held: temporaries left by a crash are swept; then
- resume true (the default): a run in the folder is resumed from its newest checkpoint, after checking that every
  config field that changes the result equals the saved one (differences are listed and refused); a finished run
  says so and exits; a folder without a run starts one.
- resume false: a folder that holds a run is refused unless `overwrite_output_dir` is set; then the old run is
  moved aside as a whole and deleted before anything new is written, so two runs never mix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import os
import re
import resource
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from common.atomic import atomic_write_json, fsync_dir, sweep_stale
from common.checkpoint import check_no_pickle, list_checkpoints, read_meta
from common.config import ConfigError, InputError, save_config
from common.failpoint import failpoint
from common.lock import LOCK_NAME, LockedError, RunLock, exit_with_parent, launched_by_launcher
from common.safestate import UnsafeStateError

RUN_JSON = "run.json"
CKPT_DIR = "checkpoints"
# What a run writes at the top of its folder: moved aside together when a run is replaced.
RUN_OUTPUTS = (RUN_JSON, CKPT_DIR, "final", "metrics.jsonl", "tb", "config.yaml", "loss.png", "curves.png",
               "ppo.png", "wandb")
# Config fields that only decide where, when and whether to save, log or stop: they may change between a run's
# starts. Every other field must equal the saved value to resume. Trainers extend this with a RESUME_MAY_CHANGE
# class attribute on their config.
RUN_CONTROL = ("output_dir", "resume", "overwrite_output_dir", "save_every", "keep_last", "stop_at_step",
               "log_every", "report_to")
# Fields whose None means "pick for me" (the log-prob chunk): resuming with None takes the saved run's value, so a run
# saved before a default changed (chunk_size 256 -> auto) resumes exactly as it ran instead of being refused.
AUTO_ON_RESUME = ("chunk_size",)


class RunRefused(ConfigError):
    """The run cannot start in this folder as asked (in use, another run there, other config, damaged state)."""


class RunFinished(RuntimeError):
    """The folder holds this run, finished: nothing to do (exit status 0)."""


class RunIOError(RuntimeError):
    """A write failed for a file-system reason (no space, permission, read-only); the message says what is intact."""


# ----------------------------------------------------------------------------------------------------------------
# File-system errors in words.

_WORDS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
          errno.EFBIG: "file too large for the file system or the file-size limit (ulimit -f)",
          errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system"}
_TEXTS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
          "File too large": errno.EFBIG, "Permission denied": errno.EACCES, "Read-only file system": errno.EROFS}


def fs_errno(exc: BaseException, folder: str | Path | None = None) -> int | None:
    """The file-system errno behind `exc` (an OSError, safetensors' error text, or torch's zip-writer failure),
    following its cause chain; None if it is not one we put in words."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _WORDS:
            return exc.errno
        text = str(exc)
        m = re.search(r"os error (\d+)", text)
        if m and int(m.group(1)) in _WORDS:
            return int(m.group(1))
        for words, code in _TEXTS.items():
            if words in text:
                return code
        if "inline_container" in text or "PytorchStreamWriter" in text:  # torch.save hides the errno
            return _probe_full(folder)
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _probe_full(folder) -> int | None:
    if folder is not None:
        with contextlib.suppress(OSError):
            st = os.statvfs(folder)
            if st.f_bavail * st.f_frsize < 64 * 1024**2:
                return errno.ENOSPC
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return errno.EFBIG
    return None


def fs_words(exc: BaseException, folder=None) -> str | None:
    code = fs_errno(exc, folder)
    return None if code is None else _WORDS[code]


# ----------------------------------------------------------------------------------------------------------------
def config_values(c) -> dict[str, Any]:
    """The config as JSON values (tuples become lists), as saved in run.json."""
    return json.loads(json.dumps(dataclasses.asdict(c)))


def resume_may_change(c) -> tuple[str, ...]:
    return tuple(getattr(type(c), "RESUME_MAY_CHANGE", RUN_CONTROL))


def adopt_saved_autos(saved: dict, c) -> dict[str, Any]:
    """Set each AUTO_ON_RESUME field of `c` that is None to the saved run's value (if it had one); returns them."""
    adopted = {k: saved[k] for k in AUTO_ON_RESUME
               if hasattr(c, k) and getattr(c, k) is None and saved.get(k) is not None}
    for k, v in adopted.items():
        setattr(c, k, v)
    return adopted


def config_differences(saved: dict, c) -> list[str]:
    """'field: saved -> now' for every field that changes the result and differs from the saved config. A field
    the saved config lacks (added in a later version) counts only if it is not at its default."""
    now, may = config_values(c), set(resume_may_change(c))
    defaults = {}
    for f in dataclasses.fields(c):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    diffs = []
    for k, v in now.items():
        if k in may:
            continue
        if k not in saved:
            if k in defaults and json.loads(json.dumps(defaults[k])) == v:
                continue
            diffs.append(f"{k}: (not set) -> {v!r}")
        elif saved[k] != v:
            diffs.append(f"{k}: {saved[k]!r} -> {v!r}")
    return diffs


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RunDir:
    """The run a trainer is in: its folder, id, resume point and lock; writes checkpoints and ends the run."""
    out: Path
    kind: str
    run_id: str
    resume_dir: Path | None
    is_main: bool
    lock: RunLock | None = None
    last_ckpt: Path | None = None
    log: Any = None  # the MetricsLogger opened by metrics()
    notes: list[str] = field(default_factory=list)
    report_to: str | None = "tensorboard"  # the config's report_to: trackers besides metrics.jsonl
    config: dict | None = None  # the run's config values, for the trackers

    @property
    def ckpt_root(self) -> Path:
        return self.out / CKPT_DIR

    def metrics(self, tensorboard: bool = True):
        """Open metrics.jsonl + the report_to trackers (TensorBoard by default) for this run: a fresh file, or
        (resuming) the file cut back to the rows logged before the resumed checkpoint (a torn last line cut)."""
        from common.metrics import MetricsLogger

        meta = read_meta(self.resume_dir) if self.resume_dir is not None else None
        self.log = MetricsLogger(self.out, enabled=self.is_main, tensorboard=tensorboard,
                                 resume_step=None if meta is None else meta["step"],
                                 resume_rows=None if meta is None else meta.get("metrics_rows"),
                                 report_to=self.report_to, kind=self.kind, run_id=self.run_id, config=self.config)
        return self.log

    def check_weights(self, acc, step: int, optimizer, full: bool = False) -> None:
        """NaN guard on the optimizer step's result: every rank counts its non-finite weight tensors (under ZeRO its
        partitions), the counts are summed, and all ranks stop together. After a step it looks at what the step
        changed (common.guard.stepped_tensors); `full` (before a checkpoint) at every tensor whole."""
        from common.guard import check_finite_weights, nonfinite_tensors, optimizer_params, stepped_tensors
        from common.loop import sum_over_ranks

        params = optimizer_params(optimizer) if full else stepped_tensors(optimizer)
        bad, total = sum_over_ranks(acc, [float(nonfinite_tensors(params)), float(len(params))])
        check_finite_weights(step, int(bad), int(total), self.last_ckpt)

    def save(self, acc, step: int, save_model: Callable[[Path], None], optimizer, scheduler,
             train_state: dict[str, Any], keep_last: int, engines: dict | None = None) -> Path | None:
        """Checkpoint `step` of this run (common.loop.save_run_checkpoint) after checking the weights it holds are
        finite. A file-system failure becomes RunIOError naming the step and the checkpoint that is intact."""
        from common.loop import save_run_checkpoint

        self.check_weights(acc, step, optimizer, full=True)
        rows = self.log.rows if self.log is not None else None
        try:
            path = save_run_checkpoint(acc, self.ckpt_root, step, save_model, optimizer, scheduler, train_state,
                                       keep_last, run_id=self.run_id, meta={"metrics_rows": rows}, engines=engines)
        except Exception as e:
            words = fs_words(e, self.ckpt_root)
            if words is None:
                raise
            raise RunIOError(f"{words} writing checkpoint step {step} in {self.ckpt_root}; {self._intact()}") \
                from None
        self.last_ckpt = path or self.last_ckpt
        return path

    def _intact(self) -> str:
        last = self.last_ckpt
        if last is None:
            return "no checkpoint of this run had been written yet"
        return (f"the previous checkpoint step {int(last.name.split('-')[1])} is intact ({last}); free space and "
                f"rerun the same command to resume from it")

    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """Wrap a write outside a checkpoint (the final model, plots): a file-system failure becomes one line."""
        try:
            yield
        except Exception as e:
            words = fs_words(e, self.out)
            if words is None:
                raise
            raise RunIOError(f"{words} writing {what} in {self.out}; {self._intact()}") from None

    def end(self, acc, finished: bool) -> None:
        """Every rank: wait for the others; the main process marks a finished run in run.json and frees the lock."""
        acc.wait_for_everyone()
        if not self.is_main:
            return
        if finished:
            failpoint("final.written")
            info = read_run_json(self.out) or {}
            step = read_meta(self.last_ckpt)["step"] if self.last_ckpt is not None else None
            with self.writing("run.json"):
                atomic_write_json(self.out / RUN_JSON, info | {"status": "finished", "step": step})
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def read_run_json(out: Path) -> dict | None:
    path = out / RUN_JSON
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunRefused(f"{path}: unreadable ({e}); it names the run in this folder. Use --resume false "
                         f"--overwrite_output_dir true to replace the run, or a new output_dir") from None
    if not isinstance(info, dict) or not isinstance(info.get("run_id"), str):
        raise RunRefused(f"{path}: not a run description; use --resume false --overwrite_output_dir true or a new "
                         f"output_dir")
    return info


def _replace_previous(out: Path) -> None:
    """Move everything a run wrote aside into one hidden folder (run.json first, so a crash half way leaves a folder
    that no start takes for a run), then delete it."""
    if not any((out / name).exists() or (out / name).is_symlink() for name in RUN_OUTPUTS):
        return
    aside = out / f".replaced-{secrets.token_hex(4)}.deleting"
    aside.mkdir()
    moved = 0
    for name in RUN_OUTPUTS:
        if (out / name).exists() or (out / name).is_symlink():
            os.rename(out / name, aside / name)
            moved += 1
            fsync_dir(out)
            if moved == 1:
                failpoint("replace.partial")
    shutil.rmtree(aside, ignore_errors=True)


def _describe_run(info: dict, ckpts: list[Path], out: Path) -> str:
    at = f"checkpoint step {read_meta(ckpts[-1])['step']}" if ckpts else "no checkpoint"
    status = "finished" if info.get("status") == "finished" else at
    return f"{info.get('trainer', '?')} run {info['run_id']} ({status})"


def _prepare(out: Path, c, kind: str, say: Callable[[str], None]) -> tuple[str, Path | None, RunLock]:
    """Main process: lock, sweep, decide fresh / resume / refuse. Returns (run id, checkpoint to resume, lock)."""
    if out.exists() and not out.is_dir():
        raise RunRefused(f"output_dir {out} is a file, not a folder; give a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out / LOCK_NAME)
        note = lock.acquire()
    except LockedError as e:
        raise RunRefused(str(e)) from None
    except OSError as e:
        words = fs_words(e, out.parent) or e.strerror
        raise RunIOError(f"{words}: cannot create or lock output_dir {out}") from None
    try:
        if note:
            say(f"[run] {out}: {note}")
        n, size = sweep_stale(out)
        m, size2 = sweep_stale(out / CKPT_DIR)
        if n + m:
            say(f"[run] removed {n + m} temporary file(s)/folder(s) ({(size + size2) / 1e6:.1f} MB) left by an "
                f"interrupted run in {out}")
        return (*_decide(out, c, kind, say), lock)
    except BaseException:
        lock.release()
        raise


def _decide(out: Path, c, kind: str, say) -> tuple[str, Path | None]:
    info = read_run_json(out)
    all_ckpts = list_checkpoints(out / CKPT_DIR)
    mine = [d for d in all_ckpts if info and read_meta(d).get("run_id") == info["run_id"]]
    others = [d for d in all_ckpts if d not in mine]
    final = (out / "final").exists()
    used = bool(info and (mine or info.get("status") == "finished" or final))
    foreign = bool(others or (final and not used))
    replace = "--resume false --overwrite_output_dir true"
    if c.resume and used:
        if info.get("trainer") != kind:
            raise RunRefused(f"output_dir {out} holds a {info.get('trainer')} run, not a {kind} run; use a new "
                             f"output_dir (or {replace} to delete that run)")
        for k, v in adopt_saved_autos(info.get("config", {}), c).items():
            say(f"[run] {k}: the saved run's {v!r} (not set now, so the run resumes as it ran)")
        diffs = config_differences(info.get("config", {}), c)
        if diffs:
            raise RunRefused(f"output_dir {out} holds {_describe_run(info, mine, out)} made with another config: "
                             + "; ".join(diffs) + f". Resuming would mix two configs: rerun with the saved values "
                             f"({out / RUN_JSON}), or start over with {replace}, or use a new output_dir")
        if info.get("status") == "finished":
            raise RunFinished(f"output_dir {out} holds a finished {kind} run ({info['run_id']}, step "
                              f"{info.get('step')}; final model in {out / 'final'}); nothing to do. To train again "
                              f"use {replace} or a new output_dir")
        if not mine:
            raise RunRefused(f"output_dir {out} holds {kind} run {info['run_id']} with final/ but no checkpoint to "
                             f"resume from; use {replace} or a new output_dir")
        if others:
            say(f"[run] ignoring {len(others)} checkpoint(s) of other runs in {out / CKPT_DIR}")
        check_no_pickle(mine[-1], allow_under="deepspeed")  # before any loader looks into it
        say(f"[run] resuming {kind} run {info['run_id']} from {mine[-1]}")
        return info["run_id"], mine[-1]
    if c.resume and foreign:
        raise RunRefused(f"output_dir {out} holds files of another run ({', '.join(d.name for d in others[:3])}"
                         f"{' final/' if final else ''}) without a run.json naming them (written by an older "
                         f"version, or a replace was interrupted); use {replace} to delete them, or a new output_dir")
    if used or foreign:
        if not getattr(c, "overwrite_output_dir", False):
            what = _describe_run(info, mine, out) if used else "files of another run"
            raise RunRefused(f"output_dir {out} holds {what}; --resume false would start a new run on top of it. "
                             f"Add --overwrite_output_dir true to delete it first, or resume it with --resume true, "
                             f"or use a new output_dir")
        say(f"[run] deleting the previous run in {out} (--overwrite_output_dir)")
    _replace_previous(out)  # also clears what a run that never reached a checkpoint left
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    atomic_write_json(out / RUN_JSON, {"run_id": run_id, "trainer": kind, "status": "running",
                                       "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                                       "config": config_values(c)})
    say(f"[run] new {kind} run {run_id} in {out}")
    return run_id, None


def open_run(acc, c, kind: str) -> RunDir:
    """Phase 1 of every trainer, after the accelerator: the main process takes the folder's lock, sweeps, checks
    and decides; every rank gets the same decision (or the same error). `c` needs output_dir and resume
    (overwrite_output_dir optional). Raises RunRefused, RunFinished or RunIOError."""
    from common.metrics import parse_report_to

    out = Path(c.output_dir)
    report_to = getattr(c, "report_to", "tensorboard")
    parse_report_to(report_to)  # an unknown or missing tracker is a config error now, not after the model loads
    decision, lock = None, None
    if launched_by_launcher():
        exit_with_parent()
    if acc.is_main_process:
        try:
            run_id, resume_dir, lock = _prepare(out, c, kind, lambda s: print(s, flush=True))
            save_config(c, out / "config.yaml")
            decision = {"run_id": run_id, "resume": None if resume_dir is None else str(resume_dir),
                        "adopted": {k: getattr(c, k) for k in AUTO_ON_RESUME if hasattr(c, k)}}
        except (RunRefused, RunFinished, RunIOError, UnsafeStateError) as e:
            decision = {"error": type(e).__name__, "message": str(e)}
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        decision = broadcast_object_list([decision])[0]
    if "error" in decision:
        raise {"RunRefused": RunRefused, "RunFinished": RunFinished, "RunIOError": RunIOError,
               "UnsafeStateError": UnsafeStateError}[decision["error"]](decision["message"])
    for k, v in decision["adopted"].items():  # the other ranks take what the main process adopted
        setattr(c, k, v)
    resume = None if decision["resume"] is None else Path(decision["resume"])
    return RunDir(out, kind, decision["run_id"], resume, acc.is_main_process, lock=lock, last_ckpt=resume,
                  report_to=report_to, config=dataclasses.asdict(c) if dataclasses.is_dataclass(c) else None)


# ----------------------------------------------------------------------------------------------------------------
def run_main(cls, train: Callable, argv: list[str] | None = None) -> None:
    """An entry point's main: parse the config, train, and turn the errors a user can act on into one paragraph
    (config, input data and refusals: exit 2; a finished run: its message, exit 0; file system, NaN: exit 1).

    Under a launcher with several processes every rank meets the same config or input error; the main process
    prints it, the others print theirs only if they are still running a few seconds later (the launcher stops them
    once the main process has exited), so the message is shown once."""
    from common.config import parse_config
    from common.guard import NonFiniteLossError
    from common.safestate import UnsafeStateError

    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        config = parse_config(cls, argv)
    except ConfigError as e:
        code, text = 2, f"config error: {e}"
    else:
        try:
            train(config)
            return
        except RunFinished as e:
            code, text = 0, str(e)
        except (RunRefused, UnsafeStateError) as e:
            code, text = 2, f"run error: {e}"
        except ConfigError as e:
            code, text = 2, f"config error: {e}"
        except InputError as e:
            code, text = 2, f"input error: {e}"
        except (RunIOError, NonFiniteLossError) as e:
            code, text = 1, f"error: {e}"
        except OSError as e:
            words = fs_words(e)
            if words is None:
                raise
            code, text = 1, f"error: {words}: {e.filename or e}"
    import gc

    gc.collect()  # the trainer's frames go now: a progress bar left open draws its last line before ours
    if code == 2 and not main_rank:
        import time

        time.sleep(5)  # the main process prints this error (and the launcher then stops this one)
    if main_rank or code:
        print(text, file=sys.stderr if code else sys.stdout, flush=True)
    raise SystemExit(code)
