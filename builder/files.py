"""The one way tunefile reads and writes JSON and JSONL files.

Writes never leave half a file for a reader (a temp file beside it, then a rename) and give the
same bytes for the same value (sorted keys, UTF-8, a final newline). Reads have one error wording,
`FILE:LINE: what was wrong`, whichever caller reads:

    rows = read_jsonl(path)                 # [(line, value)], FileFormatError on the first bad line
    for line, value in parse_jsonl(lines):  # value or a LineProblem: a caller that quarantines rows
    manifest = read_json(path, default={})  # a missing or unreadable file gives the default
    text = read_text(path)                  # UTF-8 text, FileFormatError naming the line of a bad byte
    value = parse_json(text, shown)         # JSON text read some other way, the same errors
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from builder.errors import FileFormatError

_RAISE = object()  # read_json's default: a missing or malformed file is an error


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` when the block ends without an error (and never exists
    half-written): a temp file in the same folder, renamed over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; build files are for everyone who reads the build
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to path through a temp file in the same folder, renamed over it.
    A new file, never written through: a hard link into the stage store keeps its bytes."""
    with _atomic(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: Path, value: object, indent: int | None = 1) -> None:
    """Sorted keys, UTF-8, a final newline: the same value gives the same bytes."""
    write_atomic(path, json.dumps(value, sort_keys=True, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """One sorted-key JSON object per line, UTF-8: the same records give the same bytes. Written
    line by line, so a million rejects never become one string."""
    with _atomic(path) as f:
        for record in records:
            f.write((json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


@dataclass(frozen=True)
class LineProblem:
    """Why one line of a JSONL file is not a value."""

    reason: str  # "bad_encoding" or "bad_json": countable, what a quarantined row is recorded as
    detail: str  # what was wrong, in the words of `FILE:LINE: detail`


def _encoding_detail(data: bytes, start: int, column: int) -> str:
    return f"not UTF-8: byte {data[start]:#04x} at column {column}"


def _json_detail(exc: json.JSONDecodeError, column: int) -> str:
    return f"not JSON: {exc.msg} at column {column}"


def parse_jsonl(lines: Iterable[bytes | str], first: int = 1) -> Iterator[tuple[int, object]]:
    """Numbered values of JSONL lines, a bad line as a LineProblem in its place. Lines are decoded
    one by one, so a line that is not UTF-8 is one bad row, not a dead file; blank lines are
    skipped but counted."""
    for number, raw in enumerate(lines, start=first):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, LineProblem("bad_encoding", _encoding_detail(exc.object, exc.start, exc.start + 1))
                continue
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as exc:
            # A line cut short fails past its own end (after the newline): point at its end instead.
            column = min(exc.pos, len(raw.rstrip("\r\n"))) + 1
            yield number, LineProblem("bad_json", _json_detail(exc, column))


def _read_bytes(path: Path, shown: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise FileFormatError(f"{shown}: cannot read: {exc.strerror or exc}") from None


def read_jsonl(path: Path, shown: str | None = None) -> list[tuple[int, object]]:
    """Every (line number, value) of a JSONL file; the first bad line raises FileFormatError
    `SHOWN:LINE: what was wrong` (`shown` is how the user knows the file, default its path)."""
    shown = shown or str(path)
    rows = []
    for number, value in parse_jsonl(_read_bytes(path, shown).split(b"\n")):
        if isinstance(value, LineProblem):
            raise FileFormatError(f"{shown}:{number}: {value.detail}")
        rows.append((number, value))
    return rows


def read_text(path: Path, shown: str | None = None) -> str:
    """A UTF-8 text file's text; FileFormatError `SHOWN:LINE: not UTF-8: ...` names the first bad byte."""
    shown = shown or str(path)
    data = _read_bytes(path, shown)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise FileFormatError(f"{shown}:{line}: {_encoding_detail(data, exc.start, column)}") from None


def parse_json(text: str, shown: str) -> object:
    """The value of JSON text read from the file the user knows as `shown`; FileFormatError
    `SHOWN:LINE: not JSON: ...` when it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{shown}:{exc.lineno}: {_json_detail(exc, exc.colno)}") from None


def read_json(path: Path, default: object = _RAISE, shown: str | None = None) -> object:
    """A JSON file's value. With a default, a missing or malformed file gives it (manifests and
    caches of a stage that never finished); without one, FileFormatError `SHOWN:LINE: ...`."""
    try:
        shown = shown or str(path)
        return parse_json(read_text(path, shown), shown)
    except FileFormatError:
        if default is _RAISE:
            raise
        return default
