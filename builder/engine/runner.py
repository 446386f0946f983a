"""The stage runner. Run one stage: check its inputs are built, write into a temp folder, manifest last, rename.

Each stage module has `run(ctx) -> dict`; heavy libraries are imported inside it. A folder
without manifest.json is not a result; a folder whose manifest key differs from the plan is stale.
A stage whose key is in the stage store (built before, by this or another recipe) is restored
from there instead of run. One build of a recipe at a time: a lock file says who holds it.

The manifest records only what follows from the stage's inputs and the build that made its files
(key, inputs, the stage's summary as built, tunefile and Python versions): a folder restored from
the store is the built folder, manifest included, byte for byte, so reverting an edit leaves
DVC's hashes and dvc.lock as they were. How a run went (built or restored, seconds, when) goes to
the run log, outside the DVC outputs: <cache_dir>/runs/<recipe>/<stage>.json.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib
import os
import platform
import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from builder import __version__
from builder.engine.launch import LAUNCHED_ENV, run_launched, wants_launch
from builder.errors import StageError
from builder.files import read_json, write_json
from builder.recipe.project import Project
from builder.recipe.schema import Recipe
from builder.stages import KINDS, Stage, StageContext
from builder.store import StageStore

MANIFEST = "manifest.json"
RUNS = "runs"  # <cache_dir>/runs/<recipe>/<stage>.json: the run log
_HELD_LOCKS: dict[str, int] = {}  # lock path -> depth, so a build can run stages under its own lock


def read_manifest(stage_dir: Path) -> dict | None:
    """The stage folder's manifest; None when it has none (not built) or one that does not parse."""
    return read_json(stage_dir / MANIFEST, default=None)


def is_built(project: Project, stage: Stage) -> bool:
    manifest = read_manifest(project.stage_dir(stage.recipe, stage.name))
    return manifest is not None and manifest.get("key") == stage.key


def _is_running(pid: int) -> bool:
    """Whether pid is a live process (a killed build's zombie, never reaped in some containers, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
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


def publish(tmp: Path, out: Path) -> None:
    """Swap tmp into out's place; at no point does an incomplete folder sit at `out`."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists() or out.is_symlink():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists() or old.is_symlink():
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def lock_path(project: Project, recipe: str) -> Path:
    return project.build_dir(recipe) / ".lock"


