"""Mixture arithmetic: weights -> exact integer counts, seeded sampling, a stable eval split."""
from __future__ import annotations

import math
import random
from typing import Sequence, TypeVar

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
