"""Training checkpoints in a scratch folder outside DVC outputs, so an interrupted train or
preference stage resumes.

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

On disk, step-<step>/ holds two files and nothing that can run code when read: tensors.safetensors
(every tensor of the state: weights, the optimizer's moments, RNG states as uint8) and state.json
(the rest, each tensor replaced by {"__tensor__": its name in the safetensors file}). JSON keeps
floats exactly (repr round-trips a float64); tuples and dicts whose keys are not all strings
(the optimizer's state is keyed by parameter index) are tagged, so the state loads back equal,
types included. (Folders of the earlier pickle format, state.pt, are never read: that run restarts.)
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from builder.errors import FileFormatError
from builder.files import read_json, write_json

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"  # the tags of what plain JSON cannot say


def checkpoint_folder(cache_dir: Path, key: str) -> Path:
    return cache_dir / "checkpoints" / key


def _at(path: str, part: object) -> str:
    return f"{path}/{part}" if path else str(part)


def split_tensors(value: object, tensors: dict, path: str = "") -> object:
    """`value` as plain JSON, each tensor moved into `tensors` under its path ("optimizer/state/0/exp_avg")
    and replaced by a tag naming it; anything JSON cannot hold exactly is refused, never pickled."""
    import torch

    if isinstance(value, torch.Tensor):
        if path in tensors:
            raise ValueError(f"checkpoint: two tensors are named {path!r}")
        tensors[path] = value.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(value, (list, tuple)):
        items = [split_tensors(v, tensors, _at(path, i)) for i, v in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        pairs = [(k, split_tensors(v, tensors, _at(path, k))) for k, v in value.items()]
        if all(isinstance(k, str) for k in value) and not {_TENSOR, _TUPLE, _DICT} & set(value):
            return dict(pairs)
        return {_DICT: [[split_tensors(k, tensors, _at(path, "key")), v] for k, v in pairs]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint: {path or 'the state'} is a {type(value).__name__}, which JSON cannot hold")


def join_tensors(value: object, tensors: dict) -> object:
    """The inverse of split_tensors: tags back to tensors, tuples and dicts."""
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        if set(value) == {_TUPLE}:
            return tuple(join_tensors(v, tensors) for v in value[_TUPLE])
        if set(value) == {_DICT}:
            return {join_tensors(k, tensors): join_tensors(v, tensors) for k, v in value[_DICT]}
        return {k: join_tensors(v, tensors) for k, v in value.items()}
    return value


def save_checkpoint(folder: Path, step: int, state: dict) -> Path:
    """Write `state` as step-<step>/ (temp folder, then rename) and delete older checkpoints."""
    from safetensors.torch import save_file

    tensors: dict = {}
    plain = split_tensors({**state, "step": step}, tensors)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / TENSORS_FILE))
    write_json(tmp / STATE_FILE, plain)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in folder.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict:
    """One checkpoint folder's state; raises if a file is missing or truncated."""
    from safetensors.torch import load

    # load() copies from bytes: the tensors own their memory (the optimizer updates its moments in
    # place, and the folder is deleted once a newer checkpoint is written).
    tensors = load((path / TENSORS_FILE).read_bytes())
    return join_tensors(read_json(path / STATE_FILE), tensors)


def load_latest(folder: Path) -> dict | None:
    """The newest complete checkpoint's state, or None (temp folders of killed writes are ignored)."""
    from safetensors import SafetensorError

    done = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()) if folder.is_dir() else []
    for path in reversed(done):
        try:
            return load_checkpoint(path)
        except (OSError, KeyError, ValueError, FileFormatError, SafetensorError):
            continue  # a truncated file: fall back to an older checkpoint, or none
    return None


def clear_checkpoints(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
