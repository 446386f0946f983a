"""Shared fixtures: the repo root, a tiny tokenizer built in-process, and throwaway projects."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The builtin tiny-llama tokenizer, trained in-process from the shipped corpus (~1 s)."""
    from builder.models import BUILTIN_MODELS
    from builder.models.tiny_llama import train_tokenizer

    return train_tokenizer(BUILTIN_MODELS["tiny-llama"])


@pytest.fixture
def tokenizer_project(tmp_path, tiny_tokenizer, monkeypatch):
    """An empty project (recipes/, data/, params.yaml for recipe `r`) whose base model is a folder
    holding only the tiny tokenizer and a config: dataset builds in seconds. The current folder."""
    root = tmp_path / "p"
    (root / "recipes").mkdir(parents=True)
    (root / "data").mkdir()
    tiny_tokenizer.save_pretrained(root / "models" / "tok")
    (root / "models" / "tok" / "config.json").write_text('{"model_type": "llama"}\n')
    (root / "params.yaml").write_text("recipes: [r]\ndevice: cpu\ncache_dir: .tunefile\n")
    monkeypatch.chdir(root)
    return root


def make_project(root: Path, recipe_text: str | None = None, name: str = "default") -> Path:
    """A project folder with the repo's data, params.yaml and one recipe (default: the repo's)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "data", root / "data")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    (root / "recipes").mkdir()
    text = recipe_text if recipe_text is not None else (REPO / "recipes" / "default.yaml").read_text()
    (root / "recipes" / f"{name}.yaml").write_text(text)
    (root / "params.yaml").write_text(f"recipes: [{name}]\ndevice: cpu\ncache_dir: .tunefile\n")
    return root


def small_recipe(size: int = 240) -> str:
    """The default recipe with a smaller mixture, so end-to-end builds take seconds."""
    text = (REPO / "recipes" / "default.yaml").read_text()
    assert "size: 2000 " in text
    return text.replace("size: 2000 ", f"size: {size} ")
