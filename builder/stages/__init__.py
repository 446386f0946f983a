"""The stages: one module per stage kind, each with `run(ctx) -> dict`, and the one table of kinds.

A stage module reads top to bottom (setup, work, save), imports its heavy libraries inside `run`,
and never imports another stage: what two stages share lives in the domain packages below
(`builder.data`, `builder.train`, `builder.export`, ...). The engine (`builder.engine`) plans
stages from this table, and runs a kind by importing `builder.stages.<module>`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from builder.recipe.project import Project
from builder.recipe.schema import Recipe


@dataclass(frozen=True)
class StageKind:
    """One kind of stage: what it reads, which module runs it, and what enters its key besides
    the recipe slice and file digests (bump `code_version` when its output changes on purpose)."""

    name: str
    reads: tuple[str, ...]        # the kinds whose outputs it reads
    module: str                   # builder.stages.<module>
    code_version: int
    libraries: tuple[str, ...]    # the libraries whose versions can change its bytes
    grouped: bool = False         # one stage per source or type, all in one DVC stage
    trains: bool = False          # trains a model (and may run under `accelerate launch`)


# The DVC stages of every recipe: one per kind, in build order. The set is the same whatever a recipe
# says, so no recipe edit changes dvc.yaml: a kind the recipe turns off (export.merge: false) publishes
# a placeholder, and `quantize` and `eval` each run every type the recipe lists (quantize@T in
# build/<recipe>/quantize/T/), building only the types whose key is new. `pairs` and `preference`
# (preference tuning after SFT) are placeholders for a recipe without a preference section; merge
# reads the last training stage: preference when there is one, else train.
_TOKENIZE = ("jinja2", "pyarrow", "tokenizers", "transformers")
_TRAIN = ("accelerate", "peft", "torch", "transformers", "safetensors")
_LLAMA = ("llama_cpp_python",)
KINDS: dict[str, StageKind] = {kind.name: kind for kind in (
    StageKind("generate", (), "generate", 1, _LLAMA, grouped=True),  # an in-process teacher's sampling
    StageKind("base", (), "base", 1, ("tokenizers", "torch", "transformers", "safetensors")),
    StageKind("dataset", ("base", "generate"), "dataset", 6, _TOKENIZE),
    StageKind("pairs", ("base",), "pairs", 1, _TOKENIZE),
    StageKind("train", ("base", "dataset"), "train", 3, _TRAIN, trains=True),
    StageKind("preference", ("base", "train", "pairs"), "preference", 1, _TRAIN, trains=True),
    # merge 3, gguf 2, eval 3: generation_config and the GGUF name the end-of-turn token; the stop rate
    # counts only stops there (issue 24).
    StageKind("merge", ("base", "train", "preference"), "merge", 3, ("peft", "torch", "transformers", "safetensors")),
    StageKind("gguf", ("merge",), "gguf", 2, _LLAMA),
    StageKind("quantize", ("gguf",), "quantize", 1, _LLAMA, grouped=True),
    StageKind("eval", ("gguf", "quantize", "dataset", "preference"), "evaluate", 3, _LLAMA, grouped=True),
)}


@dataclass(frozen=True)
class Stage:
    recipe: str
    name: str                    # "dataset", "quantize@q8_0"
    upstream: tuple[str, ...]    # names of the stages whose outputs this one reads
    inputs: dict                 # everything the key covers (canonical-JSON-able)
    key: str

    @property
    def kind(self) -> str:
        return self.name.split("@")[0]

    @property
    def param(self) -> str | None:
        return self.name.split("@")[1] if "@" in self.name else None


@dataclass(frozen=True)
class StageContext:
    """What a stage's run gets: the project, the recipe, its own stage, the whole plan (for
    lineage) and the temp folder it writes into (published with a manifest when run returns)."""

    project: Project
    recipe: Recipe
    stage: Stage
    plan: dict[str, Stage]  # every stage of the recipe, by name (for lineage)
    out_dir: Path  # the temp folder the stage writes into

    def input_dir(self, stage_name: str) -> Path:
        return self.project.stage_dir(self.recipe.name, stage_name)
