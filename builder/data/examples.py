"""Tokenized examples and their Arrow/parquet form: the rows of a shard and of train/eval.parquet.

Columns: source, file, row, messages, rejected (a preference pair's rejected answer, else null),
text, input_ids, labels (-100 on untrained tokens); shards also keep `digest` (the dedup and
eval-split key), which the stage's outputs drop.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from builder.data.arrow import integers, lists, numbers, strings
from builder.data.records import Conversation, with_system_prompt
from builder.data.sources import Reject
from builder.hashing import hash_value
from builder.templates import TemplateError
from builder.templates.tokens import IGNORE_INDEX, TokenBatch, tokenize_batch


@dataclass(frozen=True)
class Examples:
    """Tokenized examples of one batch: the conversations as trained (system prompt added), their
    digests, and their rows of a TokenBatch (ids and labels as flat arrays)."""
    conversations: list[Conversation]
    digests: list[str]  # of the normalised conversation as the source gave it: the dedup and split key
    batch: TokenBatch
    rows: list[int]

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self):
        import numpy as np

        bounds = self.batch.bounds
        return (bounds[1:] - bounds[:-1])[np.asarray(self.rows, dtype=np.int64)] if self.rows else np.zeros(0, np.int64)

    def keep(self, mask: list[bool]) -> Examples:
        return Examples([c for c, m in zip(self.conversations, mask) if m],
                        [d for d, m in zip(self.digests, mask) if m], self.batch,
                        [r for r, m in zip(self.rows, mask) if m])


def conversation_digest(conversation: Conversation) -> str:
    """Hash of the normalised conversation (roles + stripped contents)."""
    return hash_value([[m.role, m.content.strip()] for m in conversation.messages])


def tokenize_examples(conversations: list[Conversation], template: str, tokenizer, train_on: str,
                      max_length: int, system_prompt: str | None = None,
                      no_end_of_turn: str = "append_eos") -> tuple[Examples, list[Reject]]:
    """Render, tokenize and label (ids and labels built together by tokenize_batch); return the
    examples and the rejects, each with the template's countable reason."""
    finals = [with_system_prompt(conv, system_prompt) for conv in conversations]
    batch, results = tokenize_batch(template, [final.to_dicts() for final in finals], tokenizer, train_on=train_on,
                                    no_end_of_turn=no_end_of_turn)
    kept, digests, rows, rejects = [], [], [], []
    bounds = batch.bounds
    for conv, final, result in zip(conversations, finals, results):
        if isinstance(result, TemplateError):
            rejects.append(Reject(conv.source, conv.file, conv.row, result.reason, str(result)))
        elif bounds[result + 1] - bounds[result] > max_length:
            rejects.append(Reject(conv.source, conv.file, conv.row, "too_long",
                                  f"{bounds[result + 1] - bounds[result]} tokens > max_length {max_length}"))
        else:
            kept.append(final)
            digests.append(conversation_digest(conv))
            rows.append(result)
    return Examples(kept, digests, batch, rows), rejects


# Shard-only columns: the dedup/split key and per-row counts, so mixing never reads token lists.
SHARD_COLUMNS = ("digest", "tokens", "trained", "turns")


def examples_schema(with_digest: bool = True):
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    fields = [("source", pa.string()), ("file", pa.string()), ("row", pa.int64()),
              ("messages", pa.list_(message)), ("rejected", pa.string()), ("text", pa.string()),
              ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))]
    shard = [("digest", pa.string()), ("tokens", pa.int32()), ("trained", pa.int32()), ("turns", pa.int32())]
    return pa.schema(fields + shard * with_digest)


def examples_table(examples: Examples):
    """Examples as an Arrow table (the shard format; the shard-only columns are dropped from the
    stage's outputs), built from flat arrays: no Python object per token."""
    import numpy as np
    import pyarrow as pa

    schema = examples_schema()
    batch, convs = examples.batch, examples.conversations
    rows = np.asarray(examples.rows, dtype=np.int64)
    lengths = examples.lengths()
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    picked = np.zeros(len(batch.bounds) - 1, dtype=bool)
    picked[rows] = True
    tokens = np.repeat(picked, batch.bounds[1:] - batch.bounds[:-1])  # rows are increasing: a mask keeps order
    ids, labels = batch.ids[tokens], batch.labels[tokens]
    trained = np.add.reduceat((labels != IGNORE_INDEX).astype(np.int32), offsets[:-1]) if len(rows) else offsets[:0]
    turns = [sum(m.role == "assistant" for m in c.messages) for c in convs]
    message_offsets = np.zeros(len(convs) + 1, dtype=np.int32)
    np.cumsum([len(c.messages) for c in convs], out=message_offsets[1:])
    messages = pa.StructArray.from_arrays(
        [strings([m.role for c in convs for m in c.messages]),
         strings([m.content for c in convs for m in c.messages])], names=["role", "content"])
    columns = {
        "source": strings([c.source for c in convs]),
        "file": strings([c.file for c in convs]),
        "row": numbers([c.row for c in convs]),
        "messages": lists(message_offsets, messages),
        "rejected": strings([c.rejected for c in convs]),
        "text": strings([batch.texts[r] for r in examples.rows]),
        "input_ids": lists(offsets, numbers(ids, np.int32)),
        "labels": lists(offsets, numbers(labels, np.int32)),
        "digest": strings(examples.digests),
        "tokens": numbers(lengths, np.int32),
        "trained": numbers(trained, np.int32),
        "turns": numbers(turns, np.int32),
    }
    return pa.Table.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)


