"""Shared fixtures for every test folder: a tiny tokenizer built in-process, and a throwaway project
whose base model is that tokenizer alone (helpers that tests import live in helpers.py)."""
from __future__ import annotations

import pytest


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
