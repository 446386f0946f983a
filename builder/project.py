"""The project: its root folder, `params.yaml` (recipes to build, machine knobs) and where things go.

Paths in recipes are relative to the project root, the folder holding `params.yaml` and `dvc.yaml`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from builder.errors import RecipeError
from builder.recipe import NAME_PATTERN, Recipe, format_errors, load_recipe
from builder.yamlfile import load_yaml

PARAMS_FILE = "params.yaml"
RECIPES_DIR = "recipes"
BUILD_DIR = "build"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    recipes: tuple[str, ...] = Field(min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_dir: str = ".tunefile"
    checkpoint_steps: int = Field(default=50, gt=0)  # train checkpoints (for resuming) every N steps


@dataclass(frozen=True)
class Project:
    root: Path
    params: Params

    @property
    def cache_dir(self) -> Path:
        return self.root / self.params.cache_dir

    def recipe_path(self, name_or_path: str) -> Path:
        """`default` -> recipes/default.yaml; a path is taken as it is."""
        if re.match(NAME_PATTERN, name_or_path):
            return self.root / RECIPES_DIR / f"{name_or_path}.yaml"
        return Path(name_or_path)

    def load_recipe(self, name_or_path: str) -> Recipe:
        path = self.recipe_path(name_or_path)
        recipe = load_recipe(path, root=self.root)
        if recipe.train.method == "qlora" and not has_cuda(self.params.device):
            line = load_yaml(path).where(("train", "method"))
            raise RecipeError([f"{line}: train.method: qlora needs a CUDA GPU (bitsandbytes 4-bit), and "
                               f"params.yaml device is {self.params.device} with no NVIDIA driver here; "
                               "use lora or full on this machine"])
        return recipe

    def build_dir(self, recipe: str) -> Path:
        return self.root / BUILD_DIR / recipe

    def stage_dir(self, recipe: str, stage: str) -> Path:
        return self.build_dir(recipe) / stage

    def spec_path(self, recipe: str, stage: str) -> Path:
        return self.build_dir(recipe) / "specs" / f"{stage}.json"


def has_cuda(device: str) -> bool:
    """Whether training could run on CUDA, without importing torch (validation stays fast)."""
    return device != "cpu" and Path("/proc/driver/nvidia/version").exists()


def load_project(root: Path | None = None) -> Project:
    """Read params.yaml at root (default: the current folder)."""
    root = Path(root or Path.cwd()).resolve()
    doc = load_yaml(root / PARAMS_FILE)
    try:
        params = Params.model_validate(doc.data or {})
    except ValidationError as exc:
        raise RecipeError(format_errors(doc, exc, Params)) from None
    return Project(root=root, params=params)
