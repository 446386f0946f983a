"""builder/data/examples.py: conversations -> tokenized examples (the same ids and labels as the
one-conversation path), their Arrow columns, and split files written in the order asked for."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from builder.data.examples import (
    CHUNK_WRITE,
    conversation_digest,
    examples_table,
    tokenize_examples,
    write_rows,
)
from builder.data.records import Conversation, Message
from builder.templates import BUILTIN_TEMPLATES
from builder.templates.tokens import tokenize_chat

CHATML = BUILTIN_TEMPLATES["chatml"].read_text(encoding="utf-8")


def conversation(row: int, *turns: tuple[str, str], rejected: str | None = None) -> Conversation:
    return Conversation(tuple(Message(r, c) for r, c in turns), "s", row, "data/s.jsonl", rejected)


CONVERSATIONS = [
    conversation(1, ("user", "Name a colour."), ("assistant", "Blue.")),
    conversation(2, ("user", "Count to three."), ("assistant", "One, two, three.")),
    conversation(3, ("user", "Hi"), ("assistant", "Hello there."), ("user", "Bye"), ("assistant", "Bye."),
                 rejected="Go away."),
]


def test_the_digest_ignores_surrounding_space_and_not_roles():
    a = conversation(1, ("user", "Hi "), ("assistant", "\nHello."))
    assert conversation_digest(a) == conversation_digest(conversation(9, ("user", "Hi"), ("assistant", "Hello.")))
    assert conversation_digest(a) != conversation_digest(conversation(1, ("assistant", "Hi"), ("user", "Hello.")))


def test_examples_are_tokenized_as_one_conversation_is_and_too_long_ones_are_rejected(tiny_tokenizer):
    system = {"role": "system", "content": "Be brief."}
    singles = [tokenize_chat(CHATML, [system, *c.to_dicts()], tiny_tokenizer) for c in CONVERSATIONS]
    assert [len(s.input_ids) for s in singles] == [36, 39, 54]
    examples, rejects = tokenize_examples(CONVERSATIONS, CHATML, tiny_tokenizer, "all_assistant", 39,
                                          system_prompt="Be brief.")
    assert [(r.source, r.file, r.row, r.reason, r.detail) for r in rejects] == [
        ("s", "data/s.jsonl", 3, "too_long", "54 tokens > max_length 39")]
    assert [c.messages[0] for c in examples.conversations] == [Message("system", "Be brief.")] * 2
    assert examples.digests == [conversation_digest(c) for c in CONVERSATIONS[:2]]  # as the source gave it
    assert examples.lengths().tolist() == [36, 39]
    table = examples_table(examples).to_pydict()
    assert table["input_ids"] == [s.input_ids for s in singles[:2]]
    assert table["labels"] == [s.labels for s in singles[:2]]
    assert (table["tokens"], table["trained"], table["turns"]) == ([36, 39], [5, 8], [1, 1])
    assert (table["source"], table["file"], table["row"]) == (["s", "s"], ["data/s.jsonl"] * 2, [1, 2])
    assert table["rejected"] == [None, None] and table["digest"] == examples.digests


def test_keep_drops_by_mask_without_touching_the_batch(tiny_tokenizer):
    examples, _ = tokenize_examples(CONVERSATIONS, CHATML, tiny_tokenizer, "all_assistant", 10_000)
    kept = examples.keep([True, False, True])
    assert [c.row for c in kept.conversations] == [1, 3] and kept.rows == [0, 2] and kept.batch is examples.batch
    assert kept.lengths().tolist() == [examples.lengths()[0], examples.lengths()[2]]


@pytest.fixture
def two_chunks(tmp_path, tiny_tokenizer):
    """One source of two chunk files (rows 1-2 and 3), as the dataset stage's SourceRows holds them."""
    paths = []
    for k, part in enumerate((CONVERSATIONS[:2], CONVERSATIONS[2:])):
        examples, _ = tokenize_examples(part, CHATML, tiny_tokenizer, "all_assistant", 10_000)
        paths.append(tmp_path / f"chunk{k}.parquet")
        pq.write_table(examples_table(examples), paths[-1], **CHUNK_WRITE)
    return {"s": SimpleNamespace(paths=paths, chunk_of=np.array([0, 0, 1]), local=np.array([0, 1, 0]))}


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0, 1, 0]], ids=["in chunk order", "shuffled with a repeat"])
def test_write_rows_writes_the_rows_asked_for_in_that_order(tmp_path, two_chunks, order):
    path = tmp_path / "train.parquet"
    write_rows(path, [("s", i) for i in order], two_chunks)
    table = pq.read_table(path)
    assert "digest" not in table.column_names and table.column("row").to_pylist() == [i + 1 for i in order]
    assert [m[-1]["content"] for m in table.column("messages").to_pylist()] == [
        CONVERSATIONS[i].messages[-1].content for i in order]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk0.parquet", "chunk1.parquet", "train.parquet"]


def test_write_rows_of_nothing_is_an_empty_file_with_the_columns(tmp_path, two_chunks):
    write_rows(tmp_path / "eval.parquet", [], two_chunks)
    table = pq.read_table(tmp_path / "eval.parquet")
    assert table.num_rows == 0 and table.column_names == [
        "source", "file", "row", "messages", "rejected", "text", "input_ids", "labels"]
