"""builder/data/dedup.py: normalization, shingles, MinHash/LSH near duplicates, n-gram decontamination."""
from __future__ import annotations

import numpy as np
import pytest
import xxhash

from builder.data.dedup import (
    MERSENNE_61,
    NearDuplicateIndex,
    NgramIndex,
    near_duplicates,
    normalize_text,
    read_benchmark_texts,
    shingle_hashes,
    word_ngrams,
)
from builder.errors import DataError

# 60 words of ordinary prose, no repeated 5-gram: 56 shingles.
BASE = (
    "The river town woke slowly under a grey sky while fishermen dragged their boats across "
    "wet stones toward the water. Children carried baskets of bread from the bakery near the "
    "old bridge, and a dog followed them barking at gulls. By noon the market square filled "
    "with traders selling copper pots, woollen scarves, dried herbs, and bright painted wooden toys."
)
OTHER = (
    "Quantum error correction protects fragile qubits by spreading logical information across "
    "many physical qubits, so that local noise can be detected through syndrome measurements "
    "and reversed before it accumulates. Surface codes arrange these qubits on a lattice where "
    "each stabilizer touches only neighbours, which keeps the hardware requirements modest for "
    "current superconducting devices and trapped ion experiments alike today."
)


def replace_word(text: str, position: int, word: str) -> str:
    words = text.split()
    words[position] = word
    return " ".join(words)


def test_base_texts_have_the_sizes_the_tests_assume():
    assert len(BASE.split()) == 60
    assert len(set(shingle_hashes(BASE).tolist())) == 56


def test_normalize_text():
    assert normalize_text("Hello,   World!") == "hello world"
    assert normalize_text("ＦＵＬＬ width ﬁne") == "full width fine"  # NFKC folds fullwidth and ligatures
    assert normalize_text("don't-stop...now") == "don t stop now"
    assert normalize_text("a_b\tc\n\n  d ") == "a b c d"
    assert normalize_text("2+2=4 costs $5 «ok»") == "2 2 4 costs 5 ok"
    assert normalize_text("Café NAÏVE नमस्ते!") == "café naïve नमस्ते"  # accents, combining marks kept
    assert normalize_text(" ?! ") == ""


def test_word_ngrams():
    assert word_ngrams("The cat, the HAT.", 2) == [("the", "cat"), ("cat", "the"), ("the", "hat")]
    assert word_ngrams("The cat, the HAT.", 4) == [("the", "cat", "the", "hat")]
    assert word_ngrams("The cat, the HAT.", 5) == []
    with pytest.raises(ValueError):
        word_ngrams("a b", 0)


def test_shingle_hashes():
    got = shingle_hashes("A b, c d e F.")
    assert got.dtype == np.uint64
    assert got.tolist() == [xxhash.xxh64_intdigest(b"a b c d e"), xxhash.xxh64_intdigest(b"b c d e f")]
    assert shingle_hashes("Hi there!").tolist() == [xxhash.xxh64_intdigest(b"hi there")]
    assert shingle_hashes("a b c", k=2).tolist() == [xxhash.xxh64_intdigest(b"a b"), xxhash.xxh64_intdigest(b"b c")]
    assert shingle_hashes("...").shape == (0,) and shingle_hashes("").dtype == np.uint64


def test_signature_matches_python_integer_arithmetic():
    index = NearDuplicateIndex(num_perm=64, seed=7)
    a = [(int(h) << 32) | int(lo) for h, lo in zip(index._a_hi, index._a_lo)]
    b = [int(v) for v in index._b]
    xs = [0, 1, MERSENNE_61 - 1, MERSENNE_61, MERSENNE_61 + 5, 2**64 - 1, 2**63, 12345678901234567]
    xs += [int(v) for v in shingle_hashes(BASE)]
    expected = [min((ai * (x % MERSENNE_61) + bi) % MERSENNE_61 for x in xs) for ai, bi in zip(a, b)]
    assert index._signature(np.array(xs, dtype=np.uint64)).tolist() == expected


