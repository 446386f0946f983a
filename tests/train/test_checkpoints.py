"""builder/train/checkpoints.py: a checkpoint folder is safetensors and JSON only, loads back equal
(types, dtypes, int keys and tuples included) without unpickling anything, keeps only the newest,
and falls back to an older checkpoint when the newest is truncated."""
from __future__ import annotations

import pickle
import shutil

import pytest

from builder.train.checkpoints import clear_checkpoints, load_latest, save_checkpoint


def assert_same(a, b, where: str = "state") -> None:
    """Equal values of equal types all the way down; tensors equal in dtype, shape and every bit."""
    import torch

    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert sorted(map(repr, a)) == sorted(map(repr, b)), where  # the same keys, of the same types
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def training_state() -> dict:
    """What the loop saves, for a small AdamW run: tensors of several dtypes, the optimizer's
    int-keyed state and its tuple betas, the schedule, the RNG state, the curve and eval rows."""
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    torch.manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(3, 4))
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    scheduler = LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    for _ in range(2):
        (weight ** 2).sum().backward()
        optimizer.step()
        scheduler.step()
    return {"trainable": {"layer.weight": weight.detach().clone(), "half": torch.randn(5).to(torch.bfloat16)},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "cuda_rng": None,
            "curve": [[1, 0, 0.1 + 0.2, 0.0], [2, 0, 6.548825123456789, 1e-300]],
            "evals": [[0, {"loss": 0.6931471805599453, "pairs": 6}], [2, None], [3, float("inf")]],
            "odd": {"__tensor__": "a key that looks like the format's tag"}, "keys": {7: (1, 2), "7": [1, 2]}}


def test_a_checkpoint_is_safetensors_and_json_and_loads_back_equal_without_unpickling(tmp_path, monkeypatch):
    import torch

    state = training_state()
    path = save_checkpoint(tmp_path, 3, state)
    assert path.name == "step-00000003"
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "tensors.safetensors"]
    assert not (path / "state.json").read_bytes().startswith(b"\x80")  # not a pickle stream
    assert (path / "tensors.safetensors").read_bytes()[8:10] == b'{"'  # safetensors: a length, then a JSON header

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    loaded = load_latest(tmp_path)
    assert loaded.pop("step") == 3
    assert_same(loaded, state)
    assert list(loaded["optimizer"]["state"]) == [0]  # keyed by parameter index, as load_state_dict needs
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert loaded["torch_rng"].dtype == torch.uint8


def test_a_restored_rng_and_optimizer_continue_exactly_as_the_saved_ones(tmp_path):
    import torch

    state = training_state()
    save_checkpoint(tmp_path, 2, state)
    loaded = load_latest(tmp_path)
    runs = []
    for saved in (state, loaded):
        weight = torch.nn.Parameter(saved["trainable"]["layer.weight"].clone())
        optimizer = torch.optim.AdamW([weight], lr=1e-3)
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        for _ in range(3):
            (weight * torch.randn(3, 4)).sum().backward()
            optimizer.step()
        runs.append(weight.detach())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], state["trainable"]["layer.weight"])


def test_only_the_newest_is_kept_and_a_truncated_one_falls_back_to_an_older(tmp_path):
    first = save_checkpoint(tmp_path, 3, {"curve": [[1, 0, 0.5, 0.1]]})
    aside = tmp_path.parent / "aside"
    shutil.copytree(first, aside)
    newest = save_checkpoint(tmp_path, 6, {"curve": [[4, 1, 0.25, 0.1]]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000006"]
    assert load_latest(tmp_path) == {"curve": [[4, 1, 0.25, 0.1]], "step": 6}
    shutil.copytree(aside, first)
    (tmp_path / ".step-00000009.tmp-1234").mkdir()  # a write killed before its rename: ignored
    state = (newest / "state.json").read_bytes()
    (newest / "state.json").write_bytes(state[:len(state) // 2])
    assert load_latest(tmp_path)["step"] == 3
    (newest / "state.json").write_bytes(state)
    tensors = (newest / "tensors.safetensors").read_bytes()
    (newest / "tensors.safetensors").write_bytes(tensors[:5])
    assert load_latest(tmp_path)["step"] == 3
    clear_checkpoints(tmp_path)
    assert load_latest(tmp_path) is None


def test_a_value_json_cannot_hold_exactly_is_refused_not_pickled(tmp_path):
    with pytest.raises(TypeError, match="checkpoint: scheduler/seen is a set"):
        save_checkpoint(tmp_path, 1, {"scheduler": {"seen": {1, 2}}})
    assert not list(tmp_path.iterdir())
