"""Formats, sources and mixture arithmetic: exact conversations, reject reasons and counts."""
from __future__ import annotations

import json
import random

import pytest

from builder.data.mixture import allocate_counts, hash_prefixes, is_eval_example, sample_examples
from builder.data.sources import raw_chunks, read_source, to_conversations
from builder.recipe.schema import SourceSpec


def read(tmp_path, name: str, content: str, fmt: str, **spec):
    (tmp_path / name).write_text(content)
    conversations, rejects, _ = read_source(SourceSpec(name="s", path=name, format=fmt, **spec), tmp_path)
    return conversations, rejects


def turns(conversation) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in conversation.messages]


def test_alpaca_rows_and_rejects(tmp_path):
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "output": "Hi!"},
            {"instruction": "Empty.", "input": "", "output": "  "},
            {"instruction": "No output."}]
    text = "\n".join(json.dumps(r) for r in rows) + "\n{not json\n"
    conversations, rejects = read(tmp_path, "a.jsonl", text, "alpaca")
    assert [turns(c) for c in conversations] == [
        [("user", "Add.\n\n2 and 3"), ("assistant", "5")], [("user", "Say hi."), ("assistant", "Hi!")]]
    assert [c.row for c in conversations] == [1, 2]
    assert [(r.row, r.reason) for r in rejects] == [(3, "empty_response"), (4, "missing_field"), (5, "bad_json")]


def test_sharegpt_roles_system_and_alternation(tmp_path):
    data = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                               {"from": "gpt", "value": "a"}]},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"},
                               {"from": "gpt", "value": "a"}]},
            {"conversations": [{"from": "robot", "value": "q"}]},
            {"conversations": [{"from": "user", "value": "q"}]}]
    conversations, rejects = read(tmp_path, "c.json", json.dumps(data), "sharegpt")
    assert [turns(c) for c in conversations] == [[("system", "S"), ("user", "q"), ("assistant", "a")]]
    assert [r.reason for r in rejects] == ["roles_not_alternating", "bad_role", "no_final_answer"]


def test_messages_prompt_completion_self_instruct_and_csv(tmp_path):
    conversations, _ = read(tmp_path, "m.jsonl", json.dumps(
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}), "messages")
    assert turns(conversations[0]) == [("user", "u"), ("assistant", "a")]
    conversations, _ = read(tmp_path, "p.csv", "prompt,completion\nWhy?,Because.\n", "prompt_completion")
    assert turns(conversations[0]) == [("user", "Why?"), ("assistant", "Because.")]
    row = {"instruction": "Classify.", "instances": [{"input": "good", "output": "positive"},
                                                      {"input": "", "output": "neutral"}]}
    conversations, _ = read(tmp_path, "si.jsonl", json.dumps(row), "self_instruct")
    assert [turns(c) for c in conversations] == [[("user", "Classify.\n\ngood"), ("assistant", "positive")],
                                                [("user", "Classify."), ("assistant", "neutral")]]


def test_json_object_of_arrays_and_glob(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.json").write_text(json.dumps({"b": [{"prompt": "p2", "completion": "c2"}],
                                                       "a": [{"prompt": "p1", "completion": "c1"}]}))
    (tmp_path / "d" / "2.jsonl").write_text(json.dumps({"prompt": "p3", "completion": "c3"}))
    conversations, _, rows = read_source(SourceSpec(name="s", path="d/*.json*", format="prompt_completion"), tmp_path)
    assert rows == 3
    assert [c.messages[0].content for c in conversations] == ["p1", "p2", "p3"]


@pytest.mark.parametrize("weights,total,expected", [
    ([3, 1], 2000, [1500, 500]),
    ([1, 1, 1], 10, [4, 3, 3]),       # the remainder goes to the earliest tie
    ([0.5, 0.25, 0.25], 7, [3, 2, 2]),  # quotas 3.5, 1.75, 1.75
    ([2, 1], 1, [1, 0]),
])
def test_allocate_counts_is_exact(weights, total, expected):
    counts = allocate_counts(weights, total)
    assert counts == expected and sum(counts) == total


def test_sampling_upsamples_whole_passes_then_samples():
    pool = list(range(5))
    picked = sample_examples(pool, 12, random.Random(0))
    assert picked[:10] == pool + pool and len(set(picked[10:])) == 2
    assert sorted(sample_examples(pool, 3, random.Random(0))) == sorted(sample_examples(pool, 3, random.Random(0)))
    assert sample_examples([], 3, random.Random(0)) == []


def test_eval_split_is_a_function_of_the_example():
    assert is_eval_example("0" * 32, 0.05) and not is_eval_example("f" * 32, 0.05)
    assert not is_eval_example("0" * 32, 0.0)


def test_jsonl_chunks_split_lines_as_the_file_reader_does(tmp_path):
    """A carriage return inside a line (JSON whitespace) is not a line break: chunked reading and
    plain reading give the same rows and row numbers."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"instruction": "Hi",\r "output": "Hello."}\n\n{"instruction": "Yo", "output": "Yes."}\n')
    spec = SourceSpec(name="a", path="a.jsonl", format="alpaca")
    plain = read_source(spec, tmp_path)
    chunked = [to_conversations(spec, c.file, c.numbered()) for c in raw_chunks(spec, tmp_path, 2)]
    assert [(c.row, c.messages) for c in plain[0]] == [(c.row, c.messages) for got in chunked for c in got[0]]
    assert [c.row for c in plain[0]] == [1, 3] and not plain[1]


def test_malformed_jsonl_rows_are_rejected_with_the_details_stored_rejects_hold(tmp_path):
    """Chunks in the store and rejects.jsonl hold these details: a new wording would give a cached
    chunk and a rebuilt one different bytes under the same key (so it bumps shards.SHARD_VERSION).
    The row number is the line; the detail names only the column within the row."""
    (tmp_path / "a.jsonl").write_bytes(b'{not json\n{"instruction": "Hi", "output": "Hello."}\n'
                                       b'{"instruction": "caf\xe9"}\n{"instruction": "Cut", \n')
    spec = SourceSpec(name="a", path="a.jsonl", format="alpaca")
    conversations, rejects, rows = read_source(spec, tmp_path)
    assert [c.row for c in conversations] == [2] and rows == 4
    assert [(r.row, r.reason, r.detail) for r in rejects] == [
        (1, "bad_json", "not JSON: Expecting property name enclosed in double quotes at column 2"),
        (3, "bad_encoding", "not UTF-8: byte 0xe9 at column 21"),
        (4, "bad_json", "not JSON: Expecting property name enclosed in double quotes at column 24")]
    chunked = [r for c in raw_chunks(spec, tmp_path, 3) for r in to_conversations(spec, c.file, c.numbered())[1]]
    assert chunked == rejects


def test_vectorised_hash_prefixes_read_digests_as_is_eval_example_does():
    import random

    rng = random.Random(5)
    digests = [f"{rng.getrandbits(128):032x}" for _ in range(2000)] + ["0" * 32, "f" * 32, "8" + "0" * 31]
    assert hash_prefixes(digests).tolist() == [int(d[:16], 16) for d in digests]
    for fraction in (0.0, 0.05, 0.5, 1.0):
        vector = (hash_prefixes(digests).astype("float64") / 2**64 < fraction).tolist()
        assert vector == [is_eval_example(d, fraction) for d in digests]
