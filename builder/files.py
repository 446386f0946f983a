"""Writing files so that a reader never sees half of one: a temp file beside it, then a rename."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


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
