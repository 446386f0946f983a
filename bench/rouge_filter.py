"""Benchmark: the Self-Instruct ROUGE-L novelty filter, brute force vs builder.generate.rouge.NoveltyIndex.

    .venv/bin/python bench/rouge_filter.py [--small 1000] [--sizes 10000 50000]

Candidates are instructions made from the 175 Self-Instruct seed tasks in ../shared/data (else from
the demo data): a seed's length and first word, the other words Zipfian over an open vocabulary (as
generated text is), a third of them near-copies of an earlier candidate. Each candidate is kept when
its ROUGE-L F with every kept one is at most 0.7, as in the paper. Prints, in one run: the
brute-force filter (the paper's code path: rouge-score against every kept instruction) at the small size;
the index at every size; whether both keep exactly the same candidates; and time per candidate at
the largest size against the small one (near-linear: it stays close to 1 while brute force grows
with the number kept)."""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from builder.generate.rouge import NoveltyIndex, rouge_tokens

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "alpaca_seed_tasks.jsonl"

THRESHOLD = 0.7
VOCABULARY = 200_000  # words of the open vocabulary: the seeds' own by frequency, then new ones


def seeds() -> list[str]:
    if SHARED.is_file():
        return [json.loads(line)["instruction"] for line in SHARED.read_text().splitlines()]
    return [json.loads(line)["instruction"] for line in (REPO / "data" / "demo_alpaca.jsonl").read_text().splitlines()]


def candidates(base: list[str], count: int, seed: int = 0) -> list[str]:
    """Instructions with natural word statistics: a seed instruction's length and first word
    (write, give, classify, ...), the other words drawn Zipfian from an open vocabulary (the seeds'
    words by frequency, then an unbounded tail of new words, as generated text keeps bringing);
    a third of the candidates are near-copies (one word changed) of an earlier candidate, the
    duplicates the filter exists to catch."""
    from collections import Counter

    rng = random.Random(seed)
    counts = Counter(w.lower() for text in base for w in text.split())
    vocabulary = [w for w, _ in counts.most_common()]

    def word() -> str:
        rank = int(VOCABULARY ** rng.random())  # Zipf's law (frequency ~ 1/rank) over VOCABULARY words
        return vocabulary[rank - 1] if rank <= len(vocabulary) else f"w{rank}"

    out: list[str] = []
    for _ in range(count):
        if out and rng.random() < 1 / 3:
            words = rng.choice(out).split()
            words[rng.randrange(len(words))] = word()
        else:
            template = rng.choice(base).split()
            words = template[:1] + [word() for _ in template[1:]]
        out.append(" ".join(words))
    return out


def brute_force(texts: list[str]) -> tuple[list[int], float]:
    from rouge_score import rouge_scorer, tokenize

    started = time.perf_counter()
    kept, kept_tokens = [], []
    for k, text in enumerate(texts):
        tokens = tokenize.tokenize(text, None)
        if all(rouge_scorer._score_lcs(tokens, other).fmeasure <= THRESHOLD for other in kept_tokens):
            kept.append(k)
            kept_tokens.append(tokens)
    return kept, time.perf_counter() - started


def indexed(texts: list[str], hint: list[str]) -> tuple[list[int], float, int]:
    started = time.perf_counter()
    index = NoveltyIndex(THRESHOLD, [rouge_tokens(t) for t in hint])
    kept = []
    for k, text in enumerate(texts):
        tokens = rouge_tokens(text)
        if index.most_similar(tokens)[0] is None:
            index.add(tokens, k)
            kept.append(k)
    return kept, time.perf_counter() - started, index.comparisons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000, help="size for the brute-force baseline")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000])
    args = parser.parse_args()
    base = seeds()
    print(f"# ROUGE-L novelty filter (threshold {THRESHOLD}): {len(base)} seed instructions from "
          f"{'../shared/data' if SHARED.is_file() else 'the demo data'}")
    print("\n| filter | candidates | kept | seconds | ms per candidate | LCS tables per candidate |")
    print("|---|---|---|---|---|---|")
    texts = candidates(base, args.small)
    brute_kept, brute_s = brute_force(texts)
    print(f"| brute force (rouge-score vs every kept) | {args.small} | {len(brute_kept)} | {brute_s:.2f} | "
          f"{1000 * brute_s / args.small:.3f} | {sum(range(len(brute_kept))) / args.small:.0f}+ |")
    rows = {}
    for size in [args.small, *args.sizes]:
        kept, seconds, comparisons = indexed(candidates(base, size), base)
        rows[size] = (kept, seconds)
        print(f"| NoveltyIndex | {size} | {len(kept)} | {seconds:.2f} | {1000 * seconds / size:.3f} | "
              f"{comparisons / size:.1f} |")
    same = rows[args.small][0] == brute_kept
    largest = max(args.sizes)
    per_small, per_large = rows[args.small][1] / args.small, rows[largest][1] / largest
    print("\n| ratio | value |\n|---|---|")
    print(f"| same candidates kept as brute force at {args.small} | {'yes' if same else 'NO'} |")
    print(f"| brute force / index, seconds at {args.small} | {brute_s / rows[args.small][1]:.1f}x |")
    print(f"| index time per candidate at {largest} / at {args.small} | {per_large / per_small:.2f} |")


if __name__ == "__main__":
    main()
