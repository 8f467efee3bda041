"""Reading JSON / JSONL inputs with errors that name file and line, and atomic JSON / JSONL writing.

Reading never raises, whatever the bytes: `read_rows` yields `(where, obj, error)` so the caller decides whether to
skip or stop. Whole-file problems (missing file, broken gzip, an invalid JSON document) come out as one error row
whose error is a FileError.
Writing goes to a temp file in the destination folder and is moved into place with `os.replace`, so a crash or a
Ctrl-C never leaves a half-written output behind.
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from typing import IO, Any

from common.atomic import atomic_open  # noqa: F401  (the one atomic writer; re-exported for data/ users)
from common.config import InputError  # noqa: F401  (bad input: names the file, line or record; re-exported)

DEFAULT_MAX_LINE_BYTES = 16 * 2**20  # a 16 MiB JSONL line is far beyond any real chat; larger is a broken export
_BLOCK = 2**20
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


class FileError(str):
    """An error about a whole input file (cannot be opened, empty, not one JSON document, cut off), as opposed to
    one record. It is a str, so callers that only print errors need not care."""


def open_binary(path: str) -> IO[bytes]:
    """Open `path` for binary reading, transparently decompressing `.gz`."""
    if str(path).endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


_READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError; a cut-off .gz raises EOFError


def _head(path: str) -> bytes:
    """The first bytes of the file up to its first non-whitespace byte (after a UTF-8 BOM), or b"" if it is blank."""
    with open_binary(path) as f:
        head = f.read(4096)
        if head.startswith(_UTF16_BOMS):
            return head
        while head and not head.lstrip(b"\xef\xbb\xbf").lstrip():
            head = f.read(_BLOCK)
    return head


def read_rows(path: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[str, Any, str | None]]:
    """Yield `(where, obj, error)` for every record of a JSONL file or a JSON document (array -> its items).

    .jsonl is JSONL and .json a JSON document (either may be .gz); other names are sniffed ('[' -> document).
    `where` is "path:LINE" for JSONL and "path[i]" for items of a JSON array; `error` is None or says what is wrong
    with that record (then `obj` is None); a FileError is about the whole file (never raised: yielded). Blank JSONL
    lines are skipped; UTF-8 with or without BOM and UTF-16 with BOM are read; a string holding a lone UTF-16
    surrogate ("\ud800", which no UTF-8 file can hold) makes its record malformed. A file that is empty or holds
    only whitespace is an error: that is what a failed export looks like, and it should not pass silently.
    """
    try:
        head = _head(path)
    except _READ_ERRORS as e:
        yield str(path), None, FileError(f"cannot read file: {e}")
        return
    if head.startswith(_UTF16_BOMS):
        yield from _read_utf16(path)
        return
    first = head.lstrip(b"\xef\xbb\xbf").lstrip()[:1]
    if not first:
        yield str(path), None, FileError("file is empty (no records)")
        return
    name = str(path).removesuffix(".gz")
    if name.endswith(".json") or (first == b"[" and not name.endswith(".jsonl")):  # extension first, then sniff
        yield from _read_json_document(path)
    else:
        yield from _read_jsonl(path, max_line_bytes)


def _read_utf16(path: str) -> Iterator[tuple[str, Any, str | None]]:
    """A UTF-16 file (Windows tools write them): decoded whole, then read as a JSON document or as JSONL."""
    try:
        with open_binary(path) as f:
            text = f.read().decode("utf-16")
    except _READ_ERRORS as e:
        yield str(path), None, FileError(f"cannot read file: {e}")
        return
    except UnicodeDecodeError as e:
        yield str(path), None, FileError(f"invalid UTF-16 at byte {e.start}")
        return
    body = text.lstrip("\ufeff").lstrip()
    if str(path).removesuffix(".gz").endswith(".json") or body.startswith("["):
        yield from _document_rows(str(path), text.lstrip("\ufeff"))
        return
    for lineno, line in enumerate(text.lstrip("\ufeff").split("\n"), 1):
        if line.strip():
            yield from _parse_text(f"{path}:{lineno}", line.rstrip("\r"))


def _read_json_document(path: str) -> Iterator[tuple[str, Any, str | None]]:
    """Items of a JSON array file (Open WebUI and Label Studio export one array); a lone object is one record."""
    try:
        with open_binary(path) as f:
            raw = f.read()
    except _READ_ERRORS as e:
        yield str(path), None, FileError(f"cannot read file: {e}")
        return
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield str(path), None, FileError(f"invalid UTF-8 at byte {e.start}")
        return
    yield from _document_rows(str(path), text)


def _document_rows(path: str, text: str) -> Iterator[tuple[str, Any, str | None]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        yield f"{path}:{e.lineno}", None, FileError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}")
        return
    except RecursionError:
        yield path, None, FileError("JSON nested too deeply to read")
        return
    if not isinstance(doc, list):
        yield path, *_checked(doc, text)  # one object: a single record
        return
    check = _ESCAPED_SURROGATE.search(text) is not None
    for i, item in enumerate(doc):
        yield f"{path}[{i}]", *(_checked(item) if check else (item, None))


def _checked(obj: Any, text: str | None = None) -> tuple[Any, str | None]:
    """(obj, None), or (None, error) when a string in it holds a lone surrogate. Only a \\uD8xx escape can make
    one, so when `text` (the JSON it came from) is given, the check runs only if the text has such an escape."""
    if text is not None and not _ESCAPED_SURROGATE.search(text):
        return obj, None
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return None, f"a string holds a lone UTF-16 surrogate ({e.object[e.start]!r}): broken text"
    except (RecursionError, ValueError) as e:
        return None, f"unreadable value: {e}"
    return obj, None


def _read_jsonl(path: str, max_line_bytes: int) -> Iterator[tuple[str, Any, str | None]]:
    """JSONL records; lines longer than `max_line_bytes` are rejected without reading them into memory."""
    lineno = 0
    try:
        with open_binary(path) as f:
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
    except _READ_ERRORS as e:
        after = f" after line {lineno}" if lineno else ""
        yield str(path), None, FileError(f"cannot read file{after}: {e}")


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
    yield from _parse_text(where, text)


def _parse_text(where: str, text: str) -> Iterator[tuple[str, Any, str | None]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        yield where, None, f"invalid JSON at column {e.colno}: {e.msg}"
        return
    except RecursionError:
        yield where, None, "JSON nested too deeply to read"
        return
    yield where, *_checked(obj, text)


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
