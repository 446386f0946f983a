"""Per-source shards: each source read, filtered, rendered and tokenized in chunks of rows, the
chunks built in parallel and cached one by one.

A chunk is up to CHUNK_ROWS consecutive rows of one file. Its key covers exactly what its
examples depend on: the chunk's own bytes (or parsed values), its file and first row number, and
the shard settings (format, fields, filters, template, tokenizer, train_on, max_length, system
prompt, no_end_of_turn, library versions). So appending rows to a source re-tokenizes only the new
chunks, and editing one row only its chunk. Chunks that are not in the store are built by a
process pool (params.yaml `workers`, default every core), each worker loading the tokenizer once;
results are collected in chunk order, so the bytes never depend on the number of workers.

    .tunefile/chunks/<key[:2]>/<key>/{examples.parquet, rejects.jsonl, meta.json, .index.json}

`examples_of` is the one path from conversations to examples (filters, template, tokens, token
filters): the dataset stage and `tunefile preview` both use it.
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import tempfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from builder.data.arrow import integers
from builder.data.examples import CHUNK_WRITE, Examples, examples_table, tokenize_examples
from builder.data.filters import check_conversation, check_tokens
from builder.data.records import Conversation
from builder.data.report import DELIBERATE
from builder.data.sources import RawChunk, Reject, raw_chunks, to_conversations
from builder.data.tokenizer import load_tokenizer
from builder.errors import DataError
from builder.files import read_json, read_jsonl, write_json, write_jsonl
from builder.hashing import hash_text, hash_value
from builder.recipe.schema import FiltersSpec, SourceSpec
from builder.store import StageStore

if TYPE_CHECKING:  # numpy is imported where it is used: validate and plan never need it
    import numpy as np

SHARD_VERSION = 5  # bump when a chunk's content changes for the same inputs (5: a bad_json reject's
                   # detail names the column within the row, "not JSON: ... at column N")
CHUNK_ROWS = 2000
NAMESPACE = "chunks"


@dataclass(frozen=True)
class ShardSettings:
    """Everything a source's examples depend on besides its rows (picklable, for the workers)."""
    spec: SourceSpec
    filters: FiltersSpec
    template: str
    base_dir: str
    cache_dir: str
    train_on: str
    max_length: int
    system_prompt: str | None
    no_end_of_turn: str
    key: str  # the hash of all of the above, with the tokenizer's base key and library versions


@dataclass(frozen=True)
class ChunkResult:
    key: str
    file: str            # the file its rows come from (provenance)
    rows: int            # rows read (conversations + malformed rows)
    conversations: int   # conversations, before filters and template refusals
    examples: int
    rejects: list[Reject]
    cached: bool


def shard_settings(recipe, spec: SourceSpec, template: str, base_dir: Path, cache_dir: Path,
                   base_key: str, libraries: dict) -> ShardSettings:
    key = hash_value({
        "version": SHARD_VERSION,
        # generate: a generated source is read as the file its stage wrote (readable_sources)
        "source": spec.model_dump(mode="json",
                                  exclude={"weight", "max_examples", "epochs", "eval_fraction", "generate"}),
        "template": hash_text(template),
        "tokenizer": base_key,
        "filters": recipe.filters.model_dump(mode="json"),
        "train_on": recipe.train.train_on,
        "max_length": recipe.train.max_length,
        "system_prompt": recipe.system_prompt,
        **({"no_end_of_turn": recipe.no_end_of_turn} if recipe.no_end_of_turn != "append_eos" else {}),
        "libraries": libraries,
    })
    return ShardSettings(spec, recipe.filters, template, str(base_dir), str(cache_dir), recipe.train.train_on,
                         recipe.train.max_length, recipe.system_prompt, recipe.no_end_of_turn, key)


_TOKENIZERS: dict[str, object] = {}


def tokenizer_for(settings: ShardSettings):
    """The base tokenizer, loaded once per process (`tokenizers` alone where proven equal)."""
    if settings.base_dir not in _TOKENIZERS:
        _TOKENIZERS[settings.base_dir] = load_tokenizer(Path(settings.base_dir), Path(settings.cache_dir))
    return _TOKENIZERS[settings.base_dir]


