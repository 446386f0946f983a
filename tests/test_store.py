"""The stage store (verified restore, corrupt entries dropped) and the per-recipe build lock."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
from helpers import make_project

from builder.engine.runner import recipe_lock
from builder.errors import StageError
from builder.recipe.project import load_project
from builder.store import StageStore


def test_store_round_trip_and_corruption(tmp_path):
    built = tmp_path / "built"
    (built / "sub").mkdir(parents=True)
    (built / "a.bin").write_bytes(b"weights")
    (built / "sub" / "b.json").write_text("{}")
    store = StageStore(tmp_path / "cache")
    store.put("k" * 32, built)
    restored = tmp_path / "restored"
    restored.mkdir()
    assert store.get("k" * 32, restored)
    assert (restored / "a.bin").read_bytes() == b"weights" and (restored / "sub" / "b.json").read_text() == "{}"
    assert not store.get("x" * 32, tmp_path / "nowhere")  # unknown key
    (store.entry("k" * 32) / "a.bin").unlink()
    (store.entry("k" * 32) / "a.bin").write_bytes(b"tampered")
    again = tmp_path / "again"
    again.mkdir()
    assert not store.get("k" * 32, again)  # digest mismatch: never used...
    assert not store.entry("k" * 32).exists()  # ...and dropped, so the stage is rebuilt
    assert list(again.iterdir()) == []


def test_a_second_build_of_a_recipe_is_refused_while_one_runs(tmp_path):
    root = make_project(tmp_path / "p")
    project = load_project(root)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom builder.recipe.project import load_project\nfrom builder.engine.runner import recipe_lock\n"
        f"with recipe_lock(load_project({str(root)!r}), 'default'):\n    print('held', flush=True); time.sleep(30)\n"
    )], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StageError, match=rf"recipe 'default' is being built by pid {holder.pid}; wait"):
            with recipe_lock(project, "default"):
                pass
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 5
    while True:  # the lock dies with its holder
        try:
            with recipe_lock(project, "default"):
                with recipe_lock(project, "default"):  # re-entrant within one process
                    break
        except StageError:
            assert time.time() < deadline
            time.sleep(0.05)
