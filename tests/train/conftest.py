"""Fixtures of the training tests: a tiny random Llama saved as a model folder, and projects whose
recipe `r` trains it on CPU (seconds per build)."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

import builder.train.loop as loop
from builder.train.checkpoints import save_checkpoint

RECIPE = """name: r
base: {model: models/tiny}
template: chatml
sources: [{name: a, path: data/a.jsonl, format: alpaca}]
mixture: {eval_size: 4, seed: 3}
train:
  max_length: 96
  packing: false
  batch_size: 4
  lr: 1.0e-3
  seed: 5
%s
export: {merge: false, gguf: null}
"""


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer) -> Path:
    """A folder holding a random Llama (2 layers, hidden 64, seeded) and the tiny tokenizer: the base
    model the training tests fine-tune. Not a built project (tests/generate's tiny_base is one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny") / "tiny"
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def make_train_project(tiny_llama: Path, root: Path, train: str = "", checkpoint_steps: int = 50) -> Path:
    (root / "recipes").mkdir(parents=True)
    (root / "data").mkdir()
    shutil.copytree(tiny_llama, root / "models" / "tiny")
    rows = [{"instruction": f"What is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}." + " Indeed." * (i % 8)}
            for i in range(40)]
    (root / "data" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "recipes" / "r.yaml").write_text(RECIPE % train)
    (root / "params.yaml").write_text(f"recipes: [r]\ndevice: cpu\ncheckpoint_steps: {checkpoint_steps}\n")
    return root


@pytest.fixture(scope="session")
def train_project(tiny_llama) -> Callable[..., Path]:
    """make(root, train="", checkpoint_steps=50) -> root: a project whose recipe `r` fine-tunes the
    tiny Llama with LoRA on 40 alpaca rows (36 train, 4 eval: 9 steps of 4); `train` holds extra
    lines of the recipe's train section, `checkpoint_steps` goes to params.yaml."""
    return partial(make_train_project, tiny_llama)


@pytest.fixture
def die_at_first_checkpoint(monkeypatch) -> Callable[[], list[Path]]:
    """`arm()` makes the training loop die (KeyboardInterrupt) right after it writes its first
    checkpoint, and returns the list the written checkpoint folders go into;
    `monkeypatch.undo()` lets the next run go through."""
    def arm() -> list[Path]:
        saves: list[Path] = []

        def save_then_die(folder: Path, step: int, state: dict) -> Path:
            saves.append(save_checkpoint(folder, step, state))
            raise KeyboardInterrupt

        monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
        return saves

    return arm
