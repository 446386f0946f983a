"""The one way tunefile reads and writes JSON and JSONL files.

Writes never leave half a file for a reader (a temp file beside it, then a rename) and give the
same bytes for the same value (sorted keys, UTF-8, a final newline). Reads have one error wording,
`FILE:LINE: what was wrong`, whichever caller reads:

    rows = read_jsonl(path)                 # [(line, value)], FileFormatError on the first bad line
    for line, value in parse_jsonl(lines):  # value or a LineProblem: a caller that quarantines rows
    manifest = read_json(path, default={})  # a missing or unreadable file gives the default
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from builder.errors import FileFormatError

_RAISE = object()  # read_json's default: a missing or malformed file is an error


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to path through a temp file in the same folder, renamed over it.
    A new file, never written through: a hard link into the stage store keeps its bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; build files are for everyone who reads the build
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: object, indent: int | None = 1) -> None:
    """Sorted keys, UTF-8, a final newline: the same value gives the same bytes."""
    write_atomic(path, json.dumps(value, sort_keys=True, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One sorted-key JSON object per line, UTF-8: the same records give the same bytes."""
    write_atomic(path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records))


@dataclass(frozen=True)
class LineProblem:
    """Why one line of a JSONL file is not a value: `bad_encoding` or `bad_json`, and the detail."""

    reason: str
    detail: str


def _json_detail(exc: json.JSONDecodeError) -> str:
    return f"not JSON: {exc.msg} at column {exc.colno}"


def parse_jsonl(lines: Iterable[bytes | str], first: int = 1) -> Iterator[tuple[int, object]]:
    """Numbered values of JSONL lines, a bad line as a LineProblem in its place. Lines are decoded
    one by one, so a line that is not UTF-8 is one bad row, not a dead file; blank lines are
    skipped but counted."""
    for number, raw in enumerate(lines, start=first):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, LineProblem("bad_encoding", f"not UTF-8: byte {exc.object[exc.start]:#04x} at column "
                                                          f"{exc.start + 1}")
                continue
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as exc:
            yield number, LineProblem("bad_json", _json_detail(exc))


def read_jsonl(path: Path, shown: str | None = None) -> list[tuple[int, object]]:
    """Every (line number, value) of a JSONL file; the first bad line raises FileFormatError
    `SHOWN:LINE: what was wrong` (`shown` is how the user knows the file, default its path)."""
    shown = shown or str(path)
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as exc:
        raise FileFormatError(f"{shown}: cannot read: {exc.strerror}") from None
    rows = []
    for number, value in parse_jsonl(lines):
        if isinstance(value, LineProblem):
            raise FileFormatError(f"{shown}:{number}: {value.detail}")
        rows.append((number, value))
    return rows


def read_json(path: Path, default: object = _RAISE, shown: str | None = None) -> object:
    """A JSON file's value. With a default, a missing or malformed file gives it (manifests and
    metrics of a stage that never finished); without one, FileFormatError `SHOWN:LINE: ...`."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
        return json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        if default is not _RAISE:
            return default
        shown = shown or str(path)
        if isinstance(exc, OSError):
            raise FileFormatError(f"{shown}: cannot read: {exc.strerror}") from None
        if isinstance(exc, UnicodeDecodeError):
            line = exc.object.count(b"\n", 0, exc.start) + 1
            raise FileFormatError(f"{shown}:{line}: not UTF-8: byte {exc.object[exc.start]:#04x}") from None
        raise FileFormatError(f"{shown}:{exc.lineno}: {_json_detail(exc)}") from None
