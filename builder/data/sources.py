"""Read a source into conversations: local files (.jsonl .json .csv .parquet, or a glob over them),
inline `examples:` rows, or a hub dataset pinned by revision (`hf:org/name@revision`).

Bad rows are not errors here: they come back as Reject records with a reason, to be counted.
`fields:` renames columns to the names the format reads before the row is adapted.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from builder.data.formats import FORMATS, apply_fields
from builder.data.records import Conversation, RowError, make_conversation
from builder.errors import DataError
from builder.files import LineProblem, parse_json, parse_jsonl
from builder.recipe.project import project_path
from builder.recipe.schema import SourceSpec


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


def parse_jsonl_lines(lines: Iterable[bytes], first: int = 1) -> Iterator[tuple[int, object]]:
    """Numbered rows of raw .jsonl lines (files.parse_jsonl), a bad line as a RowError to reject,
    its detail in files.parse_jsonl's words: the column within the row (the row number is the
    line). Stored rejects (chunks, rejects.jsonl) hold the detail: shards.SHARD_VERSION moves with it."""
    for number, value in parse_jsonl(lines, first):
        if isinstance(value, LineProblem):
            value = RowError(value.reason, value.detail)
        yield number, value


def _read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    with open(path, "rb") as f:
        yield from parse_jsonl_lines(f)


_BAD_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8


def _read_text(path: Path) -> tuple[str, bool]:
    """The file's text, and whether it had bytes that are not UTF-8 (kept as surrogate escapes,
    so the rows holding them can be rejected one by one)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="surrogateescape"), True


def _bad_bytes(value: object) -> str | None:
    """The first string in value holding a byte that is not UTF-8, if any."""
    if isinstance(value, str):
        return value if _BAD_BYTE.search(value) else None
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list):
        return next((bad for v in value if (bad := _bad_bytes(v)) is not None), None)
    return None


def _checked(rows: Iterator[tuple[int, object]], dirty: bool) -> Iterator[tuple[int, object]]:
    for number, row in rows:
        bad = _bad_bytes(row) if dirty else None
        if bad is None:
            yield number, row
        else:
            byte = ord(_BAD_BYTE.search(bad).group()) - 0xDC00
            yield number, RowError("bad_encoding", f"not UTF-8: byte {byte:#04x} in {bad[:40]!r}")


def _read_json(path: Path) -> Iterator[tuple[int, object]]:
    text, dirty = _read_text(path)
    data = parse_json(text, str(path))
    if isinstance(data, dict):  # an object of arrays, e.g. {"train": [...], "extra": [...]}
        if not all(isinstance(v, list) for v in data.values()):
            raise DataError(f"{path}: a .json source is an array of rows or an object of arrays")
        data = [row for key in sorted(data) for row in data[key]]
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json source is an array of rows or an object of arrays")
    yield from _checked(enumerate(data, start=1), dirty)


def _read_csv(path: Path) -> Iterator[tuple[int, object]]:
    text, dirty = _read_text(path)
    try:
        yield from _checked(enumerate(csv.DictReader(io.StringIO(text, newline="")), start=1), dirty)
    except csv.Error as exc:
        raise DataError(f"{path}: not valid CSV ({exc})") from None


