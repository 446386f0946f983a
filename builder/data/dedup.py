"""Near-duplicate removal (MinHash + LSH over word shingles) and n-gram decontamination.

Everything here is deterministic across machines and runs: shingles are xxh64 digests, the
MinHash permutations come from `numpy.random.default_rng(seed)`, and no salted `hash()` value
ever decides a result. LSH only proposes candidates; the exact Jaccard of the shingle sets
decides, so pairs clearly above or below the threshold never depend on MinHash luck.

    near_duplicates(["a text ...", "a text ..."])   -> [None, 0]
    index = NgramIndex(13); index.add(prompt); index.first_overlap(train_text)
"""
from __future__ import annotations

import functools
import unicodedata
from pathlib import Path

import numpy as np
import xxhash

from builder.errors import DataError
from builder.files import read_json, read_jsonl, read_text

MERSENNE_61 = (1 << 61) - 1  # permutations are (a*x + b) mod this prime
_P = np.uint64(MERSENNE_61)
_MASK32 = np.uint64(0xFFFFFFFF)
_MASK29 = np.uint64((1 << 29) - 1)
# LSH banding favours recall: a missed pair is a kept duplicate, while a spurious candidate
# only costs one exact Jaccard check.
FALSE_POSITIVE_WEIGHT = 0.05
FALSE_NEGATIVE_WEIGHT = 0.95


def normalize_text(text: str) -> str:
    """Lowercase, Unicode NFKC, punctuation stripped to spaces, whitespace collapsed.

    "Punctuation" is every Unicode punctuation or symbol character (categories P* and S*, a
    superset of `string.punctuation`); letters, digits and combining marks are kept.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    # A per-text table over its distinct characters: cheap, and no module-level cache.
    table = {ord(c): " " for c in set(text) if unicodedata.category(c)[0] in "PS"}
    return " ".join(text.translate(table).split())


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """Every run of `n` consecutive words of the normalized text, in order (none if shorter)."""
    if n < 1:
        raise ValueError(f"n-gram size must be >= 1, got {n}")
    words = normalize_text(text).split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def shingle_hashes(text: str, k: int = 5) -> np.ndarray:
    """uint64 xxh64 of each word k-gram (words joined by spaces), in order, repeats included.

    A text shorter than k words is one shingle of all its words; an empty text has none.
    """
    if k < 1:
        raise ValueError(f"shingle size must be >= 1, got {k}")
    words = normalize_text(text).split()
    if not words:
        return np.empty(0, dtype=np.uint64)
    grams = [" ".join(words[i : i + k]) for i in range(max(1, len(words) - k + 1))]
    return np.array([xxhash.xxh64_intdigest(g.encode("utf-8")) for g in grams], dtype=np.uint64)


def _permute(x: np.ndarray, a_hi: np.ndarray, a_lo: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a*x + b) mod 2^61-1 as a (shingles, permutations) uint64 array, exact, never overflowing.

    x, a, b < 2^61; a is given split as a_hi*2^32 + a_lo so no product overflows. Each part's
    bits above 61 fold back onto the low bits because 2^61 = 1 (mod p). In-place to limit copies.
    """
    x = x[:, None]
    x_hi, x_lo = x >> np.uint64(32), x & _MASK32
    out = a_hi * x_hi  # < 2^58 with weight 2^64 = 8 (mod p)
    out <<= np.uint64(3)
    mid = a_hi * x_lo
    mid += a_lo * x_hi  # < 2^62 with weight 2^32: its bits from 29 up land at 2^61 = 1
    out += mid >> np.uint64(29)
    mid &= _MASK29
    mid <<= np.uint64(32)
    out += mid
    lo = a_lo * x_lo  # < 2^64
    out += lo >> np.uint64(61)
    lo &= _P
    out += lo
    out += b  # total < 2^63 + 2^61: still no overflow
    lo = out >> np.uint64(61)
    out &= _P
    out += lo  # now <= p + 3
    out[out >= _P] -= _P
    return out


@functools.lru_cache(maxsize=64)  # a pure function of its arguments; ~50 ms to compute
def _optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimizing the weighted area of LSH errors.

    As in datasketch: the false-positive area is the S-curve 1-(1-s^r)^b integrated below the
    threshold, the false-negative area its complement integrated above it. Errors are rounded
    before comparing so a last-bit difference in `pow` between machines cannot change the pick.
    """
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.float64)
    b, r = pairs[:, :1], pairs[:, 1:]
    below, above = np.linspace(0.0, threshold, 1001), np.linspace(threshold, 1.0, 1001)
    fp = np.trapezoid(1.0 - (1.0 - below**r) ** b, below, axis=1)
    fn = np.trapezoid((1.0 - above**r) ** b, above, axis=1)
    error = np.round(FALSE_POSITIVE_WEIGHT * fp + FALSE_NEGATIVE_WEIGHT * fn, 9)
    best = int(np.argmin(error))  # the first of equal errors: fewest bands
    return int(pairs[best, 0]), int(pairs[best, 1])


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard of two sorted, unique uint64 arrays; two empty sets count as identical."""
    if a.size == 0 and b.size == 0:
        return 1.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