def examples_of(settings: ShardSettings, conversations: list[Conversation],
                tokenizer=None) -> tuple[Examples, list[Reject]]:
    """Conversations -> examples and rejects: quality filters, then template and tokens (with the
    no_end_of_turn policy), then the token filters."""
    kept, rejects = [], []
    for conv in conversations:
        rejection = check_conversation(conv, settings.filters)
        if rejection is None:
            kept.append(conv)
        else:
            rejects.append(Reject(conv.source, conv.file, conv.row, *rejection))
    examples, bad = tokenize_examples(kept, settings.template, tokenizer or tokenizer_for(settings), settings.train_on,
                                      settings.max_length, settings.system_prompt, settings.no_end_of_turn)
    rejects += bad
    mask = []
    for conv, length in zip(examples.conversations, examples.lengths().tolist()):
        rejection = check_tokens(length, settings.filters)
        mask.append(rejection is None)
        if rejection is not None:
            rejects.append(Reject(conv.source, conv.file, conv.row, *rejection))
    return examples.keep(mask), rejects


def chunk_key(settings: ShardSettings, chunk: RawChunk) -> str:
    return hash_value({"shard": settings.key, "file": chunk.file, "first": chunk.first, "digest": chunk.digest})


def build_chunk(settings: ShardSettings, chunk: RawChunk, key: str) -> ChunkResult:
    """Read, filter, render and tokenize one chunk, and store it under its key."""
    import pyarrow.parquet as pq

    conversations, rejects, rows = to_conversations(settings.spec, chunk.file, chunk.numbered())
    examples, bad = examples_of(settings, conversations)
    rejects += bad
    store = StageStore(Path(settings.cache_dir), NAMESPACE)
    store.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.root) as tmp:
        folder = Path(tmp)
        # lz4: faster to write than zstd and fast to read; the stage's split files are zstd.
        pq.write_table(examples_table(examples), folder / "examples.parquet", **CHUNK_WRITE)
        write_jsonl(folder / "rejects.jsonl", (r.to_dict() for r in rejects))
        meta = {"rows": rows, "conversations": len(conversations), "examples": len(examples)}
        write_json(folder / "meta.json", meta, indent=None)
        store.put(key, folder)
    return ChunkResult(key, chunk.file, rows, len(conversations), len(examples), rejects, cached=False)


def cached_chunk(store: StageStore, key: str, file: str) -> ChunkResult | None:
    """A stored chunk's counts and rejects, if the entry is there and intact."""
    entry = store.verified(key)
    if entry is None:
        return None
    meta = read_json(entry / "meta.json")
    rejects = [Reject(**value) for _, value in read_jsonl(entry / "rejects.jsonl")]
    return ChunkResult(key, file, meta["rows"], meta["conversations"], meta["examples"], rejects, cached=True)


def warm_up(settings: ShardSettings) -> None:
    """Import what build_chunk needs and load the tokenizer in this process: forked workers start
    with both instead of each loading them again."""
    importlib.import_module("pyarrow.parquet")
    tokenizer_for(settings)


def _init_worker() -> None:
    # Each worker is one of `workers` processes: the Rust tokenizer's own thread pool would only
    # oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


class ChunkBuilder:
    """Builds chunks in a pool of `workers` processes (in this process when workers is 1)."""

    def __init__(self, workers: int):
        self.workers, self.pool = workers, None
        self._warm = False

    def __enter__(self) -> ChunkBuilder:
        if self.workers > 1:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method),
                                            initializer=_init_worker)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _warm_up(self, settings: ShardSettings) -> None:
        """Before the first chunk is built (and the pool forks its workers, which then inherit it)."""
        if not self._warm:
            warm_up(settings)
            self._warm = True

    def load(self, settings: ShardSettings, root: Path) -> list[ChunkResult]:
        """Every chunk of the source, in order: from the store, else built."""
        store = StageStore(Path(settings.cache_dir), NAMESPACE)
        results: list[ChunkResult | None] = []
        pending: deque = deque()  # (index, future): bounded, so a 1M-row file is never all in memory
        for chunk in raw_chunks(settings.spec, root, CHUNK_ROWS):
            key = chunk_key(settings, chunk)
            results.append(cached_chunk(store, key, chunk.file))
            if results[-1] is None:
                self._warm_up(settings)
                if self.pool is None:
                    results[-1] = build_chunk(settings, chunk, key)
                else:
                    pending.append((len(results) - 1, self.pool.submit(build_chunk, settings, chunk, key)))
                    while len(pending) > 2 * self.workers:
                        index, future = pending.popleft()
                        results[index] = future.result()
        for index, future in pending:
            results[index] = future.result()
        return results  # type: ignore[return-value]