def test_lsh_parameters():
    index = NearDuplicateIndex(threshold=0.8, num_perm=128)
    assert (index.bands, index.rows) == (16, 8)
    exact = NearDuplicateIndex(threshold=1.0, num_perm=128)
    assert (exact.bands, exact.rows) == (1, 128)
    with pytest.raises(ValueError):
        NearDuplicateIndex(threshold=0.0)


def test_identical_and_lightly_edited_texts_are_near_duplicates():
    assert near_duplicates([BASE, BASE]) == [None, 0]
    assert near_duplicates([BASE, BASE.upper().replace(",", " ;")]) == [None, 0]
    # One word changed mid-text: 5 of 56 shingles differ, Jaccard 51/61 = 0.836.
    assert near_duplicates([BASE, replace_word(BASE, 30, "lantern")]) == [None, 0]


def test_unrelated_and_half_rewritten_texts_are_kept():
    assert near_duplicates([BASE, OTHER]) == [None, None]
    half = " ".join(BASE.split()[:30] + OTHER.split()[:30])
    assert near_duplicates([BASE, half]) == [None, None]
    # Two words changed far apart: Jaccard 46/66 = 0.70, below 0.8.
    twice = replace_word(replace_word(BASE, 20, "lantern"), 40, "violin")
    assert near_duplicates([BASE, twice]) == [None, None]


def test_near_duplicates_point_to_the_first_kept_text():
    edited = replace_word(BASE, 30, "lantern")
    texts = [BASE, OTHER, edited, BASE, replace_word(OTHER, 10, "sparrow"), OTHER]
    assert near_duplicates(texts) == [None, None, 0, 0, 1, 1]


def test_dropped_texts_are_not_kept():
    once = replace_word(BASE, 20, "lantern")  # near-duplicates BASE, so it is dropped
    twice = replace_word(once, 40, "violin")  # near-duplicates only `once`, which is not kept
    assert near_duplicates([BASE, once, twice]) == [None, 0, None]
    # `once` near-duplicates both kept texts (0.836 each); the earliest kept one is named.
    assert near_duplicates([BASE, twice, once]) == [None, None, 0]
    assert near_duplicates([twice, BASE, once]) == [None, None, 0]


def test_index_returns_the_kept_key():
    index = NearDuplicateIndex()
    assert index.add(100, BASE) is None
    assert index.add(200, OTHER) is None
    assert index.add(300, replace_word(BASE, 30, "lantern")) == 100
    assert index.add(400, BASE) == 100


def test_deterministic_and_independent_of_unrelated_texts_before():
    edited = replace_word(BASE, 30, "lantern")
    assert near_duplicates([BASE, edited, OTHER]) == near_duplicates([BASE, edited, OTHER]) == [None, 0, None]
    fillers = [replace_word(OTHER, i, f"filler{i}") for i in range(0, 60, 6)]  # near-duplicate OTHER only
    got = near_duplicates([OTHER, *fillers, BASE, edited])
    assert got[-2:] == [None, 11]
    for seed in (1, 2, 3):
        assert near_duplicates([BASE, edited, OTHER], seed=seed) == [None, 0, None]


def test_threshold_one_means_identical_shingle_sets():
    end_edit = replace_word(BASE, 59, "lantern")  # only the last shingle differs: 55/57
    assert near_duplicates([BASE, BASE.lower() + "!", end_edit], threshold=1.0) == [None, 0, None]
    assert near_duplicates([BASE, end_edit], threshold=0.8) == [None, 0]
    # Different texts with the same shingle set: a repeated 5-word cycle.
    assert near_duplicates(["a b c d e a b c d e", "a b c d e a b c d e a b c d e"], threshold=1.0) == [None, 0]


def test_empty_texts_are_duplicates_of_each_other():
    assert near_duplicates(["", BASE, "?!", OTHER]) == [None, None, 0, None]


