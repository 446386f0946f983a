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


def pick_eval(recipe, digests: dict[str, list[str]], kept: dict[str, list[int]]) -> dict[str, set[int]]:  # noqa: ANN001
    """Eval rows per source, chosen by each example's own hash (stable when other rows change):
    below the source's (or the mixture's) eval_fraction, or the eval_size smallest hashes overall."""
    if recipe.mixture.eval_size is not None:
        ranked = sorted((int(digests[s][i][:16], 16), s, i) for s in kept for i in kept[s])
        chosen: dict[str, set[int]] = {s: set() for s in kept}
        for _, source, i in ranked[:recipe.mixture.eval_size]:
            chosen[source].add(i)
        return chosen
    fractions = {s.name: s.eval_fraction if s.eval_fraction is not None else recipe.mixture.eval_fraction
                 for s in recipe.sources}
    return {s: {i for i in kept[s] if is_eval_example(digests[s][i], fractions[s])} for s in kept}


def cap_pools(recipe, pools: dict[str, list[int]]) -> dict[str, list[int]]:  # noqa: ANN001
    """sources[].max_examples: a seeded pick of that many of the source's training rows."""
    capped = dict(pools)
    for spec in recipe.sources:
        if spec.max_examples is not None and len(pools[spec.name]) > spec.max_examples:
            rng = random.Random(f"{recipe.mixture.seed}:{spec.name}:max_examples")
            capped[spec.name] = sorted(rng.sample(pools[spec.name], spec.max_examples))
    return capped


def order_rows(mixture, rows: list[T], sources: dict) -> list[T]:  # noqa: ANN001
    """The training order of (source, row) pairs. `shuffle`: a seeded shuffle. `curriculum`: simple
    to complex, by the difficulty proxy (assistant turns, then trained tokens), ties in a seeded
    random order, so the same recipe always gives the same order."""
    rng = random.Random(mixture.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    if mixture.order == "curriculum":
        rank = {position: k for k, position in enumerate(order)}  # the shuffle breaks ties
        order.sort(key=lambda k: (sources[rows[k][0]].turns[rows[k][1]], sources[rows[k][0]].trained[rows[k][1]],
                                  rank[k]))
    return [rows[k] for k in order]
