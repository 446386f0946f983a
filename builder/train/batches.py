"""Training batches: packed rows (positions restart per example) or padded rows, and their tensors.

    batches = make_batches(examples, batch_size=8, packing=True, max_length=512, pad_id=0)
    padding_fraction(batches)     # share of the batch tensors' tokens that are padding
    epochs = draw_epochs(examples, train_spec, pad_id, shuffle=True)   # every epoch's, from the seed
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from builder.templates.tokens import IGNORE_INDEX


@dataclass
class Batch:
    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]]
    attention_mask: list[list[int]] | None  # None for packed batches: positions mark the examples
    pads: list[int]  # padding tokens at the end of each row


def read_split(path) -> list[tuple[list[int], list[int]]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["input_ids", "labels"])
    return list(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist()))


def pack_rows(examples: list[tuple[list[int], list[int]]], max_length: int) -> list[tuple[list, list, list]]:
    """Greedy packing into rows of at most max_length tokens, positions restarting per example.

    The first label of each example is dropped so no token learns to predict across examples;
    attention stays within an example because transformers derives a block-diagonal mask from
    position ids that restart (when no attention mask is passed)."""
    rows, ids, labels, positions = [], [], [], []
    for example_ids, example_labels in examples:
        if ids and len(ids) + len(example_ids) > max_length:
            rows.append((ids, labels, positions))
            ids, labels, positions = [], [], []
        ids = ids + example_ids
        labels = labels + [IGNORE_INDEX] + example_labels[1:]
        positions = positions + list(range(len(example_ids)))
    if ids:
        rows.append((ids, labels, positions))
    return rows


def make_batches(examples: list[tuple[list[int], list[int]]], batch_size: int, packing: bool,
                 max_length: int, pad_id: int) -> list[Batch]:
    batches = []
    rows = pack_rows(examples, max_length) if packing else [
        (ids, labels, list(range(len(ids)))) for ids, labels in examples]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r[0]) for r in chunk)
        batch = Batch([], [], [], None if packing else [], [])
        for ids, labels, positions in chunk:
            pad = width - len(ids)
            batch.pads.append(pad)
            batch.input_ids.append(ids + [pad_id] * pad)
            batch.labels.append(labels + [IGNORE_INDEX] * pad)
            # Padding gets positions of its own (a separate "example" when packed).
            batch.position_ids.append(positions + list(range(pad)))
            if batch.attention_mask is not None:
                batch.attention_mask.append([1] * len(ids) + [0] * pad)
        batches.append(batch)
    return batches


def to_tensors(batch: Batch, device) -> dict:
    import torch

    tensors = {"input_ids": batch.input_ids, "labels": batch.labels, "position_ids": batch.position_ids}
    if batch.attention_mask is not None:
        tensors["attention_mask"] = batch.attention_mask
    return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in tensors.items()}


def padding_fraction(batches: list[Batch]) -> float:
    """Padding tokens over all tokens of the batch tensors (what a step pays for and wastes)."""
    total = sum(len(row) for batch in batches for row in batch.input_ids)
    return round(sum(sum(batch.pads) for batch in batches) / total, 6) if total else 0.0


def trained_tokens(batch: Batch) -> int:
    """Tokens that carry loss after the causal shift (what the mean loss divides by)."""
    return sum(sum(1 for label in row[1:] if label != IGNORE_INDEX) for row in batch.labels)


def epoch_order(examples: list, rng: random.Random, shuffle: bool) -> list:
    """One epoch's examples (or pairs): a seeded shuffle (mixture.order: shuffle), or the split's own
    order (mixture.order: curriculum, simple to complex)."""
    order = list(examples)
    if shuffle:
        rng.shuffle(order)
    return order


def draw_epochs(examples: list, spec, pad_id: int, shuffle: bool) -> list[list[Batch]]:
    """Every epoch's batches (`spec`: the recipe's train section), drawn up front from the seed: the
    schedule knows the exact number of steps, and a resumed run sees exactly the batches the
    interrupted one would have."""
    rng = random.Random(spec.seed)
    return [make_batches(epoch_order(examples, rng, shuffle), spec.batch_size, spec.packing, spec.max_length, pad_id)
            for _ in range(spec.epochs)]
