"""The dataset stage end to end on a tokenizer-only base (no model weights, seconds per build):
inline rows, column mapping, preference pairs, filters, exact and near dedup, the reject-rate
threshold, eval split options, decontamination, per-source caps and passes, determinism, hub
sources offline, and `tunefile stats`."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from builder.cli import main
from builder.engine.build import build_recipe
from builder.errors import DataError, RecipeError
from builder.recipe.project import load_project

LONG = ("The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden "
        "fence near the river bank on a warm summer afternoon in the quiet valley")


def alpaca(*pairs: tuple[str, str]) -> str:
    return "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in pairs)


def write_recipe(root: Path, body: str) -> None:
    mixture = "" if "mixture:" in body else "mixture: {eval_fraction: 0.0}\n"
    (root / "recipes" / "r.yaml").write_text("name: r\nbase: {model: models/tok}\ntemplate: chatml\n" + mixture + body)


def build(root: Path) -> dict:
    build_recipe(load_project(root), "r", "dataset")
    return json.loads((root / "build/r/dataset/stats.json").read_text())


def rows(root: Path, split: str = "train") -> list[dict]:
    return pq.read_table(root / f"build/r/dataset/{split}.parquet").to_pylist()


def rejects(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "build/r/dataset/rejects.jsonl").read_text().splitlines()]


def test_inline_rows_column_mapping_and_preference_pairs(tokenizer_project):
    (tokenizer_project / "data" / "prefs.jsonl").write_text(
        json.dumps({"question": "Pick a colour.", "good": "Blue.", "bad": "Dunno."}) + "\n"
        + json.dumps({"question": "Same?", "good": "Yes.", "bad": " Yes. "}) + "\n")
    write_recipe(tokenizer_project, """sources:
  - name: inline
    format: alpaca
    fields: {instruction: q, output: a}
    examples: [{q: "Name a fruit.", a: "Apple."}, {q: "Name a tree.", a: "Oak."}, {q: "No answer."}]
  - name: prefs
    path: data/prefs.jsonl
    format: preference
    fields: {prompt: question, chosen: good, rejected: bad}
mixture: {eval_fraction: 0.0, max_reject_rate: 0.5}
""")
    stats = build(tokenizer_project)
    got = sorted((r["source"], r["messages"][-1]["content"], r["rejected"]) for r in rows(tokenizer_project))
    assert got == [("inline", "Apple.", None), ("inline", "Oak.", None), ("prefs", "Blue.", "Dunno.")]
    assert [(r["source"], r["file"], r["row"], r["reason"]) for r in rejects(tokenizer_project)] == [
        ("inline", "(inline)", 3, "missing_field"), ("prefs", "data/prefs.jsonl", 2, "same_answers")]
    assert "fields: {'instruction': 'q', 'output': 'a'}" in rejects(tokenizer_project)[0]["detail"]
    assert stats["sources"]["inline"]["rows"] == 3 and stats["sources"]["inline"]["malformed"] == 1


def test_filters_reject_with_their_own_names(tokenizer_project):
    (tokenizer_project / "data" / "a.jsonl").write_text(alpaca(
        ("Hi", "Hello there, friend."),                  # min_chars: 22 < 25
        ("Tell me a word of your choosing.", "No"),      # min_response_chars: 2 < 3
        ("What is your password?", "It is hunter2."),    # deny_patterns
        ("Name a big cat.", "A lion is a big cat."),     # kept
        ("Name a small bird.", "A wren is a small bird.")))  # kept
    (tokenizer_project / "data" / "c.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "One?"}, {"role": "assistant", "content": "One answer here."},
        {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "Two answers here."}]}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Three, in short?"},
                                   {"role": "assistant", "content": "Three answers here."}]}) + "\n")
    write_recipe(tokenizer_project, """sources:
  - {name: a, path: data/a.jsonl, format: alpaca}
  - {name: c, path: data/c.jsonl, format: messages}
