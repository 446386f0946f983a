"""Train checkpoints in a scratch folder outside DVC outputs, so an interrupted train resumes.

    folder = checkpoint_folder(project, train_key)      # .tunefile/checkpoints/<key>/
    state = load_latest(folder)                         # None, or what save_checkpoint stored
    save_checkpoint(folder, step, state)                # atomic; keeps only the newest
    clear_checkpoints(folder)                           # after the stage's outputs are published

A checkpoint holds everything the rest of the run depends on: the trainable weights, the
optimizer and scheduler states, the RNG states (dropout and NEFTune noise draw from them), the
step and the loss curve so far. The batch order is drawn up front from the seed, so a resumed
run continues with exactly the batches the interrupted one would have seen, and ends with the
same bytes. The folder is keyed by the train stage's key: a checkpoint is never resumed into a
run with other inputs.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

STATE_FILE = "state.pt"


def checkpoint_folder(cache_dir: Path, key: str) -> Path:
    return cache_dir / "checkpoints" / key


def save_checkpoint(folder: Path, step: int, state: dict) -> Path:
    """Write `state` as step-<step>/ (temp folder, then rename) and delete older checkpoints."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({**state, "step": step}, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in folder.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(folder: Path) -> dict | None:
    """The newest complete checkpoint's state, or None (temp folders of killed writes are ignored)."""
    import torch

    done = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()) if folder.is_dir() else []
    for path in reversed(done):
        try:
            return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 (a truncated file: fall back to an older one, or none)
            continue
    return None


def clear_checkpoints(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
