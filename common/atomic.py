"""Atomic file and directory writes: a reader sees the old complete file or the new complete file, never half of one.

Write to a temporary name in the same directory (same filesystem), fsync, then `os.replace` / `os.rename`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from common.failpoint import failpoint


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it survives a crash."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file handle ("w" text UTF-8, or "wb") whose content appears at `path` only if the block finishes without
    an exception; otherwise the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def fsync_tree(root: str | Path, fix_modes: bool = False) -> None:
    """fsync every file and directory under `root` (before renaming it into place). fix_modes: give every file
    0666 and every folder 0777 minus the umask (some writers, safetensors for one, create files 0600)."""
    umask = current_umask()
    for dirpath, _, filenames in os.walk(root):
        if fix_modes:
            os.chmod(dirpath, 0o777 & ~umask)
        for name in filenames:
            if fix_modes:
                os.chmod(os.path.join(dirpath, name), 0o666 & ~umask)
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success fsync it and rename it to `path` (replacing an old one).

    If the body raises, the temporary directory is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        fsync_tree(tmp, fix_modes=True)  # mkdtemp makes 0700: a serving account could not read an export
        failpoint(f"atomic_dir:{path.name}")
        if path.exists():  # replace: move the old one aside first, delete it only after the rename
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_dir(path: str | Path) -> None:
    """Delete a folder so that no reader ever sees it half deleted under its name: rename it to a hidden
    `.<name>.<random>.deleting` sibling first (one atomic step), then delete that. A crash in between leaves only
    the hidden folder, which `sweep_stale` removes."""
    path = Path(path)
    gone = path.with_name(f".{path.name}.{secrets.token_hex(4)}.deleting")
    os.rename(path, gone)
    fsync_dir(path.parent)
    step = re.fullmatch(r"step-(\d+)", path.name)
    failpoint("prune", int(step.group(1)) if step else None)
    shutil.rmtree(gone, ignore_errors=True)


_STALE = re.compile(r"^\..+\.(tmp|deleting)$")


def sweep_stale(folder: str | Path) -> tuple[int, int]:
    """Remove what interrupted writes leave in `folder` (not recursive): `.<name>.*.tmp` files and folders of
    atomic writes, `.<name>.*.deleting` folders of interrupted deletes. A `.<name>.old` left by a crash inside
    atomic_dir's replace is put back when <name> is missing (it is the complete previous version), else deleted.
    Call only while holding the folder's run lock. Returns (entries removed, bytes freed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0, 0
    n, size = 0, 0
    for p in folder.iterdir():
        name = p.name
        if name.startswith(".") and name.endswith(".old") and len(name) > 5:
            live = p.with_name(name[1:-4])
            if not live.exists():
                os.rename(p, live)
                continue
        elif not _STALE.match(name):
            continue
        size += _tree_size(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        n += 1
    if n:
        fsync_dir(folder)
    return n, size


def _tree_size(p: Path) -> int:
    if not p.is_dir() or p.is_symlink():
        return p.lstat().st_size
    return sum(f.lstat().st_size for f in p.rglob("*") if not f.is_dir())