filters: {min_chars: 25, min_response_chars: 3, max_turns: 3, deny_patterns: ["(?i)hunter\\\\d"]}
""")
    stats = build(tokenizer_project)
    assert stats["sources"]["a"]["rejected"] == {"deny_patterns": 1, "min_chars": 1, "min_response_chars": 1}
    assert stats["sources"]["a"]["filtered"] == 3 and stats["sources"]["a"]["malformed"] == 0
    assert stats["sources"]["c"]["rejected"] == {"max_turns": 1}
    assert sorted(r["messages"][0]["content"] for r in rows(tokenizer_project)) == [
        "Name a big cat.", "Name a small bird.", "Three, in short?"]


def test_min_tokens_filter_counts_rendered_tokens(tokenizer_project):
    (tokenizer_project / "data" / "a.jsonl").write_text(alpaca(("Hi", "Yo"), ("Name a big cat please.", LONG)))
    write_recipe(tokenizer_project, """sources: [{name: a, path: data/a.jsonl, format: alpaca}]
filters: {min_tokens: 20}
""")
    assert build(tokenizer_project)["sources"]["a"]["rejected"] == {"min_tokens": 1}


def test_exact_and_near_dedup_across_sources_keep_the_first(tokenizer_project):
    (tokenizer_project / "data" / "a.jsonl").write_text(alpaca(("Describe the scene.", LONG),
                                                              ("Name a colour.", "Red.")))
    near = LONG.replace("valley", "vale")  # one word of 30: Jaccard of word 5-grams 0.94
    (tokenizer_project / "data" / "b.jsonl").write_text(alpaca(
        ("Describe the scene.", near), ("Name a colour.", " Red. "), ("Name a shape.", "Circle.")))
    recipe = """sources:
  - {name: a, path: data/a.jsonl, format: alpaca}
  - {name: b, path: data/b.jsonl, format: alpaca}
mixture: {eval_fraction: 0.0, dedup: %s}
"""
    write_recipe(tokenizer_project, recipe % "exact")
    stats = build(tokenizer_project)
    assert stats["sources"]["b"]["rejected"] == {"duplicate": 1} and stats["sources"]["b"]["usable"] == 2
    assert [r["detail"] for r in rejects(tokenizer_project)] == ["same as a data/a.jsonl row 2"]  # the first one kept
    write_recipe(tokenizer_project, recipe % "near")
    stats = build(tokenizer_project)
    assert stats["sources"]["b"]["rejected"] == {"duplicate": 1, "near_duplicate": 1}
    assert stats["sources"]["b"]["deduplicated"] == 2 and stats["sources"]["a"]["usable"] == 2
    assert [(r["row"], r["reason"]) for r in rejects(tokenizer_project)] == [(1, "near_duplicate"), (2, "duplicate")]
    write_recipe(tokenizer_project, recipe % "none")
    assert build(tokenizer_project)["sources"]["b"]["usable"] == 3


def test_malformed_rows_over_the_threshold_fail_the_build_with_reasons(tokenizer_project):
    good = [json.dumps({"instruction": f"Say {i}.", "output": f"{i}."}) for i in range(8)]
    (tokenizer_project / "data" / "a.jsonl").write_text(
        "\n".join(good + ["{broken", json.dumps({"instruction": "x"})]) + "\n")
    write_recipe(tokenizer_project, "sources: [{name: a, path: data/a.jsonl, format: alpaca}]\n")
    with pytest.raises(DataError, match=r"2 of 10 rows are malformed \(20.0% > mixture.max_reject_rate 5.0%\); "
                                        r"first: data/a.jsonl row 9: bad_json"):
        build(tokenizer_project)
    assert not (tokenizer_project / "build/r/dataset").exists()
    write_recipe(tokenizer_project, "sources: [{name: a, path: data/a.jsonl, format: alpaca}]\n"
                          "mixture: {eval_fraction: 0.0, max_reject_rate: 0.2}\n")
    assert build(tokenizer_project)["sources"]["a"]["rejected"] == {"bad_json": 1, "missing_field": 1}


def test_eval_size_per_source_eval_fraction_and_decontamination(tokenizer_project):
    pairs = [(f"Question number {i}?", f"Answer number {i} is here.") for i in range(40)]
    pairs.append(("Recite the passage.", LONG))
    (tokenizer_project / "data" / "a.jsonl").write_text(alpaca(*pairs))
    (tokenizer_project / "data" / "b.jsonl").write_text(alpaca(*[(f"Other {i}?", f"Reply {i}.") for i in range(20)]))
    words = LONG.split()
    (tokenizer_project / "bench.txt").write_text(" ".join(words[3:16]) + "\n" + " ".join(words[20:32]) + "\n")
    write_recipe(tokenizer_project, """sources:
  - {name: a, path: data/a.jsonl, format: alpaca}
  - {name: b, path: data/b.jsonl, format: alpaca, eval_fraction: 0.0}
