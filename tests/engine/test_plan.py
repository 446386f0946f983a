"""Stage keys: an edit changes exactly the keys of the stages that read what was edited."""
from __future__ import annotations

import re

from helpers import REPO, make_project

from builder.engine.plan import explain_changes, plan_stages
from builder.recipe.project import load_project

STAGES = ["base", "dataset", "train", "merge", "gguf", "eval@base", "eval@f16", "quantize@q8_0", "eval@q8_0",
          "quantize@q4_k_m", "eval@q4_k_m"]
AFTER_TRAIN = [s for s in STAGES[2:] if s != "eval@base"]  # the base model's eval reads base and dataset only


def keys(root) -> dict[str, str]:
    project = load_project(root)
    return {s.name: s.key for s in plan_stages(project.load_recipe("default"), project)}


def changed(before: dict, after: dict) -> list[str]:
    return [name for name in STAGES if before.get(name) != after.get(name)]


def edit(root, old: str, new: str) -> None:
    path = root / "recipes" / "default.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_stage_order_and_key_shape(tmp_path):
    root = make_project(tmp_path / "p")
    k = keys(root)
    assert list(k) == STAGES
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for v in k.values())
    assert keys(root) == k  # same inputs, same keys


def test_each_edit_changes_exactly_the_stages_downstream(tmp_path):
    root = make_project(tmp_path / "p")
    before = keys(root)
    edit(root, "lr: 2.0e-4", "lr: 1.0e-4")
    assert changed(before, keys(root)) == AFTER_TRAIN
    edit(root, "lr: 1.0e-4", "lr: 2.0e-4")
    assert keys(root) == before  # reverting restores every key
    edit(root, "quantize: [q8_0, q4_k_m]", "quantize: [q8_0, q4_k_m, q5_k_m]")
    after = keys(root)
    assert changed(before, after) == [] and set(after) - set(before) == {"quantize@q5_k_m", "eval@q5_k_m"}
    edit(root, "weight: 3 ", "weight: 2 ")
    assert changed(before, keys(root)) == STAGES[1:]


def test_annotations_and_comments_change_nothing(tmp_path):
    root = make_project(tmp_path / "p")
    before = keys(root)
    edit(root, "name: default ", "description: tried a thing\nname: default # renamed comment\n# ")
    assert keys(root) == before


def test_data_file_edit_changes_dataset_onward(tmp_path):
    root = make_project(tmp_path / "p")
    before = keys(root)
    with open(root / "data" / "demo_chats.json", "a") as f:
        f.write(" ")
    assert changed(before, keys(root)) == STAGES[1:]


def test_explain_changes_names_the_edited_input():
    old = {"recipe": {"train": {"lr": 0.0002, "seed": 1}}, "upstream": {"dataset": "aa"}}
    new = {"recipe": {"train": {"lr": 0.0001, "seed": 1}}, "upstream": {"dataset": "aa"}}
    assert explain_changes(old, new) == ["train.lr 0.0002 -> 0.0001"]
    assert explain_changes({"upstream": {"dataset": "aa"}}, {"upstream": {"dataset": "bb"}}) == [
        "upstream dataset changed"]
    files = {"files": {"chats": {"data/c.json": "1"}}, "recipe": {"sources": [{"name": "chats", "weight": 1}]}}
    edited = {"files": {"chats": {"data/c.json": "2", "data/d.json": "3"}},
              "recipe": {"sources": [{"name": "chats", "weight": 2}]}}
    assert explain_changes(files, edited) == ["source chats changed (data/c.json)", "source chats: data/d.json added",
                                              "sources.chats.weight 1 -> 2"]


def test_repo_dvc_yaml_is_current(monkeypatch, capsys):
    from builder.cli import main

    monkeypatch.chdir(REPO)
    assert main(["dvc", "--check"]) == 0, capsys.readouterr().err


def test_quant_table_matches_installed_llama_cpp():
    import llama_cpp

    from builder.recipe.quant import QUANT_TYPES, quant_ftype_name

    for quant, ftype in QUANT_TYPES.items():
        assert getattr(llama_cpp, quant_ftype_name(quant)) == ftype, quant


KINDS = ["generate", "base", "dataset", "pairs", "train", "preference", "merge", "gguf", "quantize", "eval"]


