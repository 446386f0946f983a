"""The project: its root folder, `params.yaml` (recipes to build, machine knobs) and where things go.

Paths in recipes are relative to the project root, the folder holding `params.yaml` and `dvc.yaml`.
Commands find it by walking up from the current folder, as git and DVC do. A recipe is named
either way: `default` or its path (`recipes/default.yaml`, relative to the current folder).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from builder.errors import RecipeError
from builder.recipe.schema import NAME_PATTERN, Recipe, SourceSpec, format_errors, load_recipe
from builder.recipe.yamlfile import YamlDoc, load_yaml

PARAMS_FILE = "params.yaml"
RECIPES_DIR = "recipes"
BUILD_DIR = "build"
GENERATED_FILE = "generated.jsonl"  # what a generate@<source> stage writes


class Launch(BaseModel):
    """How the train stage is started: under `accelerate launch` when num_processes > 1 or a config
    file is given (DDP, FSDP, DeepSpeed, multi-node: whatever the accelerate config says)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_processes: int = Field(default=1, gt=0)
    config_file: str | None = None  # an accelerate config (`accelerate config` writes one)

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1 or self.config_file is not None


class Endpoints(BaseModel):
    """How tunefile talks to OpenAI-compatible servers (generation teachers, the eval judge):
    machine settings, so they live in params.yaml, not in a recipe or a key."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # the variable's name
    concurrency: int = Field(default=4, gt=0, le=256)
    timeout_s: float = Field(default=60.0, gt=0)
    retries: int = Field(default=3, ge=0, le=20)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    recipes: tuple[str, ...] = Field(min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_dir: str = ".tunefile"
    checkpoint_steps: int = Field(default=50, gt=0)  # train checkpoints (for resuming) every N steps
    workers: int | None = Field(default=None, gt=0)  # dataset tokenizing processes (None: every core)
    launch: Launch = Launch()
    endpoints: Endpoints = Endpoints()

    @property
    def dataset_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclass(frozen=True)
class Project:
    root: Path
    params: Params

    @property
    def cache_dir(self) -> Path:
        return self.root / self.params.cache_dir

    def recipe_path(self, name_or_path: str) -> Path:
        """`default` -> <root>/recipes/default.yaml; a path (relative to the current folder) is
        taken as it is."""
        return recipe_file(name_or_path, self.root)

    def load_recipe(self, name_or_path: str) -> Recipe:
        return load_recipe(self.recipe_path(name_or_path), root=self.root, checks=(self._trainable_here,))

    def _trainable_here(self, doc: YamlDoc, recipe: Recipe) -> list[str]:
        if recipe.train.method == "qlora" and not has_cuda(self.params.device):
            return [f"{doc.where(('train', 'method'))}: train.method: qlora needs a CUDA GPU (bitsandbytes "
                    f"4-bit), and params.yaml device is {self.params.device} with no NVIDIA driver here; "
                    "use lora or full on this machine"]
        return []

    def build_dir(self, recipe: str) -> Path:
        return self.root / BUILD_DIR / recipe

    def stage_dir(self, recipe: str, stage: str) -> Path:
        """build/<recipe>/<stage>; a stage of one type lives in its kind's folder:
        quantize@q8_0 -> build/<recipe>/quantize/q8_0 (one DVC out holds every type)."""
        kind, _, param = stage.partition("@")
        return self.build_dir(recipe) / kind / param if param else self.build_dir(recipe) / stage

    def readable_sources(self, recipe: Recipe) -> tuple[SourceSpec, ...]:
        """The recipe's sources as the dataset stage reads them: a generated source is the
        generated.jsonl its generate@<source> stage wrote (a file source from there on)."""
        return tuple(s.model_copy(update={"generate": None, "path": project_path(
            self.stage_dir(recipe.name, f"generate@{s.name}") / GENERATED_FILE, self.root)})
            if s.generate is not None else s for s in recipe.sources)

    def specs_dir(self, recipe: str) -> Path:
        return self.build_dir(recipe) / "specs"

    def spec_path(self, recipe: str, kind: str) -> Path:
        """The spec file of one DVC stage (a stage kind): its bytes change iff a key in it changes."""
        return self.specs_dir(recipe) / f"{kind}.json"


def load_standalone() -> Project:
    """Outside any project (`tunefile validate FILE`): the current folder as root, default settings."""
    return Project(root=Path.cwd().resolve(), params=Params(recipes=("default",)))


def has_cuda(device: str) -> bool:
    """Whether training could run on CUDA, without importing torch (validation stays fast)."""
    return device != "cpu" and Path("/proc/driver/nvidia/version").exists()


def project_path(path: Path, root: Path) -> str:
    """How a file is named in keys, rejects and provenance: relative to the project root when it
    lies inside it (so a moved or cloned project keeps its keys), else its absolute path."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).resolve().as_posix()


def recipe_file(name_or_path: str, root: Path) -> Path:
    """The recipe file a command-line RECIPE means: a bare name is recipes/NAME.yaml under root;
    anything else is a path, relative to the current folder."""
    if re.match(NAME_PATTERN, name_or_path):
        return root / RECIPES_DIR / f"{name_or_path}.yaml"
    return Path(name_or_path).resolve()


def find_root(start: Path | None = None) -> Path | None:
    """The nearest folder at or above start (default: the current folder) holding params.yaml."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PARAMS_FILE).is_file():
            return folder
    return None


def load_project(root: Path | None = None) -> Project:
    """Read params.yaml at root; without a root, the project around the current folder."""
    if root is None:
        root = find_root()
        if root is None:
            raise RecipeError([f"no {PARAMS_FILE} in {Path.cwd()} or any folder above it: run tunefile "
                               "inside a project (the folder with params.yaml and dvc.yaml, or below it)"])
    root = Path(root).resolve()
    doc = load_yaml(root / PARAMS_FILE, root)
    try:
        params = Params.model_validate(doc.data or {})
    except ValidationError as exc:
        raise RecipeError(format_errors(doc, exc, Params)) from None
    return Project(root=root, params=params)