mixture: {eval_fraction: 0.25}
decontaminate: {ngram: 13, against_eval: false, files: [bench.txt]}
""")
    stats = build(tokenizer_project)
    assert stats["sources"]["b"]["eval"] == 0 and 0 < stats["sources"]["a"]["eval"] < 41
    hits = [r for r in rejects(tokenizer_project) if r["reason"] == "decontaminated"]
    assert len(hits) == 1 and hits[0]["row"] == 41 and " ".join(words[3:16]).lower() in hits[0]["detail"]
    assert stats["sources"]["a"]["train_pool"] == 41 - stats["sources"]["a"]["eval"] - 1
    write_recipe(tokenizer_project, """sources:
  - {name: a, path: data/a.jsonl, format: alpaca}
  - {name: b, path: data/b.jsonl, format: alpaca}
mixture: {eval_size: 7}
""")
    stats = build(tokenizer_project)
    assert len(rows(tokenizer_project, "eval")) == 7 == stats["eval_examples"]
    assert stats["sources"]["a"]["eval"] + stats["sources"]["b"]["eval"] == 7


def test_decontamination_against_the_eval_split(tokenizer_project):
    (tokenizer_project / "data" / "a.jsonl").write_text(
        alpaca(*[(f"Q{i}?", f"{LONG} Variant {i}.") for i in range(30)]))
    write_recipe(tokenizer_project, """sources: [{name: a, path: data/a.jsonl, format: alpaca}]
mixture: {eval_fraction: 0.2}
decontaminate: {ngram: 13}
""")
    stats = build(tokenizer_project)["sources"]["a"]
    assert stats["eval"] > 0 and stats["rejected"] == {"decontaminated": 30 - stats["eval"]}


def test_max_examples_and_epochs_shape_a_natural_size_mixture(tokenizer_project):
    (tokenizer_project / "data" / "a.jsonl").write_text(alpaca(*[(f"Q{i}?", f"A{i}.") for i in range(10)]))
    (tokenizer_project / "data" / "b.jsonl").write_text(alpaca(*[(f"R{i}?", f"B{i}.") for i in range(10)]))
    write_recipe(tokenizer_project, """sources:
  - {name: a, path: data/a.jsonl, format: alpaca, epochs: 2}
  - {name: b, path: data/b.jsonl, format: alpaca, max_examples: 4}
""")
    stats = build(tokenizer_project)
    assert (stats["sources"]["a"]["sampled"], stats["sources"]["b"]["sampled"]) == (20, 4)
    assert stats["train_examples"] == 24 and len({r["messages"][0]["content"] for r in rows(tokenizer_project)}) == 14


def test_same_recipe_same_bytes_and_the_seed_changes_the_sample(tokenizer_project):
    (tokenizer_project / "data" / "a.jsonl").write_text(alpaca(*[(f"Q{i}?", f"A{i}.") for i in range(30)]))
    (tokenizer_project / "data" / "b.jsonl").write_text(alpaca(*[(f"R{i}?", f"B{i}.") for i in range(5)]))
    recipe = """sources:
  - {name: a, path: data/a.jsonl, format: alpaca, weight: 2}
  - {name: b, path: data/b.jsonl, format: alpaca}