def chunk_file(cache_dir: Path, key: str) -> Path:
    return StageStore(cache_dir, NAMESPACE).entry(key) / "examples.parquet"


class SourceRows:
    """One source's usable examples as rows of its chunk files, with the light per-row columns
    mixing needs (digest, token counts, turns, provenance); token lists stay on disk."""

    LIGHT = ["digest", "tokens", "trained", "turns", "row"]

    def __init__(self, name: str, chunks: list[ChunkResult], paths: list[Path], columns: dict):
        import numpy as np

        self.name, self.chunks, self.paths = name, chunks, paths
        self.chunks_files = [c.file for c in chunks]
        sizes = [c.examples for c in chunks]
        self.chunk_of = np.repeat(np.arange(len(chunks), dtype=np.int32), sizes)
        self.local = np.concatenate([np.arange(n, dtype=np.int32) for n in sizes]) if sizes else np.zeros(0, np.int32)
        self.digests = columns["digest"]  # numpy bytes (hex digests)
        self.tokens = np.asarray(columns["tokens"], dtype=np.int64)
        self.trained = np.asarray(columns["trained"], dtype=np.int64)
        self.turns = np.asarray(columns["turns"], dtype=np.int64)
        self._rows = np.asarray(columns["row"], dtype=np.int64)  # a chunk's rows all come from one file
        self.rejects = [r for c in chunks for r in c.rejects]
        self.rows_read = sum(c.rows for c in chunks)
        self.conversations = sum(c.conversations for c in chunks)

    @classmethod
    def of(cls, name: str, chunks: list[ChunkResult], cache_dir: Path) -> SourceRows:
        import numpy as np
        import pyarrow.parquet as pq

        paths = [chunk_file(cache_dir, c.key) for c in chunks]
        columns: dict[str, list] = {k: [] for k in cls.LIGHT}
        for path, chunk in zip(paths, chunks):
            if chunk.examples:
                table = pq.ParquetFile(path).read(columns=cls.LIGHT)
                for k in cls.LIGHT:
                    column = table.column(k)
                    columns[k].append(hex_digests(column) if k == "digest" else integers(column))
        joined = {k: np.concatenate(v) if v else np.zeros(0, "S32" if k == "digest" else np.int64)
                  for k, v in columns.items()}
        return cls(name, chunks, paths, joined)

    def __len__(self) -> int:
        return len(self.digests)

    def file_row(self, i: int) -> tuple[str, int]:
        return self.chunks_files[self.chunk_of[i]], int(self._rows[i])

    def describe(self, i: int) -> str:
        """Row i in words: `source file row N`."""
        return f"{self.name} {self.chunks_files[self.chunk_of[i]]} row {self._rows[i]}"

    def messages(self):
        """Every row's messages, in order, read chunk by chunk."""
        import pyarrow.parquet as pq

        for path, chunk in zip(self.paths, self.chunks):
            if chunk.examples:
                yield from pq.ParquetFile(path).read(columns=["messages"]).column("messages").to_pylist()


def hex_digests(column) -> np.ndarray:
    """An Arrow string column of hex digests as a numpy bytes array, without a Python string per row."""
    import numpy as np

    array = column.combine_chunks()
    if array.null_count == 0 and len(array):
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset:array.offset + len(array) + 1]
        width = int(offsets[1] - offsets[0])
        if width and np.all(np.diff(offsets) == width):
            data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
            return data.view(f"S{width}").copy()
    return np.asarray(array.to_pylist(), dtype="S")


def check_reject_rate(spec: SourceSpec, rows: SourceRows, limit: float) -> int:
    """The number of malformed rows (rejects that are not deliberate drops); raise DataError when
    their share of the rows read passes the recipe's limit, showing the first reasons."""
    malformed = [r for r in rows.rejects if r.reason not in DELIBERATE]
    if rows.rows_read and len(malformed) / rows.rows_read > limit:
        first = "; ".join(f"{r.file} row {r.row}: {r.reason} ({r.detail})" for r in malformed[:5])
        raise DataError(f"source '{spec.name}': {len(malformed)} of {rows.rows_read} rows are malformed "
                        f"({len(malformed) / rows.rows_read:.1%} > mixture.max_reject_rate {limit:.1%}); "
                        f"first: {first}. Fix the rows, map columns with fields:, or raise the limit")
    return len(malformed)
