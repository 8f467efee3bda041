"""One owner per output folder, and no trainer outliving its launcher.

`RunLock(folder / "run.lock")` takes an exclusive `flock` on the file and writes the owner (pid, host, start time,
command) into it. The kernel drops the lock when the owner dies however it dies (kill -9 included), so a dead
owner's lock is simply taken over; a live one's is refused with a message naming it. The file is never deleted or
replaced (that would let two processes lock two different files of one name); its content is cleared on release.
Where the file system has no flock (some network or FUSE mounts), the pid and host in the file decide: a live pid
on this host keeps the lock, anything else is taken over.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
import weakref
from pathlib import Path

LOCK_NAME = "run.lock"
_HELD: "weakref.WeakValueDictionary[str, RunLock]" = weakref.WeakValueDictionary()  # this process's locks by path


class LockedError(RuntimeError):
    """Another live process owns the folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(owner: dict) -> str:
    if not owner:
        return "an unknown process"
    cmd = " ".join(owner.get("argv", []))
    return (f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"
            + (f" ({cmd[:200]})" if cmd else ""))


class RunLock:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def read_owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def acquire(self) -> str | None:
        """Take the lock. Returns a note when a dead owner's lock was taken over; raises LockedError naming the
        owner while a live run holds it."""
        key = str(self.path.resolve())
        old = _HELD.pop(key, None)
        if old is not None:  # an earlier run in this process ended without releasing (an exception): it is over
            old.release()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        previous = self.read_owner()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise LockedError(f"{self.path.parent} is in use by another run: {_describe(self.read_owner())}. "
                                  f"Wait for it to end or stop it, or use another output_dir") from None
            # no flock here: fall back to the pid and host written in the file
            if previous.get("host") == socket.gethostname() and isinstance(previous.get("pid"), int) \
                    and previous["pid"] != os.getpid() and _pid_alive(previous["pid"]):
                os.close(fd)
                raise LockedError(f"{self.path.parent} is in use by another run: {_describe(previous)}. Wait for "
                                  f"it to end or stop it, or use another output_dir") from None
        self._fd = fd
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)
        _HELD[key] = self
        if previous.get("pid") and previous.get("pid") != os.getpid():
            return f"took over the lock of {_describe(previous)}, which is no longer running"
        return None

    def __del__(self):  # a run that raised in a notebook frees the folder once its objects are gone
        try:
            self.release()
        except Exception:
            pass

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        _HELD.pop(str(self.path.resolve()), None)


# ----------------------------------------------------------------------------------------------------------------
def launched_by_launcher() -> bool:
    """True under `accelerate launch` or torchrun (their environment), where the launcher is this process's parent."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ


def exit_with_parent(sig: int = signal.SIGTERM, poll_s: float = 1.0) -> None:
    """Make this process get `sig` when its parent dies (a killed `accelerate launch` must not leave an orphan
    trainer holding the GPUs and the output folder). Linux: prctl(PR_SET_PDEATHSIG); elsewhere a daemon thread
    that polls the parent pid. If the parent is already gone, exit now."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            _poll_parent(parent, sig, poll_s)
    else:
        _poll_parent(parent, sig, poll_s)
    if parent == 1 or not _pid_alive(parent):  # died before the request above took effect
        os.kill(os.getpid(), sig)


def _poll_parent(parent: int, sig: int, poll_s: float) -> None:
    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