mixture: {size: 45, seed: %d, dedup: near, eval_fraction: 0.1}
"""
    write_recipe(tokenizer_project, recipe % 1)
    build(tokenizer_project)
    names = ["train.parquet", "eval.parquet", "rejects.jsonl", "stats.json", "mixture.png"]
    first = {n: (tokenizer_project / "build/r/dataset" / n).read_bytes() for n in names}
    shutil.rmtree(tokenizer_project / "build")
    shutil.rmtree(tokenizer_project / ".tunefile")
    stats = build(tokenizer_project)
    assert {n: (tokenizer_project / "build/r/dataset" / n).read_bytes() for n in names} == first
    assert (stats["sources"]["a"]["sampled"], stats["sources"]["b"]["sampled"]) == (30, 15)
    # Source order, rows in file order (upsampled repeats side by side): the trainer shuffles.
    written = [(r["source"], r["row"]) for r in rows(tokenizer_project)]
    assert written == sorted(written, key=lambda sr: (sr[0] != "a", sr[1]))
    write_recipe(tokenizer_project, (recipe % 1).replace("size: 45", "size: 12"))
    build(tokenizer_project)
    sample = [r["text"] for r in rows(tokenizer_project)]
    write_recipe(tokenizer_project, (recipe % 2).replace("size: 45", "size: 12"))
    build(tokenizer_project)
    assert [r["text"] for r in rows(tokenizer_project)] != sample


def test_hub_source_offline_fails_fast_with_a_clear_message(tokenizer_project, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tokenizer_project / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tokenizer_project / "hf-home" / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    write_recipe(tokenizer_project,
                 "sources: [{name: h, path: 'hf:someone/data@0123abc', format: alpaca, split: train}]\n")
    started = time.time()
    with pytest.raises(DataError, match="someone/data@0123abc is not in the local Hugging Face cache and the hub "
                                        "cannot be reached"):
        build(tokenizer_project)
    assert time.time() - started < 30


@pytest.mark.parametrize("source,message", [
    ("{name: s, path: 'hf:someone/data', format: alpaca}", "must be hf:org/name@revision"),
    ("{name: s, path: data/a.jsonl, examples: [{}], format: alpaca}", "needs exactly one of path"),
    ("{name: s, path: data/a.jsonl, format: alpaca, split: train}", "split and subset apply to hub datasets"),
    ("{name: s, path: data/a.jsonl, format: alpaca, fields: {answer: a}}", "fields ['answer'] are not read by "
                                                                           "format alpaca; allowed: instruction"),
])
def test_bad_source_keys_are_recipe_errors(tokenizer_project, source, message):
    (tokenizer_project / "data" / "a.jsonl").write_text(alpaca(("Q?", "A.")))
    write_recipe(tokenizer_project, f"sources: [{source}]\n")
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_project(tokenizer_project).load_recipe("r")


def test_recipe_level_conflicts_and_bad_patterns_are_recipe_errors(tokenizer_project):
    (tokenizer_project / "data" / "a.jsonl").write_text(alpaca(("Q?", "A.")))
    src = "sources: [{name: s, path: data/a.jsonl, format: alpaca, epochs: 2}]\n"
    write_recipe(tokenizer_project, "mixture: {size: 10}\n" + src)
    with pytest.raises(RecipeError, match="epochs sets passes over a source when mixture.size is omitted"):
        load_project(tokenizer_project).load_recipe("r")
    write_recipe(tokenizer_project,
                 "sources: [{name: s, path: data/a.jsonl, format: alpaca}]\nfilters: {deny_patterns: ['(']}\n")
    with pytest.raises(RecipeError, match="deny pattern '\\(' is not a valid regex"):
        load_project(tokenizer_project).load_recipe("r")


def test_stats_command_prints_the_mixture_table(tokenizer_project, capsys):
    (tokenizer_project / "data" / "a.jsonl").write_text(alpaca(("Q1?", "A1."), ("Q2?", "A2."), ("Q1?", "A1.")))
    write_recipe(tokenizer_project, "sources: [{name: a, path: data/a.jsonl, format: alpaca}]\n")
    assert main(["stats", "r"]) == 0
    out = capsys.readouterr().out
    # the duplicate counts under dedup only: rejected (malformed rows, template refusals) is 0
    assert out.splitlines()[2].split()[:8] == ["a", "3", "0", "-", "1", "0", "2", "0"]
    assert "rejects by reason:\n  a: duplicate 1" in out
    assert (tokenizer_project / "build/r/dataset/mixture.png").read_bytes()[:4] == b"\x89PNG"


def test_rows_that_are_not_utf8_are_rejected_one_by_one(tokenizer_project):
    lines = [json.dumps({"instruction": f"Say {w}.", "output": f"{w.title()}."}).encode() for w in
             ("one", "two", "three", "four")]
    lines[1] = lines[1].replace(b"Say", b"Dis apr\xe8s")  # a latin-1 byte: not UTF-8
    (tokenizer_project / "data" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    csv_text = "instruction,output\nSay five.,Five.\nSay caf\xe9.,Six.\nSay seven.,Seven.\n"
    (tokenizer_project / "data" / "b.csv").write_bytes(csv_text.encode("latin-1"))
    array = [{"instruction": "Say eight.", "output": "Eight."}, {"instruction": "Say nine.", "output": "Nine."}]
    (tokenizer_project / "data" / "c.json").write_bytes(json.dumps(array).encode().replace(b"nine.\"", b"n\xefne.\""))
    write_recipe(tokenizer_project, "mixture: {eval_fraction: 0.0, max_reject_rate: 0.5}\nsources:\n"
                          "  - {name: a, path: data/a.jsonl, format: alpaca}\n"
                          "  - {name: b, path: data/b.csv, format: alpaca}\n"
                          "  - {name: c, path: data/c.json, format: alpaca}\n")
    stats = build(tokenizer_project)
    assert [(r["source"], r["row"], r["reason"]) for r in rejects(tokenizer_project)] == [
        ("a", 2, "bad_encoding"), ("b", 2, "bad_encoding"), ("c", 2, "bad_encoding")]
    assert "byte 0xe8" in rejects(tokenizer_project)[0]["detail"]
    assert [stats["sources"][s]["usable"] for s in "abc"] == [3, 2, 1]


def test_a_source_outside_the_project_is_read_and_keyed_by_content(tokenizer_project, tmp_path):
    outside = tmp_path / "shared-disk" / "rows.jsonl"
    outside.parent.mkdir()
    outside.write_text(alpaca(("Name a fruit.", "An apple."), ("Name a tree.", "An oak.")))
    write_recipe(tokenizer_project, f"sources:\n  - {{name: ext, path: {outside}, format: alpaca}}\n")
    build(tokenizer_project)
    assert {r["file"] for r in rows(tokenizer_project)} == {outside.as_posix()}
    from builder.engine.plan import plan_stages

    def dataset_key() -> str:
        loaded = load_project(tokenizer_project)
        return {s.name: s.key for s in plan_stages(loaded.load_recipe("r"), loaded)}["dataset"]

    before = dataset_key()
    outside.write_text(alpaca(("Name a fruit.", "A pear."), ("Name a tree.", "An oak.")))
    assert dataset_key() != before


def test_a_null_field_is_named_as_null(tokenizer_project):
    (tokenizer_project / "data" / "a.jsonl").write_text(
        alpaca(("Say hi.", "Hi."), ("Say yo.", "Yo.")) + json.dumps({"instruction": None, "output": "x"}) + "\n")
    write_recipe(tokenizer_project, "mixture: {eval_fraction: 0.0, max_reject_rate: 0.5}\n"
                          "sources:\n  - {name: a, path: data/a.jsonl, format: alpaca}\n")
    build(tokenizer_project)
    assert [(r["reason"], r["detail"]) for r in rejects(tokenizer_project)] == [
        ("missing_field", "'instruction' is null")]


PLAIN_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '### User:\\n' + m['content'] + '\\n\\n' }}"
                  "{% elif m['role'] == 'assistant' %}{{ '### Assistant:\\n' + m['content'] + '\\n\\n' }}{% endif %}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}")


def test_a_template_without_end_of_turn_trains_an_appended_eos(tokenizer_project, tiny_tokenizer, capsys):
    (tokenizer_project / "plain.jinja").write_text(PLAIN_TEMPLATE)
    chats = [{"conversations": [{"from": "human", "value": f"Count to {i}."}, {"from": "gpt", "value": f"{i}."},
                                {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "Yes."}]}
             for i in range(1, 4)]
    (tokenizer_project / "data" / "c.json").write_text(json.dumps(chats))
    (tokenizer_project / "data" / "a.jsonl").write_text(alpaca(("Say hi.", "Hi."), ("Say yo.", "Yo.")))
    sources = ("sources:\n  - {name: a, path: data/a.jsonl, format: alpaca}\n"
               "  - {name: c, path: data/c.json, format: sharegpt}\n")
    (tokenizer_project / "recipes" / "r.yaml").write_text("name: r\nbase: {model: models/tok}\ntemplate: plain.jinja\n"
                                                "mixture: {eval_fraction: 0.0}\n" + sources)
    build(tokenizer_project)
    eos = tiny_tokenizer.eos_token_id
    examples = rows(tokenizer_project)
    assert len(examples) == 5
    for row in examples:
        trained = [t for t in row["labels"] if t != -100]
        answers = sum(m["role"] == "assistant" for m in row["messages"])
        assert trained.count(eos) == answers  # one EOS after every answer, each trained
        assert row["text"].count(tiny_tokenizer.eos_token) == answers
    multi = next(r for r in examples if len(r["messages"]) == 4)
    assert f"### Assistant:\n1.{tiny_tokenizer.eos_token}\n\n### User:\nAgain?" in multi["text"]
    # The alternative keeps the template's text: a warning says the model will not learn to stop.
    text = (tokenizer_project / "recipes" / "r.yaml").read_text()
    (tokenizer_project / "recipes" / "r.yaml").write_text(text.replace("template: plain.jinja\n",
                                                             "template: plain.jinja\nno_end_of_turn: keep\n"))
    capsys.readouterr()
    build(tokenizer_project)
    assert "will not learn to stop" in capsys.readouterr().err
    assert all(eos not in r["input_ids"] for r in rows(tokenizer_project))


def test_output_bytes_do_not_depend_on_the_number_of_workers(tokenizer_project):
    import builder.data.shards as shards

    rows_a = alpaca(*[(f"Say the number {i}.", f"It is {i}.") for i in range(120)])
    (tokenizer_project / "data" / "a.jsonl").write_text(rows_a)
    (tokenizer_project / "data" / "b.jsonl").write_text(
        alpaca(*[(f"Spell {w}.", " ".join(w)) for w in ("cat", "dog", "owl")]))
    write_recipe(tokenizer_project, "mixture: {size: 90, seed: 3, eval_fraction: 0.1}\nsources:\n"
                          "  - {name: a, path: data/a.jsonl, format: alpaca, weight: 2}\n"
                          "  - {name: b, path: data/b.jsonl, format: alpaca}\n")
    names = ["train.parquet", "eval.parquet", "rejects.jsonl", "stats.json", "mixture.png"]
    outputs = {}
    for workers in (1, 2):
        (tokenizer_project / "params.yaml").write_text(
            f"recipes: [r]\ndevice: cpu\ncache_dir: .tunefile\nworkers: {workers}\n")
        shutil.rmtree(tokenizer_project / ".tunefile", ignore_errors=True)
        shutil.rmtree(tokenizer_project / "build", ignore_errors=True)
        original = shards.CHUNK_ROWS
        shards.CHUNK_ROWS = 16  # several chunks per source, so the pool really splits the work
        try:
            stats = build(tokenizer_project)
        finally:
            shards.CHUNK_ROWS = original
        manifest = json.loads((tokenizer_project / "build/r/dataset/manifest.json").read_text())
        assert manifest["summary"]["chunks"]["a"] == {"built": 8}
        outputs[workers] = {n: (tokenizer_project / "build/r/dataset" / n).read_bytes() for n in names}
    assert outputs[1] == outputs[2]
    assert stats["train_examples"] == 90


def test_appending_rows_tokenizes_only_the_new_chunks_and_an_edit_only_its_chunk(tokenizer_project, monkeypatch):
    import builder.data.shards as shards

    monkeypatch.setattr(shards, "CHUNK_ROWS", 10)
    path = tokenizer_project / "data" / "a.jsonl"
    path.write_text(alpaca(*[(f"Say the number {i}.", f"It is {i}.") for i in range(40)]))
    write_recipe(tokenizer_project, "sources:\n  - {name: a, path: data/a.jsonl, format: alpaca}\n")

    def chunks() -> dict:
        return json.loads((tokenizer_project / "build/r/dataset/manifest.json").read_text())["summary"]["chunks"]["a"]

    build(tokenizer_project)
    assert chunks() == {"built": 4}
    with open(path, "a") as f:
        f.write(alpaca(*[(f"Say the number {i}.", f"It is {i}.") for i in range(40, 45)]))
    build(tokenizer_project)
    assert chunks() == {"built": 1, "cached": 4}
    lines = path.read_text().splitlines()
    lines[12] = json.dumps({"instruction": "Say twelve.", "output": "Twelve."})
    path.write_text("\n".join(lines) + "\n")
    assert build(tokenizer_project)["train_examples"] == 45
    assert chunks() == {"built": 1, "cached": 4}
    assert "Twelve." in {r["messages"][-1]["content"] for r in rows(tokenizer_project)}
    # A cold build of the same file gives the same bytes as the incremental one.
    incremental = (tokenizer_project / "build/r/dataset/train.parquet").read_bytes()
    shutil.rmtree(tokenizer_project / ".tunefile")
    shutil.rmtree(tokenizer_project / "build")
    build(tokenizer_project)
    assert chunks() == {"built": 5}
    assert (tokenizer_project / "build/r/dataset/train.parquet").read_bytes() == incremental


def test_curriculum_orders_simple_to_complex_and_shows_it(tokenizer_project):
    singles = [json.dumps({"instruction": f"Q{i} " + "word " * (i % 7), "output": "A " * (1 + i % 5)})
               for i in range(20)]
    (tokenizer_project / "data" / "a.jsonl").write_text("\n".join(singles) + "\n")
    multi = [{"conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": "Hello."},
                                {"from": "human", "value": "More?"}, {"from": "gpt", "value": "Yes " * (1 + i)}]}
             for i in range(6)]
    (tokenizer_project / "data" / "c.json").write_text(json.dumps(multi))
    body = ("sources:\n  - {name: a, path: data/a.jsonl, format: alpaca}\n"
            "  - {name: c, path: data/c.json, format: sharegpt}\n")
    write_recipe(tokenizer_project, "mixture: {eval_fraction: 0.0, order: curriculum, seed: 4}\n" + body)
    stats = build(tokenizer_project)
    order = [(sum(m["role"] == "assistant" for m in r["messages"]),
              sum(label != -100 for label in r["labels"])) for r in rows(tokenizer_project)]
    assert order == sorted(order)  # turns first, then trained tokens
    assert order[0][0] == 1 and order[-1][0] == 2
    assert stats["mixture_order"] == "curriculum"
    means = stats["length_by_position"]
    assert means[-1] > means[0]
    first = (tokenizer_project / "build/r/dataset/train.parquet").read_bytes()
    shutil.rmtree(tokenizer_project / "build")
    build(tokenizer_project)  # seeded: the same order again (ties included)
    assert (tokenizer_project / "build/r/dataset/train.parquet").read_bytes() == first
    write_recipe(tokenizer_project, "mixture: {eval_fraction: 0.0, seed: 4}\n" + body)
    assert build(tokenizer_project)["mixture_order"] == "shuffle"
    assert [(r["source"], r["row"]) for r in rows(tokenizer_project)] == [("a", i) for i in range(1, 21)] + [
        ("c", i) for i in range(1, 7)]
