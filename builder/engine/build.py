"""Building recipes: which stages a target needs, what is stale and why, and running the stages
one DVC stage stands for. The command line (cli.py) only parses arguments and prints.

A DVC stage is a stage kind (builder.stages.KINDS). For `train` it is the train stage; for `quantize` and
`eval` it is every type the recipe lists, each in its own folder under build/<recipe>/<kind>/: a
type whose folder holds its current key is left untouched, the others are built (or restored
from the stage store), and folders of types the recipe no longer lists are removed. A kind the
recipe turns off (export.merge: false) publishes a placeholder, so DVC finds the out it expects.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from builder.engine.plan import explain_changes, members, plan_stages
from builder.engine.runner import MANIFEST, is_built, publish, read_manifest, recipe_lock, run_stage
from builder.errors import TunefileError
from builder.evaluate.summary import eval_metrics, read_metrics, write_eval_summary
from builder.files import write_json
from builder.recipe.project import Project
from builder.recipe.schema import Recipe
from builder.stages import KINDS, Stage
from builder.train.dpo import EVAL_TERMS, TERMS
from builder.train.loop import write_curve, write_evals

Say = Callable[[str], None]


def stage_map(project: Project, recipe_name: str) -> tuple[Recipe, dict[str, Stage]]:
    recipe = project.load_recipe(recipe_name)
    return recipe, {s.name: s for s in plan_stages(recipe, project)}


def needed(plan: dict[str, Stage], targets: list[str]) -> list[str]:
    """The targets and everything upstream of them, in build order."""
    wanted, todo = set(), list(targets)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += plan[name].upstream
    return [name for name in plan if name in wanted]


def stage_status(project: Project, stage: Stage) -> str:
    """`up to date`, `not built`, or `stale: <what changed, in words>`."""
    manifest = read_manifest(project.stage_dir(stage.recipe, stage.name))
    if manifest is None:
        return "not built"
    if manifest.get("key") == stage.key:
        return "up to date"
    changes = explain_changes(manifest.get("inputs", {}), stage.inputs)
    return "stale: " + ("; ".join(changes) if changes else "key changed")


def done_line(recipe: str, stage: str, run: dict) -> str | None:
    """What `tunefile build` and `tunefile stage` print for a stage that ran (run_stage's record, as
    the run log has it)."""
    if run.get("worker") or run.get("launched"):  # rank 0 of a multi-process train reports
        return None
    how = "restored from the stage store" if run["result"] == "restored" else "built"
    return f"{recipe}/{stage}: {how} in {run['seconds']:.1f}s"


def _targets(plan: dict[str, Stage], recipe: Recipe, until: str | None) -> list[str]:
    if until is None:
        return list(plan)
    if until in plan:
        return [until]
    if until in KINDS:  # a kind: every stage of it (`--until quantize` builds every type)
        group = [s.name for s in members(list(plan.values()), until)]
        if group:
            return group
        raise TunefileError(f"--until {until}: {recipe.name} builds no {until} stage")
    raise TunefileError(f"--until {until}: no such stage in {recipe.name}; stages: {', '.join(plan)}")


def build_recipe(project: Project, recipe_name: str, until: str | None, say: Say = print) -> Recipe:
    """Build the recipe's stale stages (up to `until`: a stage or a kind) in order."""
    recipe, plan = stage_map(project, recipe_name)
    names = needed(plan, _targets(plan, recipe, until))
    with recipe_lock(project, recipe.name):
        for name in names:
            if is_built(project, plan[name]):
                say(f"{recipe.name}/{name}: up to date")
                continue
            if line := done_line(recipe.name, name, run_stage(project, recipe, plan[name], plan)):
                say(line)
        if until is None:
            for kind in KINDS:
                _tidy(project, recipe, kind, plan, say)
        elif any(plan[name].kind == "generate" for name in names):
            _link_generated(project, recipe, members(list(plan.values()), "generate"))
    return recipe


def run_dvc_stage(project: Project, recipe_name: str, name: str, say: Say = print) -> None:
    """`tunefile stage NAME RECIPE`: one stage (`train`, `quantize@q8_0`) or a whole kind
    (`quantize`: every type), as dvc.yaml calls it."""
    recipe, plan = stage_map(project, recipe_name)
    if name in plan:  # one stage (a grouped kind's name is never a stage's name)
        if line := done_line(recipe.name, name, run_stage(project, recipe, plan[name], plan)):
            say(line)
        return
    if name not in KINDS:
        raise TunefileError(f"no stage '{name}' in {recipe.name}; stages: {', '.join(dict.fromkeys([*KINDS, *plan]))}")
    with recipe_lock(project, recipe.name):
        for stage in members(list(plan.values()), name):
            if is_built(project, stage):
                say(f"{recipe.name}/{stage.name}: up to date")
            elif line := done_line(recipe.name, stage.name, run_stage(project, recipe, stage, plan)):
                say(line)
        _tidy(project, recipe, name, plan, say)


