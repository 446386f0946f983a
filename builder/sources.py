"""Read a source's files (.jsonl .json .csv .parquet, or a glob over them) into conversations.

Bad rows are not errors here: they come back as Reject records with a reason, to be counted.
"""
from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from builder.errors import DataError
from builder.formats import FORMATS
from builder.recipe import SourceSpec
from builder.records import Conversation, RowError, make_conversation


@dataclass(frozen=True)
class Reject:
    source: str
    file: str
    row: int
    reason: str
    detail: str

    def to_dict(self) -> dict:
        return {"source": self.source, "file": self.file, "row": self.row, "reason": self.reason,
                "detail": self.detail}


def _read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, RowError("bad_json", str(exc))


def _read_json(path: Path) -> Iterator[tuple[int, object]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(data, dict):  # an object of arrays, e.g. {"train": [...], "extra": [...]}
        if not all(isinstance(v, list) for v in data.values()):
            raise DataError(f"{path}: a .json source is an array of rows or an object of arrays")
        data = [row for key in sorted(data) for row in data[key]]
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json source is an array of rows or an object of arrays")
    yield from enumerate(data, start=1)


def _read_csv(path: Path) -> Iterator[tuple[int, object]]:
    with open(path, encoding="utf-8", newline="") as f:
        yield from enumerate(csv.DictReader(f), start=1)


def _read_parquet(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    yield from enumerate(pq.read_table(path).to_pylist(), start=1)


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def read_source(spec: SourceSpec, root: Path) -> tuple[list[Conversation], list[Reject]]:
    """Every file the source names, in sorted order -> (conversations, rejects)."""
    files = sorted(glob.glob(str(root / spec.path)))
    if not files:
        raise DataError(f"source '{spec.name}': no file matches '{spec.path}'")
    adapt = FORMATS[spec.format]
    conversations: list[Conversation] = []
    rejects: list[Reject] = []
    for file in files:
        rel = Path(file).relative_to(root).as_posix()
        if Path(file).suffix not in READERS:
            raise DataError(f"source '{spec.name}': {rel} matches '{spec.path}' but is not one of "
                            f"{', '.join(READERS)}")
        for number, row in READERS[Path(file).suffix](Path(file)):
            try:
                if isinstance(row, RowError):
                    raise row
                if not isinstance(row, dict):
                    raise RowError("bad_type", f"row is {type(row).__name__}, expected an object")
                # All of a row's conversations or none (self_instruct rows hold several).
                conversations.extend([make_conversation(t, spec.name, number, rel) for t in adapt(row)])
            except RowError as exc:
                rejects.append(Reject(spec.name, rel, number, exc.reason, exc.detail))
    return conversations, rejects
