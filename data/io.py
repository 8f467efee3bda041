"""Reading JSON / JSONL inputs with errors that name file and line, and atomic JSON / JSONL writing.

Reading never raises for one bad record: `read_rows` yields `(where, obj, error)` so the caller decides whether to
skip or stop. Whole-file problems (missing file, broken gzip, an invalid JSON document) come out as one error row.
Writing goes to a temp file in the destination folder and is moved into place with `os.replace`, so a crash or a
Ctrl-C never leaves a half-written output behind.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from typing import IO, Any

from common.atomic import atomic_open  # noqa: F401  (the one atomic writer; re-exported for data/ users)

DEFAULT_MAX_LINE_BYTES = 16 * 2**20  # a 16 MiB JSONL line is far beyond any real chat; larger is a broken export
_BLOCK = 2**20


class InputError(ValueError):
    """Bad input; the message names the file, line or record and what is wrong."""


def open_binary(path: str) -> IO[bytes]:
    """Open `path` for binary reading, transparently decompressing `.gz`."""
    if str(path).endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _peek_first_byte(f: IO[bytes]) -> bytes:
    """First non-whitespace byte of the file (after a UTF-8 BOM), without consuming anything useful."""
    head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    return head[:1]


def read_rows(path: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[str, Any, str | None]]:
    """Yield `(where, obj, error)` for every record of a JSONL file or a JSON document (array -> its items).

    .jsonl is JSONL and .json a JSON document (either may be .gz); other names are sniffed ('[' -> document).
    `where` is "path:LINE" for JSONL and "path[i]" for items of a JSON array; `error` is None or says what is wrong
    with that record (then `obj` is None). Blank JSONL lines are skipped. A file that is empty or holds only
    whitespace is an error: that is what a failed export looks like, and it should not pass silently.
    """
    try:
        with open_binary(path) as f:
            first = _peek_first_byte(f)
    except (OSError, EOFError, zlib.error) as e:
        yield str(path), None, f"cannot read file: {e}"
        return
    if not first:
        yield str(path), None, "file is empty (no records)"
        return
    name = str(path).removesuffix(".gz")
    if name.endswith(".json") or (first == b"[" and not name.endswith(".jsonl")):  # extension first, then sniff
        yield from _read_json_document(path)
    else:
        yield from _read_jsonl(path, max_line_bytes)


def _read_json_document(path: str) -> Iterator[tuple[str, Any, str | None]]:
    """Items of a JSON array file (Open WebUI and Label Studio export one array); a lone object is one record."""
    with open_binary(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield str(path), None, f"invalid UTF-8 at byte {e.start}"
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        yield f"{path}:{e.lineno}", None, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        return
    if not isinstance(doc, list):
        yield str(path), doc, None  # one object: a single record
        return
    for i, item in enumerate(doc):
        yield f"{path}[{i}]", item, None


def _read_jsonl(path: str, max_line_bytes: int) -> Iterator[tuple[str, Any, str | None]]:
    """JSONL records; lines longer than `max_line_bytes` are rejected without reading them into memory."""
    try:
        with open_binary(path) as f:
            lineno = 0
            while True:
                line = f.readline(max_line_bytes + 1)
                if not line:
                    return
                lineno += 1
                where = f"{path}:{lineno}"
                if len(line) > max_line_bytes and not line.endswith(b"\n"):
                    n = len(line) + _skip_rest_of_line(f)
                    yield where, None, (f"line is {n:,} bytes, over the limit of {max_line_bytes:,} "
                                        f"(raise --max-line-bytes if this is intended)")
                    continue
                yield from _parse_line(where, line, lineno == 1)
    except (OSError, EOFError, zlib.error) as e:
        yield str(path), None, f"cannot read file: {e}"


def _skip_rest_of_line(f: IO[bytes]) -> int:
    """Consume the rest of an over-long line block by block; returns how many bytes were skipped."""
    n = 0
    while True:
        block = f.readline(_BLOCK)
        n += len(block)
        if not block or block.endswith(b"\n"):
            return n


def _parse_line(where: str, line: bytes, first: bool) -> Iterator[tuple[str, Any, str | None]]:
    if first:
        line = line.removeprefix(b"\xef\xbb\xbf")
    if not line.strip():
        return
    try:
        text = line.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError as e:
        yield where, None, f"invalid UTF-8 at byte {e.start} of the line"
        return
    try:
        yield where, json.loads(text), None
    except json.JSONDecodeError as e:
        yield where, None, f"invalid JSON at column {e.colno}: {e.msg}"


def write_jsonl(path: str, records: Iterable[dict]) -> int:
    """Atomically write one JSON object per line (UTF-8, not ASCII-escaped); returns the number of records."""
    n = 0
    with atomic_open(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: str, obj: Any) -> None:
    """Atomically write one indented JSON document."""
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
