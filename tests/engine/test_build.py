"""Building recipes: a stage restored from the stage store is the built folder byte for byte (its
manifest included), how each run went is in the run log, and kinds a recipe does not build get
placeholders that DVC's metrics and plots load."""
from __future__ import annotations

import json
from pathlib import Path

from builder.engine.build import build_recipe, run_dvc_stage, stage_map, stage_status
from builder.engine.runner import read_run, run_log_path
from builder.recipe.project import load_project

RECIPE = ("name: r\nbase: {model: models/tok}\ntemplate: chatml\nmixture: {eval_fraction: 0.0, seed: 1}\n"
          "sources:\n  - {name: a, path: data/a.jsonl, format: alpaca}\n")
ROWS = "".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}."}) + "\n" for i in range(12))
MANIFEST_FIELDS = ["inputs", "key", "python", "recipe", "stage", "summary", "tunefile"]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def build(root: Path, recipe: str = "r") -> list[str]:
    lines: list[str] = []
    build_recipe(load_project(root), recipe, "dataset", say=lines.append)
    return lines


def test_a_reverted_edit_restores_the_built_bytes_and_the_run_log_says_so(tokenizer_project):
    root = tokenizer_project
    (root / "recipes" / "r.yaml").write_text(RECIPE)
    (root / "data" / "a.jsonl").write_text(ROWS)
    lines = build(root)
    dataset = root / "build" / "r" / "dataset"
    built = folder_bytes(dataset)
    manifest = json.loads(built["manifest.json"])
    assert sorted(manifest) == MANIFEST_FIELDS  # no clock, no word on where it came from
    run = read_run(load_project(root), "r", "dataset")
    assert run_log_path(load_project(root), "r", "dataset") == root / ".tunefile" / "runs" / "r" / "dataset.json"
    assert (run["result"], run["key"]) == ("built", manifest["key"])
    assert lines[-1] == f"r/dataset: built in {run['seconds']:.1f}s"

    (root / "recipes" / "r.yaml").write_text(RECIPE.replace("seed: 1", "seed: 2"))
    assert build(root)[-1].startswith("r/dataset: built in ")
    assert folder_bytes(dataset) != built
    (root / "recipes" / "r.yaml").write_text(RECIPE)
    lines = build(root)
    assert lines[-1].startswith("r/dataset: restored from the stage store in ")
    assert folder_bytes(dataset) == built  # the manifest too: DVC's hash of the folder is the built one's
    assert read_run(load_project(root), "r", "dataset")["result"] == "restored"
    project = load_project(root)
    _, plan = stage_map(project, "r")
    assert stage_status(project, plan["dataset"]) == "up to date"


def test_another_recipes_build_of_the_same_key_is_restored_under_this_recipes_name(tokenizer_project):
    root = tokenizer_project
    (root / "recipes" / "r.yaml").write_text(RECIPE)
    (root / "recipes" / "twin.yaml").write_text(RECIPE.replace("name: r", "name: twin"))
    (root / "data" / "a.jsonl").write_text(ROWS)
    build(root)
    assert build(root, "twin")[-1].startswith("twin/dataset: restored from the stage store in ")
    ours, twin = (folder_bytes(root / "build" / name / "dataset") for name in ("r", "twin"))
    assert json.loads(twin.pop("manifest.json")) == {**json.loads(ours.pop("manifest.json")), "recipe": "twin"}
    assert twin == ours and "train.parquet" in twin


def test_a_recipe_without_preference_gets_files_dvc_metrics_and_plots_can_load(tokenizer_project):
    root = tokenizer_project
    (root / "recipes" / "r.yaml").write_text(RECIPE)
    (root / "data" / "a.jsonl").write_text(ROWS)
    project = load_project(root)
    run_dvc_stage(project, "r", "preference", say=lambda line: None)
    folder = root / "build" / "r" / "preference"
    assert sorted(p.name for p in folder.iterdir()) == ["eval.csv", "manifest.json", "metrics.json", "steps.csv"]
    # The columns dvc.yaml's preference plots read, as the preference stage writes them; no rows.
    assert (folder / "steps.csv").read_text() == "step,epoch,loss,reward_chosen,reward_rejected,margin,accuracy,lr\n"
    assert (folder / "eval.csv").read_text() == \
        "step,loss,reward_chosen,reward_rejected,margin,accuracy,logp_accuracy\n"
    assert json.loads((folder / "metrics.json").read_text()) == {}
    assert json.loads((folder / "manifest.json").read_text())["key"] is None
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    run_dvc_stage(project, "r", "preference", say=lambda line: None)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == stamps  # untouched
    for name in ("eval.csv", "steps.csv"):  # a placeholder written before the CSVs were: completed
        (folder / name).unlink()
    run_dvc_stage(project, "r", "preference", say=lambda line: None)
    assert sorted(p.name for p in folder.iterdir()) == ["eval.csv", "manifest.json", "metrics.json", "steps.csv"]
    assert not list(folder.parent.glob(".preference.*"))  # no temp folder left
