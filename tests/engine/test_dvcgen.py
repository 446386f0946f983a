"""builder/engine/dvcgen.py: dvc.yaml is one DVC stage per stage kind with the table's reads as its
deps; the resolve step watches exactly the inputs of keys inside the project; spec files are
rewritten only when their bytes change."""
from __future__ import annotations

from types import SimpleNamespace

import yaml
from helpers import make_project

from builder.engine.dvcgen import HEADER, recipes_in, render_dvc_yaml, watched_paths, write_specs
from builder.engine.plan import plan_stages
from builder.recipe.project import load_project
from builder.stages import KINDS, Stage


def test_dvc_yaml_has_one_stage_per_kind_reading_what_the_table_says(tmp_path):
    project = load_project(make_project(tmp_path / "p"))
    text = render_dvc_yaml(project, ["default"], ["data", "params.yaml"])
    assert text.startswith(HEADER) and text == render_dvc_yaml(project, ["default"], ["data", "params.yaml"])
    stages = yaml.safe_load(text)["stages"]
    assert list(stages) == ["resolve", *(f"default-{kind}" for kind in KINDS)]
    assert stages["resolve"] == {"cmd": "tunefile resolve", "deps": ["data", "params.yaml"],
                                 "params": [{"recipes/default.yaml": None}],
                                 "outs": [{"build/default/specs": {"persist": True}}]}
    assert stages["default-dataset"] == {
        "cmd": "tunefile stage dataset default",
        "deps": ["build/default/specs/dataset.json", "build/default/base", "build/default/generate"],
        "outs": ["build/default/dataset"]}
    for kind in KINDS.values():
        stage = stages[f"default-{kind.name}"]
        assert stage["deps"] == [f"build/default/specs/{kind.name}.json", *(f"build/default/{up}" for up in kind.reads)]
        out = f"build/default/{kind.name}"
        assert stage["outs"] == [{out: {"persist": True}} if kind.grouped else out]
    assert recipes_in(text) == ["default"]


def test_recipes_in_reads_the_base_stages_of_a_dvc_yaml():
    assert recipes_in("stages:\n  resolve: {}\n  b-base: {}\n  a-base: {}\n  a-train: {}\n") == ["a", "b"]
    assert recipes_in("") == [] and recipes_in("stages:\n") == []
    assert recipes_in("stages: [unclosed\n") is None


def stage(sources: list[dict]) -> Stage:
    return Stage("r", "dataset", (), {"recipe": {"sources": sources}}, "k")


def test_watched_paths_cover_glob_folders_and_leave_outside_files_out(tmp_path):
    root = tmp_path / "p"
    for name in ("data/chats/a.jsonl", "data/chats/b.jsonl", "data/one.json", "params.yaml", "templates/t.jinja"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    (tmp_path / "outside.jsonl").write_text("x")
    project = SimpleNamespace(root=root)  # watched_paths reads the project's root only
    plans = {"r": [stage([{"path": "data/chats/*.jsonl"}, {"path": "data/one.json"}, {"path": "hf:o/n@r"},
                          {"examples": [{}]}])]}
    digested = {str(root / "data/chats/a.jsonl"), str(root / "data/one.json"), str(root / "templates/t.jinja"),
                str(tmp_path / "outside.jsonl")}
    # a.jsonl is inside the glob's folder (watched as the folder, so a new match counts); no constraints.txt here
    assert watched_paths(project, plans, digested) == ["data/chats", "data/one.json", "params.yaml",
                                                       "templates/t.jinja"]


def test_spec_files_are_written_only_when_their_bytes_change(tmp_path):
    project = load_project(make_project(tmp_path / "p"))
    plans = {"default": plan_stages(project.load_recipe("default"), project)}
    assert write_specs(project, plans) == [f"default/{kind}" for kind in KINDS]
    assert write_specs(project, plans) == []
    spec = project.spec_path("default", "train")
    spec.write_text(spec.read_text() + " ")
    assert write_specs(project, plans) == ["default/train"]
    assert sorted(p.name for p in project.specs_dir("default").iterdir()) == sorted(f"{k}.json" for k in KINDS)
