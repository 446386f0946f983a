"""Run one stage: check its inputs are built, write into a temp folder, manifest last, rename.

Each stage module has `run(ctx) -> dict`; heavy libraries are imported inside it. A folder
without manifest.json is not a result; a folder whose manifest key differs from the plan is stale.
"""
from __future__ import annotations

import glob
import importlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from builder import __version__
from builder.errors import StageError
from builder.plan import Stage
from builder.project import Project
from builder.recipe import Recipe

MANIFEST = "manifest.json"
MODULES = {"base": "base", "dataset": "dataset", "train": "train", "merge": "merge", "gguf": "gguf",
           "quantize": "quantize", "eval": "evaluate"}


@dataclass(frozen=True)
class StageContext:
    project: Project
    recipe: Recipe
    stage: Stage
    plan: dict[str, Stage]  # every stage of the recipe, by name (for lineage)
    out_dir: Path  # the temp folder the stage writes into

    def input_dir(self, stage_name: str) -> Path:
        return self.project.stage_dir(self.recipe.name, stage_name)


def read_manifest(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_built(project: Project, stage: Stage) -> bool:
    manifest = read_manifest(project.stage_dir(stage.recipe, stage.name))
    return manifest is not None and manifest.get("key") == stage.key


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_abandoned(out: Path) -> list[Path]:
    """Delete temp folders of `out` left by builds that were killed (their process is gone)."""
    removed = []
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, pid = leftover.name.rpartition("-")
        if kind.endswith((".tmp", ".old")) and pid.isdigit() and not _is_running(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


def _publish(tmp: Path, out: Path) -> None:
    """Swap tmp into out's place; at no point does an incomplete folder sit at `out`."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists() or out.is_symlink():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists() or old.is_symlink():
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def run_stage(project: Project, recipe: Recipe, stage: Stage, plan: dict[str, Stage]) -> dict:
    """Build `stage` from its (already built) upstream stages; return its manifest."""
    for name in stage.upstream:
        if not is_built(project, plan[name]):
            raise StageError(f"{recipe.name}/{stage.name} needs {name}, which is not built or is stale; "
                             f"run `tunefile build {recipe.name} --until {stage.name}`")
    out = project.stage_dir(recipe.name, stage.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    module = importlib.import_module(f"builder.stages.{MODULES[stage.kind]}")
    started = time.time()
    try:
        summary = module.run(StageContext(project, recipe, stage, plan, tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = {
        "recipe": recipe.name,
        "stage": stage.name,
        "key": stage.key,
        "inputs": stage.inputs,
        "summary": summary or {},
        "tunefile": __version__,
        "python": platform.python_version(),
        "seconds": round(time.time() - started, 3),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False) + "\n")
    _publish(tmp, out)
    return manifest
