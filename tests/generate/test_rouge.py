"""The Self-Instruct novelty filter (builder/generate/rouge.py): rouge-score's exact ROUGE-L decisions,
brute force against the index."""
import json
import random

import pytest
from helpers import REPO
from rouge_score import rouge_scorer, tokenize

from builder.generate.rouge import NoveltyIndex, prefix_length, rouge_l_f, rouge_tokens

SHARED = REPO.parent / "shared" / "data" / "alpaca_seed_tasks.jsonl"
WORDS = ("write a short poem story list email about the ocean summer city dog explain why how what "
         "give three examples of classify this sentence as positive or negative translate into french").split()


def _instructions(rng: random.Random, count: int) -> list[str]:
    """Random instructions, many of them near-copies of earlier ones (a word changed or added)."""
    texts = []
    for _ in range(count):
        if texts and rng.random() < 0.5:
            words = rng.choice(texts).split()
            k = rng.randrange(len(words))
            words[k:k + 1] = rng.sample(WORDS, rng.randrange(3))
            texts.append(" ".join(words) or "empty")
        else:
            texts.append(" ".join(rng.choices(WORDS, k=rng.randrange(3, 16))).capitalize() + rng.choice(".?!"))
    return texts


def test_tokens_and_scores_equal_rouge_score_on_sampled_pairs():
    rng = random.Random(0)
    texts = _instructions(rng, 300) + ["Ünïcode café, 3 ideas!", "", "42"]
    if SHARED.is_file():
        texts += [json.loads(line)["instruction"] for line in SHARED.read_text().splitlines()]
    for text in texts:
        assert rouge_tokens(text) == tokenize.tokenize(text, None)
    for _ in range(3000):
        a, b = rng.choice(texts), rng.choice(texts)
        expected = rouge_scorer._score_lcs(tokenize.tokenize(a, None), tokenize.tokenize(b, None)).fmeasure
        assert rouge_l_f(rouge_tokens(a), rouge_tokens(b)) == expected
        assert (rouge_l_f(rouge_tokens(a), rouge_tokens(b)) > 0.7) == (expected > 0.7)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_the_index_keeps_exactly_what_brute_force_keeps(threshold):
    rng = random.Random(threshold)
    texts = _instructions(rng, 400)
    kept_brute, kept_index = [], []
    index = NoveltyIndex(threshold, [rouge_tokens(t) for t in texts[:20]])
    for k, text in enumerate(texts):
        tokens = tokenize.tokenize(text, None)
        scores = [rouge_scorer._score_lcs(tokens, tokenize.tokenize(texts[j], None)).fmeasure for j in kept_brute]
        if not scores or max(scores) <= threshold:
            kept_brute.append(k)
        best, twin = index.most_similar(rouge_tokens(text))
        if best is None:
            kept_index.append(k)
            index.add(rouge_tokens(text), k)
        else:
            assert best == max(scores) and best > threshold
    assert kept_index == kept_brute
    assert 0 < len(kept_index) < len(texts)
    if threshold >= 0.7:  # the paper's 0.7: far fewer LCS tables than brute force, even on a 30-word vocabulary
        assert index.comparisons < len(texts) * len(kept_index) / 4


def test_prefix_lengths():
    assert prefix_length(1, 0.7) == 1 and prefix_length(10, 0.7) == 5
    assert all(0 < prefix_length(m, 0.7) <= m for m in range(1, 200))