class NearDuplicateIndex:
    """MinHash + LSH over word 5-gram shingles. Insert texts in order; `add` says whether a text is a
    near duplicate (estimated Jaccard >= threshold, then confirmed by the exact Jaccard of the shingle
    sets) of one already kept.

    The estimate is the LSH banding: a kept text is a candidate when its signature agrees with
    the new one on a whole band. Among candidates whose exact Jaccard reaches the threshold,
    the earliest kept one is returned.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 0, k: int = 5):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {num_perm}")
        self.threshold, self.num_perm, self.seed, self.k = threshold, num_perm, seed, k
        self.bands, self.rows = _optimal_bands(threshold, num_perm)
        rng = np.random.default_rng(seed)
        a = rng.integers(1, MERSENNE_61, size=num_perm, dtype=np.uint64)
        self._b = rng.integers(0, MERSENNE_61, size=num_perm, dtype=np.uint64)
        self._a_hi, self._a_lo = a >> np.uint64(32), a & _MASK32
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._keys: list[int] = []  # kept texts, in insertion order
        self._sets: list[np.ndarray] = []  # their sorted unique shingle hashes

    def _signature(self, shingles: np.ndarray) -> np.ndarray:
        """MinHash signature (num_perm uint64 values) of a set of shingle hashes."""
        if shingles.size == 0:
            return np.full(self.num_perm, MERSENNE_61, dtype=np.uint64)
        return _permute(shingles % _P, self._a_hi, self._a_lo, self._b).min(axis=0)

    def _band_keys(self, signature: np.ndarray) -> list[bytes]:
        # Little-endian bytes so a band key is the same on every machine.
        sig = signature.astype("<u8")
        return [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]

    def add(self, key: int, text: str) -> int | None:
        """If `text` near-duplicates a kept text, return that kept text's key and keep nothing;
        else keep it under `key` and return None."""
        shingles = np.unique(shingle_hashes(text, self.k))
        band_keys = self._band_keys(self._signature(shingles))
        candidates = sorted({i for bucket, bk in zip(self._buckets, band_keys) for i in bucket.get(bk, ())})
        for i in candidates:
            if _jaccard(shingles, self._sets[i]) >= self.threshold:
                return self._keys[i]
        slot = len(self._keys)
        self._keys.append(key)
        self._sets.append(shingles)
        for bucket, bk in zip(self._buckets, band_keys):
            bucket.setdefault(bk, []).append(slot)
        return None


def near_duplicates(texts: list[str], threshold: float = 0.8, seed: int = 0) -> list[int | None]:
    """For each text in order: the index of the earlier kept text it near-duplicates, or None (kept)."""
    index = NearDuplicateIndex(threshold=threshold, seed=seed)
    return [index.add(i, text) for i, text in enumerate(texts)]


class NgramIndex:
    """Word n-grams of reference texts (eval examples, benchmark prompts) for decontamination.

    N-grams are held as xxh64 digests of the space-joined words (8 bytes each instead of a
    string); the n-gram returned by `first_overlap` is always the query text's own words.
    """

    def __init__(self, n: int = 13):
        if n < 1:
            raise ValueError(f"n-gram size must be >= 1, got {n}")
        self.n = n
        self._grams: set[int] = set()

    def add(self, text: str) -> None:
        self._grams.update(xxhash.xxh64_intdigest(" ".join(g).encode("utf-8")) for g in word_ngrams(text, self.n))

    def __len__(self) -> int:
        return len(self._grams)

    def first_overlap(self, text: str) -> str | None:
        """The first n-gram of `text` (words joined by spaces) that a reference text also has, or None.
        Texts shorter than n words never match (so short prompts are not dropped on common phrases)."""
        for gram in word_ngrams(text, self.n):
            joined = " ".join(gram)
            if xxhash.xxh64_intdigest(joined.encode("utf-8")) in self._grams:
                return joined
        return None


def _strings(value: object) -> list[str]:
    """Every non-blank string inside a JSON value: lists in order, dict values in sorted key order."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return [s for key in sorted(value) for s in _strings(value[key])]
    return []  # numbers, booleans and null are not prompts


