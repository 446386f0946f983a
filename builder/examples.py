"""Tokenized examples and their Arrow/parquet form: the rows of a shard and of train/eval.parquet.

Columns: source, file, row, messages, rejected (a preference pair's rejected answer, else null),
text, input_ids, labels (-100 on untrained tokens); shards also keep `digest` (the dedup and
eval-split key), which the stage's outputs drop.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from builder.hashing import hash_value
from builder.records import Conversation, with_system_prompt
from builder.sources import Reject
from builder.templates import TemplateError
from builder.templates.tokens import IGNORE_INDEX, tokenize_chats


@dataclass(frozen=True)
class Example:
    conversation: Conversation
    digest: str  # of the normalised conversation as the source gave it: the dedup and split key
    text: str
    input_ids: list[int]
    labels: list[int]


def conversation_digest(conversation: Conversation) -> str:
    """Hash of the normalised conversation (roles + stripped contents)."""
    return hash_value([[m.role, m.content.strip()] for m in conversation.messages])


def tokenize_examples(conversations: list[Conversation], template: str, tokenizer, train_on: str,
                      max_length: int, system_prompt: str | None = None,
                      no_end_of_turn: str = "append_eos") -> tuple[list[Example], list[Reject]]:
    """Render, tokenize and label (ids and labels built together by tokenize_chats); return the
    examples and the rejects, each with the template's countable reason."""
    if not conversations:
        return [], []
    finals = [with_system_prompt(conv, system_prompt) for conv in conversations]
    results = tokenize_chats(template, [final.to_dicts() for final in finals], tokenizer, train_on=train_on,
                             no_end_of_turn=no_end_of_turn)
    examples, rejects = [], []
    for conv, final, result in zip(conversations, finals, results):
        if isinstance(result, TemplateError):
            rejects.append(Reject(conv.source, conv.file, conv.row, result.reason, str(result)))
        elif len(result.input_ids) > max_length:
            rejects.append(Reject(conv.source, conv.file, conv.row, "too_long",
                                  f"{len(result.input_ids)} tokens > max_length {max_length}"))
        else:
            examples.append(Example(final, conversation_digest(conv), result.text, result.input_ids, result.labels))
    return examples, rejects


def examples_schema(with_digest: bool = True):
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    fields = [("source", pa.string()), ("file", pa.string()), ("row", pa.int64()),
              ("messages", pa.list_(message)), ("rejected", pa.string()), ("text", pa.string()),
              ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))]
    return pa.schema(fields + [("digest", pa.string())] * with_digest)


def examples_table(examples: list[Example]):
    """Examples as an Arrow table (the shard format; `digest` is dropped from the stage's outputs)."""
    import pyarrow as pa

    return pa.Table.from_pydict({
        "source": [e.conversation.source for e in examples],
        "file": [e.conversation.file for e in examples],
        "row": [e.conversation.row for e in examples],
        "messages": [e.conversation.to_dicts() for e in examples],
        "rejected": [e.conversation.rejected for e in examples],
        "text": [e.text for e in examples],
        "input_ids": [e.input_ids for e in examples],
        "labels": [e.labels for e in examples],
        "digest": [e.digest for e in examples],
    }, schema=examples_schema())


def write_split(path: Path, table) -> None:
    import pyarrow.parquet as pq

    # One schema for tables built here and tables read back from a shard (parquet renames list
    # items to "element"): the same rows must give the same bytes either way.
    table = table.drop_columns(["digest"]).cast(examples_schema(with_digest=False)).combine_chunks()
    pq.write_table(table, path, compression="zstd")


def token_counts(table) -> tuple[list[int], list[int]]:
    """Per row: number of tokens, and number of trained tokens (labels != -100)."""
    import numpy as np
    import pyarrow.compute as pc

    labels = table.column("labels").combine_chunks()
    trained = np.bincount(pc.list_parent_indices(labels).to_numpy(),
                          weights=(pc.list_flatten(labels).to_numpy() != IGNORE_INDEX), minlength=len(table))
    return pc.list_value_length(labels).to_numpy().tolist(), trained.astype(int).tolist()


def conversation_text(messages: list[dict]) -> str:
    """The user and assistant contents of a conversation, for near-dedup and decontamination."""
    return "\n".join(m["content"] for m in messages if m["role"] != "system")