# Dictionary pages and statistics only where they pay: on token lists and texts they cost write
# time for a larger file (a 218k-row split: 1.15 s and 23.6 MB with them, 0.87 s and 19.0 MB without).
SPLIT_WRITE = {"compression": "zstd", "use_dictionary": ["source", "file"],
               "write_statistics": ["source", "file", "row"]}
CHUNK_WRITE = {"compression": "lz4", "use_dictionary": ["source", "file"], "write_statistics": ["row"]}
WRITE_BATCH = 4096  # rows of a split file's row groups, at least (more for huge splits: <= MAX_BUCKETS groups)
MAX_BUCKETS = 256


def write_rows(path: Path, refs: list[tuple[str, int]], sources: dict) -> None:
    """Write the examples `refs` names ((source, row) pairs, in output order, repeats allowed) as a
    split file, with memory flat in the number of rows. When every chunk's rows come as one run
    (the source order that `mixture.order: shuffle` writes), each chunk is read once and its rows
    are written straight on; any other order goes through an external shuffle."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = examples_schema(with_digest=False)
    names = list(sources)
    index = {name: k for k, name in enumerate(names)}
    source_of = np.fromiter((index[name] for name, _ in refs), dtype=np.int64, count=len(refs))
    row_of = np.fromiter((i for _, i in refs), dtype=np.int64, count=len(refs))
    chunk_of = np.zeros(len(refs), dtype=np.int64)
    for k, name in enumerate(names):
        mine = source_of == k
        chunk_of[mine] = sources[name].chunk_of[row_of[mine]]
    # Runs of consecutive rows from one chunk; each chunk in a single run means a sequential copy.
    starts = np.r_[0, np.flatnonzero((source_of[1:] != source_of[:-1]) | (chunk_of[1:] != chunk_of[:-1])) + 1]
    run_chunks = list(zip(source_of[starts].tolist(), chunk_of[starts].tolist())) if refs else []
    with pq.ParquetWriter(path, schema, **SPLIT_WRITE) as out:
        if not refs:
            out.write_table(pa.Table.from_batches([], schema=schema))
        elif len(set(run_chunks)) == len(run_chunks):
            for begin, end in zip(starts, np.r_[starts[1:], len(refs)]):
                rows = sources[names[source_of[begin]]]
                table = _chunk_table(rows.paths[chunk_of[begin]], schema)
                out.write_table(table.take(numbers(rows.local[row_of[begin:end]])))
        else:
            _shuffle_rows(out, schema, sources, names, source_of, row_of, chunk_of, path.parent)


def _chunk_table(path: Path, schema):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read(columns=schema.names).cast(schema)


def _shuffle_rows(out, schema, sources: dict, names: list[str], source_of, row_of, chunk_of, tmp_dir: Path) -> None:
    """The external shuffle, in two sequential passes: each chunk is read once and its rows are
    appended to the bucket file of the row group they go to (with their output position); then
    each bucket is read, put in order and written as one row group. Memory holds one chunk or one
    bucket at a time; nothing is read at random."""
    import numpy as np
    import pyarrow as pa

    size = max(WRITE_BATCH, -(-len(source_of) // MAX_BUCKETS))
    buckets = -(-len(source_of) // size)
    keyed = schema.append(pa.field("position", pa.int64()))
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix=".gather-") as tmp:
        files = [Path(tmp) / f"{b}.arrow" for b in range(buckets)]
        writers = [pa.ipc.new_file(str(f), keyed) for f in files]
        try:
            for k, name in enumerate(names):
                mine = np.flatnonzero(source_of == k)  # output positions drawn from this source
                for chunk in np.unique(chunk_of[mine]):
                    positions = mine[chunk_of[mine] == chunk]
                    local = sources[name].local[row_of[positions]]
                    table = _chunk_table(sources[name].paths[chunk], schema)
                    by_bucket = np.argsort(positions // size, kind="stable")  # one take, then slices
                    positions, local = positions[by_bucket], local[by_bucket]
                    part = (table.take(numbers(local)).append_column("position", numbers(positions))
                            .combine_chunks())
                    buckets_here, first = np.unique(positions // size, return_index=True)
                    for b, begin, end in zip(buckets_here, first, [*first[1:], len(positions)]):
                        for batch in part.slice(begin, end - begin).to_batches():
                            writers[b].write_batch(batch)
                    del table, part
        finally:
            for writer in writers:
                writer.close()
        for file in files:
            with pa.OSFile(str(file)) as source:
                bucket = pa.ipc.open_file(source).read_all()
            order = np.argsort(integers(bucket.column("position")))
            out.write_table(bucket.take(numbers(order)).drop_columns(["position"]).combine_chunks())
            del bucket
            file.unlink()