def read_benchmark_texts(path: Path) -> list[str]:
    """Prompts from a benchmark file: .txt one per non-empty line; .jsonl one JSON value per line and .json
    a list (or an object of lists) of values, where every string inside a value (recursively, dict
    values in sorted key order) is one text. Raise DataError naming the file (and line, for text
    that is not UTF-8 or not JSON) for a bad file or an unknown suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = read_text(path).replace("\r\n", "\n").replace("\r", "\n").split("\n")  # universal newlines
        return [line.strip() for line in lines if line.strip()]
    if suffix == ".jsonl":
        return [text for _, value in read_jsonl(path) for text in _strings(value)]
    if suffix != ".json":
        raise DataError(f"{path}: unknown benchmark file suffix {path.suffix!r}; expected .txt, .jsonl or .json")
    data = read_json(path)
    if isinstance(data, dict):
        for key in sorted(data):
            if not isinstance(data[key], list):
                raise DataError(f"{path}: key {key!r} holds {type(data[key]).__name__}; expected a list of values")
    elif not isinstance(data, list):
        raise DataError(f"{path}: top level is {type(data).__name__}; expected a list or an object of lists")
    return _strings(data)


def conversation_text(messages: list[dict]) -> str:
    """The user and assistant contents of a conversation, for near-dedup and decontamination."""
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


class Deduplicator:
    """Across sources, in source order: the first occurrence wins (exact: the normalised
    conversation's digest; near: MinHash/LSH over word 5-grams, confirmed by exact Jaccard).
    Memory: a digest per example (~100 bytes a row in Python: ~100 MB per million rows), and for
    `near` the LSH bands and shingle sets of the examples kept (~1 KB a row: ~1 GB per million)."""

    def __init__(self, mode: str, threshold: float, seed: int, describe=str):
        # describe(where) names an example in a duplicate's detail, called only for duplicates:
        # `where` can be a cheap tuple, so a million rows cost no strings.
        self.mode, self.seen, self.near, self.describe = mode, {}, None, describe
        self.bulk_seen: list = []  # check_exact's per-source sorted new digests, first rows, name
        if mode == "near":
            self.near = NearDuplicateIndex(threshold=threshold, seed=seed)
        self.count = 0

    def check(self, digest: str, messages: list[dict] | None, where) -> tuple[str, str] | None:
        """None to keep the example, else (reason, detail); `where` identifies the example."""
        if self.mode == "none":
            return None
        first = self.seen.setdefault(digest, where)
        if first is not where:
            return "duplicate", f"same as {self.describe(first)}"
        if self.near is not None:
            self.count += 1
            twin = self.near.add(self.count, conversation_text(messages))
            if twin is not None:
                return "near_duplicate", f"near-duplicate of an earlier example (#{twin} in source order)"
        return None

    def check_exact(self, name: str, digests) -> tuple[list[int], list[tuple[int, tuple[str, str]]]]:
        """check() over a whole source when there is no near-dedup, in bulk: (rows kept, [(row,
        (reason, detail))]). The same decisions, found by sorting the digests (a numpy bytes
        array): a row is dropped when an earlier row of its source, or any earlier source, has
        its digest."""
        import numpy as np

        digests = np.asarray(digests, dtype="S")
        if self.mode == "none" or not len(digests):
            return list(range(len(digests))), []
        unique, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        owner = [(name, f) for f in first.tolist()]  # who has each unique digest first
        new = np.ones(len(unique), dtype=bool)
        for before, rows, source in self.bulk_seen:
            at = np.minimum(np.searchsorted(before, unique), len(before) - 1)
            hit = new & (before[at] == unique)
            for u in np.flatnonzero(hit).tolist():
                owner[u] = (source, int(rows[at[u]]))
            new &= ~hit
        if new.any():
            self.bulk_seen.append((unique[new], first[new], name))
        dropped = (first[inverse] != np.arange(len(digests))) | ~new[inverse]
        drops = [(i, ("duplicate", f"same as {self.describe(owner[inverse[i]])}"))
                 for i in np.flatnonzero(dropped).tolist()]
        return np.flatnonzero(~dropped).tolist(), drops


def decontaminate(recipe, root: Path, sources: dict, eval_rows: dict[str, set[int]],
                  pools: dict[str, list[int]]) -> dict[str, list[tuple[int, str]]]:
    """Train rows sharing a word n-gram with an eval example or a benchmark file: {source: [(row, n-gram)]}.
    Memory: the n-gram hashes of the eval split and benchmark files only (8 bytes an n-gram)."""
    spec = recipe.decontaminate
    index = NgramIndex(spec.ngram)
    for path in spec.files:
        try:
            texts = read_benchmark_texts(root / path)
        except DataError as exc:
            raise DataError(f"decontaminate.files: {exc}") from None
        for text in texts:
            index.add(text)
    if spec.against_eval:
        for name, rows in eval_rows.items():
            for i, messages in enumerate(sources[name].messages()):
                if i in rows:
                    index.add(conversation_text(messages))
    hits: dict[str, list[tuple[int, str]]] = {}
    for name, pool in pools.items():
        wanted = set(pool)
        for i, messages in enumerate(sources[name].messages()):
            if i in wanted:
                overlap = index.first_overlap(conversation_text(messages))
                if overlap is not None:
                    hits.setdefault(name, []).append((i, overlap))
    return hits