@contextlib.contextmanager
def recipe_lock(project: Project, recipe: str) -> Iterator[None]:
    """Hold build/<recipe>/.lock; a second build of the same recipe fails at once, saying who holds it."""
    path = lock_path(project, recipe)
    key = str(path)
    if os.environ.get(LAUNCHED_ENV) == key:  # a rank started by `accelerate launch`: its parent holds it
        yield
        return
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StageError(f"recipe '{recipe}' is being built by {holder}; wait for it to finish "
                             f"(lock: {path})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        _HELD_LOCKS[key] = 1
        try:
            yield
        finally:
            del _HELD_LOCKS[key]
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def make_manifest(recipe: Recipe, stage: Stage, summary: dict | None) -> dict:
    """What a built stage folder records: no clock and no word on where it came from, so the same
    build restored later has the same bytes."""
    return {"recipe": recipe.name, "stage": stage.name, "key": stage.key, "inputs": stage.inputs,
            "summary": summary or {}, "tunefile": __version__, "python": platform.python_version()}


def _restored_manifest(folder: Path, recipe: Recipe, stage: Stage) -> None:
    """Keep the stored manifest as it was built (the same bytes, the same hard link); a stage another
    recipe built with the same key gets this recipe's and stage's names."""
    stored = read_manifest(folder)
    if stored is None or stored.get("key") != stage.key:  # an entry stored without its manifest
        manifest = make_manifest(recipe, stage, (stored or {}).get("summary"))
    else:
        manifest = {**stored, "recipe": recipe.name, "stage": stage.name}
    if manifest != stored:
        write_json(folder / MANIFEST, manifest)


def run_log_path(project: Project, recipe: str, stage: str) -> Path:
    return project.cache_dir / RUNS / recipe / f"{stage}.json"


def read_run(project: Project, recipe: str, stage: str) -> dict | None:
    """The stage's last run as the run log has it: result (built/restored), seconds, when; None if none."""
    return read_json(run_log_path(project, recipe, stage), default=None)


def _log_run(project: Project, stage: Stage, result: str, started: float) -> dict:
    run = {"recipe": stage.recipe, "stage": stage.name, "key": stage.key, "result": result,
           "seconds": round(time.time() - started, 3),
           "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(run_log_path(project, stage.recipe, stage.name), run)
    return run


def _launched_run(project: Project, stage: Stage) -> dict:
    manifest = read_manifest(project.stage_dir(stage.recipe, stage.name))
    if manifest is None or manifest.get("key") != stage.key:
        raise StageError(f"{stage.recipe}/{stage.name}: accelerate launch finished but published no result")
    return {**(read_run(project, stage.recipe, stage.name) or {}), "launched": True}  # its rank 0 has reported it


def distributed_rank() -> int | None:
    """This process's rank under `accelerate launch` / torchrun with more than one process, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("RANK", "0"))
    return None


def run_worker(project: Project, recipe: Recipe, stage: Stage, plan: dict[str, Stage]) -> dict:
    """A non-main rank of a multi-process train (or preference): it trains its share in a scratch folder, and
    the main rank alone publishes the stage (lock, temp folder, manifest, store)."""
    scratch = project.stage_dir(recipe.name, stage.name).with_name(f".{stage.name}.worker-{os.getpid()}")
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        module = importlib.import_module(f"builder.stages.{KINDS[stage.kind].module}")
        return {"summary": module.run(StageContext(project, recipe, stage, plan, scratch)), "worker": True}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_upstream(project: Project, recipe: Recipe, stage: Stage, plan: dict[str, Stage]) -> None:
    for name in stage.upstream:
        if not is_built(project, plan[name]):
            raise StageError(f"{recipe.name}/{stage.name} needs {name}, which is not built or is stale; "
                             f"run `tunefile build {recipe.name} --until {stage.name}`")


def _fresh_tmp(out: Path) -> Path:
    """An empty temp folder beside `out` (build/<recipe>/.<stage>.tmp-<pid>), dead builds' leftovers gone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def run_stage(project: Project, recipe: Recipe, stage: Stage, plan: dict[str, Stage]) -> dict:
    """Build `stage` from its (already built) upstream stages, or restore it from the stage
    store when its key was built before; return how it went (the run log's record). Under a
    multi-process launch every rank trains; only rank 0 publishes, and nothing is restored (all
    ranks must train)."""
    rank = distributed_rank()
    if rank is not None and not KINDS[stage.kind].trains:
        raise StageError(f"only the train and preference stages run under a multi-process launch; run {stage.name} "
                         "in one process")
    if rank:
        return run_worker(project, recipe, stage, plan)
    with recipe_lock(project, recipe.name):
        _check_upstream(project, recipe, stage, plan)
        out = project.stage_dir(recipe.name, stage.name)
        tmp = _fresh_tmp(out)
        store = StageStore(project.cache_dir)
        started = time.time()
        try:
            restored = rank is None and store.get(stage.key, tmp)
            if restored:
                _restored_manifest(tmp, recipe, stage)
            elif KINDS[stage.kind].trains and wants_launch(project):
                shutil.rmtree(tmp)  # rank 0 of the launch writes and publishes its own
                run_launched(project, recipe.name, stage.kind, str(lock_path(project, recipe.name)))
                return _launched_run(project, stage)
            else:
                module = importlib.import_module(f"builder.stages.{KINDS[stage.kind].module}")
                summary = module.run(StageContext(project, recipe, stage, plan, tmp))
                write_json(tmp / MANIFEST, make_manifest(recipe, stage, summary))  # last: the folder is a result
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish(tmp, out)
        if not restored:
            store.put(stage.key, out)
        return _log_run(project, stage, "restored" if restored else "built", started)
