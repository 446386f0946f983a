"""`tunefile resolve`, the first step of dvc.yaml: write each DVC stage's spec file.

DVC runs it only when one of its deps moved (a recipe value, params.yaml, a source file, ...; see
dvcgen). It plans every recipe (file digests from the stat cache), rewrites the specs whose bytes
changed, and keeps its own deps in dvc.yaml current: a recipe that now reads a new file (a source
added) gets that file watched from the next `dvc repro` on. A recipe added to or removed from
params.yaml changes which DVC stages exist; that one edit needs `tunefile dvc`, and resolve says so.
"""
from __future__ import annotations

from pathlib import Path

from builder.engine.dvcgen import recipes_in, render_dvc_yaml, watched_paths, write_specs
from builder.engine.plan import plan_project
from builder.errors import TunefileError
from builder.files import write_atomic
from builder.hashing import StatCache
from builder.recipe.project import load_project


def _planned(root: Path | None):
    project = load_project(root)
    stat = StatCache(project.cache_dir / "stat-cache.json")
    plans = plan_project(project, stat)
    stat.save()
    return project, plans, render_dvc_yaml(project, list(plans), watched_paths(project, plans, stat.touched))


def dvc_yaml_text(root: Path | None = None) -> tuple[Path, str]:
    """dvc.yaml's path and the text it should have, from params.yaml and the recipes."""
    project, _, text = _planned(root)
    return project.root / "dvc.yaml", text


def resolve(root: Path | None = None) -> list[str]:
    """Bring the spec files (and the resolve step's deps) up to date; return what changed, in words."""
    project, plans, text = _planned(root)
    path = project.root / "dvc.yaml"
    current = path.read_text(encoding="utf-8") if path.is_file() else ""
    listed = recipes_in(current)
    if listed != sorted(plans):
        raise TunefileError(f"params.yaml builds {', '.join(sorted(plans))} but dvc.yaml builds "
                            f"{', '.join(listed or []) or 'nothing'}; run `tunefile dvc` to regenerate dvc.yaml")
    notes = []
    if text != current:
        write_atomic(path, text)
        notes.append("dvc.yaml: the resolve step's deps follow the recipes (recorded by the next `dvc repro`)")
    return notes + [f"{name}: key changed" for name in write_specs(project, plans)]
