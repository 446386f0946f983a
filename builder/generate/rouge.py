"""The Self-Instruct novelty filter: ROUGE-L against every kept instruction, near-linear.

Self-Instruct keeps a candidate instruction only if its ROUGE-L F-measure with every instruction
kept so far is at most 0.7, computed by the `rouge-score` package (no stemming). Comparing each
candidate with all kept ones is quadratic: 50k instructions are over a billion LCS tables.

`NoveltyIndex` makes the same decisions with far fewer comparisons. ROUGE-L F is 2·LCS/(m+n) for
token counts m and n, and the LCS is at most the multiset overlap of the two token lists. So a
pair can pass the threshold only if (a) the lengths are close enough (2·min(m,n)/(m+n) > t), and
(b) the overlap reaches a bound set by the lengths. (b) is enforced by prefix filtering: with
every token occurrence placed in one fixed global order (rare tokens first), two lists whose
overlap reaches α must share a token among the first m−α+1 of each. Kept instructions are
indexed by their prefix tokens (with each token's position in that order); a candidate is
compared (exact LCS, the package's own float arithmetic) only with kept instructions that share a
prefix token and pass the length bound, PPJoin's positional bound (the overlap still reachable
from the positions where they first share a token) and the multiset-overlap bound.
The order ranks tokens by their count in the seed tasks (frequent words last, unseen ones
first), fixed before the first instruction is indexed, so the filter is exact for any input.

    index = NoveltyIndex(0.7, seed_token_lists)
    score, twin = index.most_similar(rouge_tokens(text))   # (max F above 0.7, its id) or (None, None)
    index.add(rouge_tokens(text), id)
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_VALID = re.compile(r"^[a-z0-9]+$")
SLACK = 1e-9  # the bounds prune only pairs that are below the threshold by more than float error


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenization (no stemmer): lowercase, non-alphanumerics to spaces, split."""
    return [t for t in _SPACES.split(_NON_ALPHANUM.sub(" ", text.lower())) if _VALID.match(t)]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one DP row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f(target: list[str], prediction: list[str]) -> float:
    """ROUGE-L F-measure exactly as rouge_score.rouge_scorer._score_lcs computes it (same floats)."""
    if not target or not prediction:
        return 0.0
    lcs = lcs_length(target, prediction)
    precision, recall = lcs / len(prediction), lcs / len(target)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _min_partner(m: int, t: float) -> int:
    """The smallest length n another list can have and still score above t with a list of m tokens
    (2·min(m, n)/(m + n) > t)."""
    return math.floor(t * m / (2 - t)) + 1


def prefix_length(m: int, threshold: float) -> int:
    """How many of a list's first tokens (in the global order) must hold a shared token for any
    partner of a compatible length to reach the overlap that scoring above the threshold needs."""
    t = threshold - SLACK
    overlap = math.floor(t * (m + _min_partner(m, t)) / 2) + 1  # the least overlap over compatible partners
    return max(0, m - overlap + 1)


class NoveltyIndex:
    """Kept instructions, indexed for the ROUGE-L novelty decision (see the module docstring)."""

    def __init__(self, threshold: float, order_hint: list[list[str]] = ()):
        self.threshold = threshold
        counts = Counter(t for tokens in order_hint for t in tokens)
        self.rank = lambda token: counts.get(token, 0)  # fixed before anything is indexed
        self.postings: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)  # -> (kept, position)
        self.kept: list[list[str]] = []
        self.bags: list[Counter] = []
        self.ids: list[object] = []
        self.comparisons = 0

    def _ordered(self, tokens: list[str]) -> list[tuple[str, int]]:
        """The list's token occurrences in the global order (the k-th occurrence of a token is its
        own element, so overlaps count as multisets)."""
        seen: Counter = Counter()
        occurrences = []
        for token in tokens:
            occurrences.append((token, seen[token]))
            seen[token] += 1
        return sorted(occurrences, key=lambda o: (self.rank(o[0]), o[0], o[1]))

    def most_similar(self, tokens: list[str]) -> tuple[float | None, object]:
        """(the highest ROUGE-L F above the threshold against a kept instruction, its id), or
        (None, None) when the candidate is novel; exactly the brute-force decision.

        Candidates come from the prefix tokens' index entries, with PPJoin's positional bound: when
        the candidate's i-th token (in the global order) is a kept list's j-th, their overlap is at
        most the matches found before plus 1 + min(m - i - 1, n - j - 1)."""
        m = len(tokens)
        if not m:
            return None, None
        t = self.threshold - SLACK
        found: dict[int, int] = {}  # kept index -> prefix matches so far (-1: ruled out)
        for i, occurrence in enumerate(self._ordered(tokens)[:prefix_length(m, self.threshold)]):
            for k, j in self.postings.get(occurrence, ()):
                count = found.get(k, 0)
                if count < 0:
                    continue
                n = len(self.kept[k])
                needed = math.floor(t * (m + n) / 2) + 1  # the overlap F > t needs
                if 2 * min(m, n) / (m + n) <= t or count + 1 + min(m - i - 1, n - j - 1) < needed:
                    found[k] = -1
                else:
                    found[k] = count + 1
        bag = Counter(tokens)
        best, best_id = None, None
        for k in sorted(k for k, count in found.items() if count > 0):
            n, other = len(self.kept[k]), self.bags[k]
            overlap = sum(min(c, other[w]) for w, c in bag.items() if w in other)  # no Counter built per pair
            if 2 * overlap / (m + n) <= t:  # LCS <= multiset overlap
                continue
            self.comparisons += 1
            score = rouge_l_f(tokens, self.kept[k])
            if score > self.threshold and (best is None or score > best):
                best, best_id = score, self.ids[k]
        return best, best_id

    def add(self, tokens: list[str], identifier: object) -> None:
        k = len(self.kept)
        self.kept.append(tokens)
        self.bags.append(Counter(tokens))
        self.ids.append(identifier)
        for j, occurrence in enumerate(self._ordered(tokens)[:prefix_length(len(tokens), self.threshold)]):
            self.postings[occurrence].append((k, j))