BENCH = "Question: which planet in our solar system has the longest day measured in Earth hours, and why is that so?"


def test_ngram_index_catches_a_13_word_passage():
    index = NgramIndex(n=13)
    index.add(BENCH)
    assert len(index) == 20 - 13 + 1
    index.add("too short to hold any thirteen word n-gram")
    assert len(index) == 8
    words = normalize_text(BENCH).split()
    train = ("Some preamble here. PLANET in our Solar System has the longest day -- measured in Earth hours, "
             "and later text")
    assert index.first_overlap(train) == " ".join(words[2:15])
    assert index.first_overlap(train) == "planet in our solar system has the longest day measured in earth hours"


def test_ngram_index_ignores_a_12_word_overlap_and_short_texts():
    index = NgramIndex(n=13)
    index.add(BENCH)
    unrelated = "intro planet in our solar system has the longest day measured in earth unrelated words"
    assert index.first_overlap(unrelated) is None
    short = NgramIndex(n=13)
    short.add("what is the capital of france")
    assert len(short) == 0
    assert short.first_overlap("what is the capital of france") is None


def test_read_benchmark_texts_txt_jsonl_json(tmp_path):
    txt = tmp_path / "bench.txt"
    txt.write_text("first prompt\n\n   \n  second prompt  \r\nthird\rfourth\n", encoding="utf-8")
    assert read_benchmark_texts(txt) == ["first prompt", "second prompt", "third", "fourth"]  # universal newlines

    jsonl = tmp_path / "bench.jsonl"
    jsonl.write_text('{"q": "Q1", "a": ["A1", 3, null], "c": {"z": "Z", "b": "B"}}\n\n"plain"\n[1, "x", ""]\n')
    assert read_benchmark_texts(jsonl) == ["A1", "B", "Z", "Q1", "plain", "x"]

    as_list = tmp_path / "list.json"
    as_list.write_text('[{"prompt": "P1"}, "P2"]')
    assert read_benchmark_texts(as_list) == ["P1", "P2"]
    as_object = tmp_path / "object.json"
    as_object.write_text('{"test": ["T1", {"q": "T2"}], "dev": ["D1"]}')
    assert read_benchmark_texts(as_object) == ["D1", "T1", "T2"]


@pytest.mark.parametrize("name,content,message", [
    ("bench.jsonl", b'{"q": "ok"}\n\n{"q": broken}\n', "bench.jsonl:3: not JSON: Expecting value at column 7"),
    ("bench.json", b'[\n  "ok",\n  oops\n]', "bench.json:3: not JSON: Expecting value at column 3"),
    ("bench.txt", b"fine\ncaf\xe9\n", "bench.txt:2: not UTF-8: byte 0xe9 at column 4"),
    ("scalar.json", b'"just a string"', "scalar.json: top level is str; expected a list or an object of lists"),
    ("bench.csv", b"a,b\n", "bench.csv: unknown benchmark file suffix '.csv'; expected .txt, .jsonl or .json"),
])
def test_read_benchmark_texts_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        read_benchmark_texts(path)
    assert str(caught.value) == f"{tmp_path}/{message}"


def test_bulk_exact_dedup_makes_the_per_row_decisions():
    import random

    from builder.data.dedup import Deduplicator

    rng = random.Random(0)
    for _ in range(200):
        sources = {f"s{k}": [f"{rng.randrange(12):032x}" for _ in range(rng.randrange(15))] for k in range(3)}
        one, bulk = (Deduplicator("exact", 0.8, 0, describe=lambda w: f"{w[0]} row {w[1]}") for _ in range(2))
        for name, digests in sources.items():
            kept, drops = [], []
            for i, digest in enumerate(digests):
                drop = one.check(digest, None, (name, i))
                (kept if drop is None else drops).append(i if drop is None else (i, drop))
            assert bulk.check_exact(name, digests) == (kept, drops)
