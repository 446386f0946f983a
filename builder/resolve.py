"""`tunefile resolve`, the always-run first step of dvc.yaml: write each stage's spec file.

A full resolve loads every recipe, plans it (file digests from the stat cache) and rewrites the
specs whose key changed. Then it records a fingerprint: the stat (size, mtime, inode) of every
file and folder that could change a key — params.yaml, dvc.yaml, the recipes, the files the
plan read, the folders the source globs search, tunefile's own code and the installed
libraries' folder — and the bytes of the specs. The next resolve checks those first and, when
none moved, stops there: a no-op `dvc repro` then costs a Python start and a few dozen stats.
"""
from __future__ import annotations

import glob
import json
import os
import sysconfig
from pathlib import Path

FINGERPRINT = Path("build") / ".resolve-fingerprint.json"
PACKAGE = Path(__file__).resolve().parent


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _content(path: str) -> str | None:
    import xxhash

    try:
        return xxhash.xxh3_128_hexdigest(Path(path).read_bytes())
    except FileNotFoundError:
        return None


def is_unchanged(root: Path) -> bool:
    """True when every path the last full resolve depended on has the same stat, and every spec
    file the same bytes (DVC re-links specs into its cache, so their stat moves on its own)."""
    try:
        record = json.loads((root / FINGERPRINT).read_text())
        return (record["root"] == str(root.resolve())  # a copied or cloned fingerprint says nothing
                and all(_stat(path) == stat for path, stat in record["stat"].items())
                and all(_content(path) == digest for path, digest in record["content"].items()))
    except (OSError, ValueError, KeyError, AttributeError, TypeError):  # missing or from another version
        return False


def _watched_paths(root: Path, project, plans: dict, digested: set[str]) -> set[str]:
    paths = {str(root / "params.yaml"), str(root / "dvc.yaml"), sysconfig.get_paths()["purelib"]}
    paths |= digested
    for name, stages in plans.items():
        recipe = project.load_recipe(name)
        paths.add(str(project.recipe_path(name).resolve()))
        for source in recipe.sources:
            if source.path is None or source.is_hub:  # inline rows live in the recipe; hub data is pinned
                continue
            # A new file matching the glob changes the folder's mtime.
            fixed = [part for part in Path(source.path).parent.parts if not glob.has_magic(part)]
            paths.add(str(root.joinpath(*fixed).resolve()))
            paths |= {str(Path(m).parent.resolve()) for m in glob.glob(str(root / source.path))}
    paths |= {str(p) for p in PACKAGE.rglob("*") if p.suffix in (".py", ".jinja", ".txt")}
    return paths


def resolve(root: Path) -> list[str]:
    """Bring the spec files up to date; return the stages whose spec changed."""
    if is_unchanged(root):
        return []
    from builder.dvcgen import plan_project, render_dvc_yaml, write_specs
    from builder.errors import TunefileError
    from builder.hashing import StatCache
    from builder.project import load_project

    project = load_project(root)
    stat = StatCache(project.cache_dir / "stat-cache.json")
    plans = plan_project(project, stat)
    dvc_yaml = project.root / "dvc.yaml"
    if not dvc_yaml.is_file() or dvc_yaml.read_text() != render_dvc_yaml(project, plans):
        raise TunefileError("dvc.yaml does not match params.yaml and the recipes; run `tunefile dvc`")
    changed = write_specs(project, plans)
    specs = [str(project.spec_path(name, s.name)) for name, stages in plans.items() for s in stages]
    record = {"root": str(project.root.resolve()),
              "stat": {path: _stat(path) for path in sorted(_watched_paths(project.root, project, plans, stat.touched))},
              "content": {path: _content(path) for path in sorted(specs)}}
    target = project.root / FINGERPRINT
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=0, sort_keys=True))
    os.replace(tmp, target)
    return changed
