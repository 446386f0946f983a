"""Mixture arithmetic: weights -> exact integer counts, seeded sampling, a stable eval split."""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # numpy is imported where it is used: validate and plan never need it
    import numpy as np

T = TypeVar("T")


def allocate_counts(weights: Sequence[float], total: int) -> list[int]:
    """Split `total` in proportion to `weights` (largest remainder; ties go to the earlier source)."""
    scale = sum(weights)
    quotas = [w * total / scale for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def sample_examples(pool: Sequence[T], count: int, rng: random.Random) -> list[T]:
    """`count` items of pool: whole passes first (upsampling), then a seeded sample without repeats."""
    if not pool:
        return []
    passes, rest = divmod(count, len(pool))
    return list(pool) * passes + rng.sample(list(pool), rest)


def is_eval_example(digest: str, fraction: float) -> bool:
    """Eval membership from the example's own hash: stable whatever else is in the mixture."""
    return int(digest[:16], 16) / 2**64 < fraction


def hash_prefixes(digests) -> np.ndarray:
    """The first 64 bits of each hex digest (str or bytes) as uint64, what is_eval_example reads."""
    import numpy as np

    digests = np.asarray(digests, dtype="S")
    if not len(digests):
        return np.zeros(0, dtype=np.uint64)
    chars = digests.view(np.uint8).reshape(len(digests), -1)[:, :16]
    nibbles = np.where(chars >= ord("a"), chars - (ord("a") - 10), chars - ord("0")).astype(np.uint64)
    value = np.zeros(len(digests), dtype=np.uint64)
    for k in range(16):
        value = (value << np.uint64(4)) | nibbles[:, k]
    return value


def pick_eval(recipe, digests: dict, kept: dict[str, list[int]]) -> dict[str, set[int]]:
    """Eval rows per source, chosen by each example's own hash (stable when other rows change):
    below the source's (or the mixture's) eval_fraction, or the eval_size smallest hashes overall."""
    import numpy as np

    prefixes = {s: hash_prefixes(digests[s]) for s in kept}
    if recipe.mixture.eval_size is not None:
        ranked = sorted((int(prefixes[s][i]), s, i) for s in kept for i in kept[s])
        chosen: dict[str, set[int]] = {s: set() for s in kept}
        for _, source, i in ranked[:recipe.mixture.eval_size]:
            chosen[source].add(i)
        return chosen
    fractions = {s.name: s.eval_fraction if s.eval_fraction is not None else recipe.mixture.eval_fraction
                 for s in recipe.sources}
    chosen = {}
    for s in kept:
        rows = np.asarray(kept[s], dtype=np.int64)
        # uint64 -> float64 then / 2**64 rounds exactly as Python's int / 2**64 does.
        chosen[s] = set(rows[prefixes[s][rows].astype(np.float64) / 2**64 < fractions[s]].tolist())
    return chosen


def cap_pools(recipe, pools: dict[str, list[int]]) -> dict[str, list[int]]:
    """sources[].max_examples: a seeded pick of that many of the source's training rows."""
    capped = dict(pools)
    for spec in recipe.sources:
        if spec.max_examples is not None and len(pools[spec.name]) > spec.max_examples:
            rng = random.Random(f"{recipe.mixture.seed}:{spec.name}:max_examples")
            capped[spec.name] = sorted(rng.sample(pools[spec.name], spec.max_examples))
    return capped


def order_rows(mixture, picked: dict[str, list[int]], sources: dict) -> list[tuple[str, int]]:
    """The order of train.parquet's (source, row) pairs. `shuffle`: source order, rows in file
    order (the trainer draws a fresh seeded shuffle every epoch, so an append rewrites the split as
    one sequential copy). `curriculum`: simple to complex, by the difficulty proxy (assistant turns,
    then trained tokens), ties in a seeded random order; the trainer keeps this order."""
    if mixture.order == "shuffle":
        return [(name, i) for name in picked for i in sorted(picked[name])]
    rows = [(name, i) for name in picked for i in picked[name]]
    rng = random.Random(mixture.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    tiebreak = {position: k for k, position in enumerate(order)}
    order.sort(key=lambda k: (sources[rows[k][0]].turns[rows[k][1]], sources[rows[k][0]].trained[rows[k][1]],
                              tiebreak[k]))
    return [rows[k] for k in order]