def test_resolve_writes_specs_only_when_keys_change(tmp_path, monkeypatch, capsys):
    from builder.cli import main

    root = make_project(tmp_path / "p")
    monkeypatch.chdir(root)
    assert main(["resolve"]) == 1
    assert "run `tunefile dvc`" in capsys.readouterr().err
    assert main(["dvc"]) == 0 and main(["resolve"]) == 0
    specs = root / "build" / "default" / "specs"
    assert sorted(p.stem for p in specs.iterdir()) == sorted(KINDS)  # one per DVC stage
    stamps = {p: p.stat().st_mtime_ns for p in specs.iterdir()}
    capsys.readouterr()
    assert main(["resolve"]) == 0 and capsys.readouterr().out == ""
    assert {p: p.stat().st_mtime_ns for p in specs.iterdir()} == stamps
    edit(root, "lr: 2.0e-4", "lr: 1.0e-4")
    assert main(["resolve"]) == 0
    after_train = [k for k in KINDS[4:] if k != "preference"]  # a recipe without preference tuning has none
    assert capsys.readouterr().out.split() == [w for k in after_train for w in (f"default/{k}:", "key", "changed")]
    edit(root, "quantize: [q8_0, q4_k_m]", "quantize: [q8_0, q4_k_m, q5_k_m]")  # one more type: two specs
    assert main(["resolve"]) == 0
    assert capsys.readouterr().out.split() == ["default/quantize:", "key", "changed", "default/eval:", "key", "changed"]


def test_dvc_yaml_does_not_depend_on_what_a_recipe_builds(tmp_path, monkeypatch):
    """Quant types, merge on or off, more sources: the same DVC stages. Only the resolve step's
    deps follow the files a recipe reads, and resolve keeps them current itself."""
    import yaml

    from builder.cli import main

    root = make_project(tmp_path / "p")
    monkeypatch.chdir(root)
    assert main(["dvc"]) == 0
    first = yaml.safe_load((root / "dvc.yaml").read_text())
    assert list(first["stages"]) == ["resolve"] + [f"default-{k}" for k in KINDS]
    assert first["stages"]["resolve"]["deps"] == [
        "data/demo_alpaca.jsonl", "data/demo_chats.json", "data/demo_prompts.jsonl", "data/tasks/demo_mc.jsonl",
        "data/tasks/demo_mc.yaml", "params.yaml"]
    assert "always_changed" not in first["stages"]["resolve"]
    assert first["stages"]["default-quantize"]["outs"] == [{"build/default/quantize": {"persist": True}}]
    edit(root, "quantize: [q8_0, q4_k_m]", "quantize: [q2_k]")
    assert main(["dvc", "--check"]) == 0
    edit(root, "  merge: true\n  gguf: {dtype: f16, quantize: [q2_k]}", "  merge: false\n  gguf: null")
    assert main(["dvc", "--check"]) == 0
    (root / "more").mkdir()
    (root / "more" / "x.jsonl").write_text('{"instruction": "i", "output": "o"}\n')
    edit(root, "sources:\n", "sources:\n  - {name: more, path: more/*.jsonl, format: alpaca}\n")
    assert main(["resolve"]) == 0  # a recipe reads a new folder: resolve watches it from now on
    deps = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["resolve"]["deps"]
    assert deps == ["data/demo_alpaca.jsonl", "data/demo_chats.json", "data/demo_prompts.jsonl",
                    "data/tasks/demo_mc.jsonl", "data/tasks/demo_mc.yaml", "more", "params.yaml"]
    assert main(["dvc", "--check"]) == 0