def _tidy(project: Project, recipe: Recipe, kind: str, plan: dict[str, Stage], say: Say) -> None:
    """After a kind's stages ran: drop folders of types no longer in the recipe, write the kind's
    summary (eval/metrics.json: every type's metrics, for `dvc metrics`, and metrics.png, a bar per
    type for each metric, for `dvc plots`), or a placeholder for a
    kind the recipe does not build."""
    group = members(list(plan.values()), kind)
    folder = project.stage_dir(recipe.name, kind)
    if KINDS[kind].grouped:
        folder.mkdir(parents=True, exist_ok=True)
        keep = {project.stage_dir(recipe.name, s.name).name for s in group}
        for child in sorted(folder.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and child.name not in keep:
                shutil.rmtree(child)
                say(f"{recipe.name}/{kind}@{child.name}: removed (no longer in the recipe)")
        if kind == "generate":
            _link_generated(project, recipe, group)
        # An empty folder is no DVC out: a recipe without stages of this kind gets a placeholder.
        if not group and read_manifest(folder) != _placeholder(recipe, kind):
            write_json(folder / MANIFEST, _placeholder(recipe, kind))
        elif group and (folder / MANIFEST).is_file():
            (folder / MANIFEST).unlink()
        if kind == "eval":
            write_eval_summary(folder, *_eval_folders(project, plan))
    elif not group:
        _write_placeholder(folder, recipe, kind)


def _placeholder(recipe: Recipe, kind: str) -> dict:
    """The manifest of a kind's folder when the recipe builds no stage of that kind."""
    section = "preference" if kind in ("pairs", "preference") else "export"
    where = "" if KINDS[kind].grouped else f" (see its {section} section)"
    return {"recipe": recipe.name, "stage": kind, "key": None,
            "not_built": f"{recipe.name} builds no {kind} stage{where}"}


def _write_placeholder(folder: Path, recipe: Recipe, kind: str) -> None:
    """A kind the recipe does not build: its folder holds the placeholder manifest and, for preference,
    the files dvc.yaml declares for every recipe, empty but valid (metrics.json `{}`, steps.csv and
    eval.csv with their header alone), so `dvc metrics show` and `dvc plots show` load them without a
    warning. Left untouched when it already holds exactly these files (no new bytes for DVC)."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if kind == "preference":  # the columns the preference stage writes (builder.train.loop)
        write_json(tmp / "metrics.json", {})
        write_curve(tmp / "steps.csv", TERMS, [])
        write_evals(tmp / "eval.csv", EVAL_TERMS, [])
    write_json(tmp / MANIFEST, _placeholder(recipe, kind))
    if _same_files(tmp, folder):
        shutil.rmtree(tmp)
    else:
        publish(tmp, folder)


def _files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir() or folder.is_symlink():
        return {}
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


def _same_files(a: Path, b: Path) -> bool:
    """Whether folders a and b hold the same files with the same bytes."""
    mine, theirs = _files(a), _files(b)
    return mine.keys() == theirs.keys() and all(mine[n].read_bytes() == theirs[n].read_bytes() for n in mine)


def _link_generated(project: Project, recipe: Recipe, group: list[Stage]) -> None:
    """build/<recipe>/generate@<source> links to generate/<source>/ (the folder DVC tracks holds every
    source's), so the stage's name also finds its files; links of sources no longer generated go."""
    build = project.build_dir(recipe.name)
    wanted = {s.name for s in group}
    for link in build.glob("generate@*"):
        if link.is_symlink() and link.name not in wanted:
            link.unlink()
    for stage in group:
        link = build / stage.name
        target = Path("generate") / stage.param
        if not (link.is_symlink() and Path(os.readlink(link)) == target):
            if link.is_symlink():
                link.unlink()
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)


def _eval_folders(project: Project, plan: dict[str, Stage]) -> tuple[dict[str, Path], Path | None]:
    """(each eval stage's folder by type, the preference stage's folder or None): what the eval summary reads."""
    evals = {s.param: project.stage_dir(s.recipe, s.name) for s in members(list(plan.values()), "eval")}
    preference = plan.get("preference")
    return evals, project.stage_dir(preference.recipe, preference.name) if preference is not None else None


def quant_report(project: Project, recipe_name: str) -> tuple[dict, dict[str, dict]]:
    """The train metrics and each eval's metrics by GGUF file name, for `tunefile report`."""
    recipe, plan = stage_map(project, recipe_name)
    evals = members(list(plan.values()), "eval")
    stale = [s.name for s in [plan["train"], *evals] if not is_built(project, s)]
    if stale:
        raise TunefileError(f"{', '.join(stale)} not built or stale; run `dvc repro` or `tunefile build {recipe_name}`")
    metrics = eval_metrics(*_eval_folders(project, plan))
    train = read_metrics(project.stage_dir(recipe.name, "train"))
    return train, {"base" if t == "base" else f"model-{t}.gguf": m for t, m in metrics.items()}