def _read_parquet(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    yield from enumerate(table.to_pylist(), start=1)


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


INLINE_FILE = "(inline)"  # the `file` of inline rows in rejects and parquet provenance
HUB_TIMEOUT_S = 5.0


def _hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_rows(spec: SourceSpec) -> Iterator[tuple[int, object]]:
    """Rows of a hub dataset at exactly the pinned revision: from the local HF cache when it is
    there, else downloaded (a clear error, within seconds, when the hub cannot be reached)."""
    from huggingface_hub import snapshot_download

    repo, revision = spec.hub.repo, spec.hub.revision
    try:
        folder = snapshot_download(repo, repo_type="dataset", revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 (not cached: any failure means "download it")
        if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
            raise DataError(f"source '{spec.name}': {repo}@{revision} is not in the local Hugging Face cache "
                            "and the hub cannot be reached; run once with network access, or download "
                            "the files and point path: at them") from None
        try:
            folder = snapshot_download(repo, repo_type="dataset", revision=revision)
        except Exception as exc:  # noqa: BLE001 (hub errors have many types; all mean "could not fetch")
            raise DataError(f"source '{spec.name}': cannot download {repo}@{revision}: {exc}") from None
    import datasets

    try:
        data = datasets.load_dataset(folder, name=spec.subset, split=spec.split or "train")
    except Exception as exc:  # noqa: BLE001 (datasets raises many types; each is a clear DataError)
        raise DataError(f"source '{spec.name}': cannot read {repo}@{revision} (subset {spec.subset}, "
                        f"split {spec.split or 'train'}): {exc}") from None
    yield from enumerate(data, start=1)


def _row_groups(spec: SourceSpec, root: Path) -> Iterator[tuple[str, Iterator[tuple[int, object]]]]:
    """(file name for provenance, numbered rows) per file, inline block or hub dataset."""
    if spec.examples is not None:
        yield INLINE_FILE, enumerate(spec.examples, start=1)
        return
    if spec.is_hub:
        yield spec.path, _hub_rows(spec)
        return
    files = sorted(glob.glob(str(root / spec.path)))
    if not files:
        raise DataError(f"source '{spec.name}': no file matches '{spec.path}'")
    for file in files:
        rel = project_path(Path(file), root)
        if Path(file).suffix not in READERS:
            raise DataError(f"source '{spec.name}': {rel} matches '{spec.path}' but is not one of "
                            f"{', '.join(READERS)}")
        yield rel, READERS[Path(file).suffix](Path(file))


def to_conversations(spec: SourceSpec, rel: str, numbered: Iterable[tuple[int, object]]
                     ) -> tuple[list[Conversation], list[Reject], int]:
    """Numbered rows of one file -> (conversations, rejects, rows read)."""
    adapt = FORMATS[spec.format]
    conversations: list[Conversation] = []
    rejects: list[Reject] = []
    rows = 0
    for number, row in numbered:
        rows += 1
        try:
            if isinstance(row, RowError):
                raise row
            if not isinstance(row, dict):
                raise RowError("bad_type", f"row is {type(row).__name__}, expected an object")
            # All of a row's conversations or none (self_instruct rows hold several).
            turns = adapt(apply_fields(row, spec.fields))
            conversations.extend([make_conversation(t, spec.name, number, rel) for t in turns])
        except RowError as exc:
            detail = exc.detail + (f" (fields: {spec.fields})" if spec.fields and exc.reason == "missing_field" else "")
            rejects.append(Reject(spec.name, rel, number, exc.reason, detail))
    return conversations, rejects, rows


def read_source(spec: SourceSpec, root: Path) -> tuple[list[Conversation], list[Reject], int]:
    """The source's rows -> (conversations, rejects, rows read)."""
    conversations: list[Conversation] = []
    rejects: list[Reject] = []
    rows = 0
    for rel, numbered in _row_groups(spec, root):
        got, bad, n = to_conversations(spec, rel, numbered)
        conversations += got
        rejects += bad
        rows += n
    return conversations, rejects, rows


def read_source_rows(spec: SourceSpec, root: Path) -> list[Conversation | Reject]:
    """The source's rows in file order, each as its conversations or as its Reject (what
    `tunefile preview` shows: a malformed row in its place, with its reason)."""
    rows: list[Conversation | Reject] = []
    for rel, numbered in _row_groups(spec, root):
        conversations, rejects, _ = to_conversations(spec, rel, numbered)
        # sorted is stable: the conversations of one row (self_instruct) keep their order
        rows += sorted([*conversations, *rejects], key=lambda item: item.row)
    return rows


@dataclass(frozen=True)
class RawChunk:
    """Up to `size` consecutive rows of one file, before parsing where that is cheap to defer:
    .jsonl chunks carry their raw lines (parsed by whichever worker tokenizes them), other
    formats their parsed rows. `digest` covers exactly the rows' bytes or values."""
    file: str
    first: int  # the first row's number (a .jsonl line number)
    lines: bytes | None
    rows: list | None
    digest: str

    def numbered(self) -> Iterator[tuple[int, object]]:
        if self.lines is not None:
            return parse_jsonl_lines(io.BytesIO(self.lines), self.first)  # split as the file was: at \\n only
        return iter(self.rows)


def raw_chunks(spec: SourceSpec, root: Path, size: int) -> Iterator[RawChunk]:
    """The source's rows in chunks of `size`, streamed (a 1M-row file is never all in memory)."""
    import xxhash

    for rel, numbered in _row_groups(spec, root):
        path = root / rel  # an absolute rel (a file outside the project) stays itself
        if rel.endswith(".jsonl") and path.is_file():
            with open(path, "rb") as f:
                first = 1
                while True:
                    lines = [line for _, line in zip(range(size), f)]
                    if not lines:
                        break
                    data = b"".join(lines)
                    yield RawChunk(rel, first, data, None, xxhash.xxh3_128_hexdigest(data))
                    first += len(lines)
            continue
        batch: list = []
        for item in numbered:
            batch.append(item)
            if len(batch) == size:
                yield _parsed_chunk(rel, batch)
                batch = []
        if batch:
            yield _parsed_chunk(rel, batch)


def _parsed_chunk(rel: str, batch: list) -> RawChunk:
    import xxhash

    values = [[n, repr(r) if isinstance(r, RowError) else r] for n, r in batch]
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)
    digest = xxhash.xxh3_128_hexdigest(text.encode("utf-8", "surrogatepass"))
    return RawChunk(rel, batch[0][0], None, list(batch), digest)