def test_a_new_recipe_in_params_needs_tunefile_dvc_and_resolve_says_so(tmp_path, monkeypatch, capsys):
    from builder.cli import main

    root = make_project(tmp_path / "p")
    monkeypatch.chdir(root)
    assert main(["dvc"]) == 0
    text = (root / "recipes" / "default.yaml").read_text()
    (root / "recipes" / "other.yaml").write_text(text.replace("name: default ", "name: other "))
    (root / "params.yaml").write_text("recipes: [default, other]\ndevice: cpu\n")
    capsys.readouterr()
    assert main(["resolve"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run `tunefile dvc`" in err and "other" in err
    assert main(["dvc"]) == 0 and main(["resolve"]) == 0


def test_resolve_fails_fast_on_a_bad_recipe(tmp_path, monkeypatch, capsys):
    from builder.cli import main

    root = make_project(tmp_path / "p")
    monkeypatch.chdir(root)
    assert main(["dvc"]) == 0
    edit(root, "quantize: [q8_0, q4_k_m]", "quantize: [q8_0, q4_k_z]")
    assert main(["resolve"]) == 1
    assert "default.yaml:" in capsys.readouterr().err


GOLDEN_RECIPE = """\
name: golden
base: {model: models/base}
template: chatml
sources:
  - {name: a, path: data/a.jsonl, format: alpaca, weight: 2}
  - {name: b, path: data/b.json, format: sharegpt}
mixture: {size: 10, seed: 1}
train: {lr: 1.0e-4}
export: {gguf: {dtype: f16, quantize: [q8_0]}}
"""


def test_golden_keys(tmp_path, monkeypatch):
    """Pinned keys: if one moves, a key input changed. Bump a KINDS code_version on purpose and
    update these, never the other way round. Library versions are pinned out of the picture."""
    monkeypatch.setattr("builder.engine.plan.library_version", lambda dist: "pinned")
    root = tmp_path / "g"
    (root / "models" / "base").mkdir(parents=True)
    (root / "models" / "base" / "config.json").write_text('{"model_type": "llama"}\n')
    (root / "models" / "base" / "README.md").write_text("not part of the model\n")
    (root / "data").mkdir()
    (root / "data" / "a.jsonl").write_text('{"instruction": "i", "output": "o"}\n')
    (root / "data" / "b.json").write_text('[{"conversations": [{"from": "human", "value": "q"}, '
                                          '{"from": "gpt", "value": "a"}]}]\n')
    (root / "recipes").mkdir()
    (root / "recipes" / "golden.yaml").write_text(GOLDEN_RECIPE)
    (root / "params.yaml").write_text("recipes: [golden]\n")
    project = load_project(root)
    keys = {s.name: s.key for s in plan_stages(project.load_recipe("golden"), project)}
    # dataset 6 (issue 24: a bad_json reject's detail is "not JSON: ... at column N", so a stored dataset's
    # rejects.jsonl and a rebuilt one never differ under one key); merge 3, gguf 2, eval 3 (generation_config
    # and the GGUF name the end-of-turn token, the stop rate counts only stops there); the rest follow.
    assert keys == {
        "base": "94fc260c1bfdf3bda9ff6fab109cd9f6",
        "dataset": "9e855adc1a72ddaf299f8254df0e0c9b",
        "train": "c422b57da88ce7d21829705d35825fcb",
        "merge": "fe91a026682c619db388c9cad52ee7df",
        "gguf": "8c078f11275aa2e86cd1340b0e86dadd",
        "eval@base": "c8b09ea796b7ab81a174997bf930f7a3",
        "eval@f16": "a9c88966420ff421f8a76cb749b0c28e",
        "quantize@q8_0": "f252c92ec93599e8bf8e381d68629f27",
        "eval@q8_0": "36b6a3588f32a21f023c5215fef0d3a0",
    }


def test_golden_shard_and_builtin_base_keys(tmp_path):
    """Pinned like the stage keys: the per-chunk shard key (what the chunk store reuses) and the
    builtin base's identity (what every recipe on builtin:tiny-llama shares). If one moves, a key
    input changed: bump SHARD_VERSION or the builtin's version on purpose, then update these."""
    from builder.data.shards import chunk_key, shard_settings
    from builder.data.sources import RawChunk
    from builder.engine.plan import _base_identity
    from builder.hashing import StatCache, hash_value
    from builder.recipe.schema import Recipe

    recipe = Recipe.model_validate({"name": "g", "base": {"model": "builtin:tiny-llama"},
                                    "sources": [{"name": "a", "path": "data/a.jsonl", "format": "alpaca"}]})
    settings = shard_settings(recipe, recipe.sources[0], "{{ messages }}", tmp_path, tmp_path, "base-key",
                              {"tokenizers": "pinned"})
    chunk = RawChunk(file="data/a.jsonl", first=1, lines=b"{}\n", rows=None, digest="d" * 32)
    # SHARD_VERSION 5 moved these two: a bad_json reject's stored detail is now "not JSON: ... at column N"
    assert settings.key == "57822bca21189d10c4cd9dccb718c369"  # paths (base_dir, cache_dir) are not in it
    assert chunk_key(settings, chunk) == "dcdb3f2e441ae9a57550afabce6b3565"
    assert hash_value(_base_identity(recipe, tmp_path, StatCache(None))) == "cd26a774825edce65576b40392eb6eb6"
