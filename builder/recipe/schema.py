"""Recipe: what model to build. YAML -> frozen pydantic models; every error names file:line and key.

    recipe = load_recipe(Path("recipes/default.yaml"))
"""
from __future__ import annotations

import glob
import re
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from builder.errors import RecipeError
from builder.models import BUILTIN_MODELS
from builder.recipe.quant import GGUF_DTYPES, QUANT_TYPES
from builder.recipe.refs import HubRef, ModelRef, is_hub, parse_hub
from builder.recipe.yamlfile import YamlDoc, load_yaml
from builder.templates import BUILTIN_TEMPLATES

NAME_PATTERN = r"^[a-z0-9_-]+$"
SOURCE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Keys that annotate a recipe and never change what is built (excluded from stage keys).
ANNOTATION_KEYS = ("description",)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseSpec(Strict):
    model: str = Field(description="builtin:NAME | path/to/hf-model-dir | hf:org/name@revision")

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        ref = ModelRef.parse(value)
        if ref.builtin is not None and ref.builtin not in BUILTIN_MODELS:
            allowed = ", ".join(f"builtin:{n}" for n in sorted(BUILTIN_MODELS))
            raise ValueError(f"unknown builtin model '{value}'; allowed: {allowed}")
        return value

    @cached_property
    def ref(self) -> ModelRef:
        """base.model, parsed (the string stays what keys and lineage record)."""
        return ModelRef.parse(self.model)


FORMAT_NAMES = ("alpaca", "sharegpt", "messages", "prompt_completion", "self_instruct", "preference")
# The fields each format reads, by their canonical names; `fields:` maps them to other column names.
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output", "system"),
    "sharegpt": ("conversations", "system"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion", "system"),
    "self_instruct": ("instruction", "instances"),
    "preference": ("prompt", "chosen", "rejected", "system"),
}


class OpenAIEndpoint(Strict):
    base_url: str = Field(pattern=r"^https?://")  # not part of any key: the same model served elsewhere
    model: str = Field(min_length=1)
    revision: str | None = None  # pin what the name serves (part of the key)


class ServedModel(Strict):
    """A model tunefile asks for text: a GGUF file run in process, or an OpenAI-compatible endpoint."""
    gguf: str | None = None
    openai: OpenAIEndpoint | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ServedModel:
        if (self.gguf is None) == (self.openai is None):
            raise ValueError("takes exactly one of gguf: PATH or openai: {base_url, model}")
        if self.gguf is not None and not self.gguf.endswith(".gguf"):
            raise ValueError(f"gguf: '{self.gguf}' is not a .gguf file")
        return self


class SamplingSpec(Strict):
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_tokens: int = Field(default=1024, ge=1, le=32768)


class GenerateSpec(Strict):
    """Self-Instruct (Wang et al., 2023): a teacher writes new tasks from sampled seed and generated
    ones, the paper's filters drop weak and near-duplicate instructions, then the teacher writes
    each kept task's instances (classification tasks output-first). See docs/generation.md."""
    method: Literal["self_instruct"] = "self_instruct"
    seed_tasks: str  # .jsonl in the Self-Instruct seed format: instruction, instances, is_classification
    count: int = Field(gt=0)  # tasks to keep
    teacher: ServedModel
    sampling: SamplingSpec = SamplingSpec()
    rouge_l_max: float = Field(default=0.7, gt=0, le=1)  # keep an instruction only below this ROUGE-L F
    min_words: int = Field(default=4, ge=1)    # instruction length bounds, in words
    max_words: int = Field(default=150, ge=1)
    prompt_instructions: int = Field(default=8, ge=2, le=16)  # examples per instruction prompt
    prompt_generated: int = Field(default=2, ge=0)  # of which generated ones, once there are enough
    requests_per_round: int = Field(default=8, ge=1, le=1024)  # prompts built from the same kept set
    max_requests: int | None = Field(default=None, gt=0)  # instruction requests (default 10 x count)
    seed: int = 0

    @field_validator("seed_tasks")
    @classmethod
    def _check_seed_tasks(cls, value: str) -> str:
        if not value.endswith(".jsonl"):
            raise ValueError(f"'{value}' is not a .jsonl file of seed tasks")
        return value

    @model_validator(mode="after")
    def _check_bounds(self) -> GenerateSpec:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words {self.min_words} is above max_words {self.max_words}")
        if self.prompt_generated >= self.prompt_instructions:
            raise ValueError("prompt_generated must leave room for seed tasks in each prompt "
                             f"(below prompt_instructions {self.prompt_instructions})")
        return self

    @property
    def request_cap(self) -> int:
        return self.max_requests or 10 * self.count


class SourceSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    path: str | None = None      # a local file or glob, or hf:org/name@revision
    examples: tuple[dict, ...] | None = None  # inline rows in the source's format
    generate: GenerateSpec | None = None  # or rows a teacher writes (stage generate@<name>)
    format: Literal[FORMAT_NAMES]  # type: ignore[valid-type]
    fields: dict[str, str] = {}     # canonical field name -> the column that holds it
    split: str | None = None     # hf: only (default train)
    subset: str | None = None    # hf: only (the dataset's config name)
    weight: float = Field(default=1.0, gt=0)
    max_examples: int | None = Field(default=None, gt=0)  # cap on usable examples (seeded pick)
    epochs: float | None = Field(default=None, gt=0)     # natural-size mixtures only: passes
    eval_fraction: float | None = Field(default=None, ge=0, lt=1)  # overrides mixture.eval_fraction

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if is_hub(value):
            parse_hub(value, pinned="data")
            return value
        if not glob.has_magic(value) and not value.endswith(SOURCE_SUFFIXES):
            raise ValueError(f"'{value}' has an unknown suffix; allowed: {', '.join(SOURCE_SUFFIXES)}")
        return value

    @model_validator(mode="after")
    def _check_source(self) -> SourceSpec:
        if sum(x is not None for x in (self.path, self.examples, self.generate)) != 1:
            raise ValueError(f"source '{self.name}' needs exactly one of path (a file, glob or hf:...), "
                             "examples (inline rows) and generate (rows a teacher writes)")
        if self.generate is not None and self.format != "self_instruct":
            raise ValueError(f"source '{self.name}': generate writes Self-Instruct rows; set format: self_instruct")
        if not self.is_hub and (self.split is not None or self.subset is not None):
            raise ValueError("split and subset apply to hub datasets (path: hf:org/name@revision) only")
        unknown = sorted(set(self.fields) - set(FORMAT_FIELDS[self.format]))
        if unknown:
            raise ValueError(f"fields {unknown} are not read by format {self.format}; "
                             f"allowed: {', '.join(FORMAT_FIELDS[self.format])}")
        return self

    @cached_property
    def hub(self) -> HubRef | None:
        """The hub dataset a `path: hf:org/name@revision` names, parsed; None for files and inline rows."""
        return parse_hub(self.path) if self.path is not None and is_hub(self.path) else None

    @property
    def is_hub(self) -> bool:
        return self.hub is not None


class FiltersSpec(Strict):
    """Quality filters; each rejects with its own name as the reason. Characters count the
    contents of user and assistant messages (system excluded); tokens count the rendered example."""
    min_chars: int | None = Field(default=None, ge=0)        # per example
    max_chars: int | None = Field(default=None, gt=0)        # per example
    min_turn_chars: int | None = Field(default=None, ge=0)   # each user/assistant message
    max_turn_chars: int | None = Field(default=None, gt=0)   # each user/assistant message
    min_response_chars: int | None = Field(default=None, ge=0)  # each assistant message
    max_turns: int | None = Field(default=None, gt=0)        # user + assistant messages
    min_tokens: int | None = Field(default=None, gt=0)       # rendered example (max: train.max_length)
    deny_patterns: tuple[str, ...] = ()                         # regexes; a match in any message rejects

    @field_validator("deny_patterns")
    @classmethod
    def _check_patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"deny pattern {pattern!r} is not a valid regex ({exc})") from None
        return value


class DecontaminateSpec(Strict):
    """Drop training examples sharing an n-gram of words with an eval example or a benchmark file."""
    ngram: int = Field(default=13, ge=3)
    against_eval: bool = True
    files: tuple[str, ...] = ()  # .jsonl/.json (every string value), .txt (one prompt per line)


class MixtureSpec(Strict):
    size: int | None = Field(default=None, gt=0)
    seed: int = 0
    dedup: Literal["none", "exact", "near"] = "exact"
    near_threshold: float = Field(default=0.8, gt=0, le=1)  # Jaccard similarity of word 5-grams
    eval_fraction: float = Field(default=0.05, ge=0, lt=1)
    eval_size: int | None = Field(default=None, ge=0)   # instead of eval_fraction: this many
    max_reject_rate: float = Field(default=0.05, ge=0, le=1)  # per source, malformed rows only
    # Training order: a seeded shuffle, or simple to complex (assistant turns, then trained tokens).
    order: Literal["shuffle", "curriculum"] = "shuffle"


class LoraSpec(Strict):
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


class TrainSpec(Strict):
    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraSpec = LoraSpec()
    train_on: Literal["all_assistant", "last_assistant", "all"] = "all_assistant"
    max_length: int = Field(default=512, gt=8)
    packing: bool = True
    epochs: int = Field(default=1, gt=0)
    lr: float = Field(default=2e-4, gt=0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    batch_size: int = Field(default=8, gt=0)
    gradient_accumulation: int = Field(default=1, gt=0)
    gradient_checkpointing: bool = False
    neftune_alpha: float | None = Field(default=None, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 (fp16) on CUDA, fp32 on CPU
    eval_steps: int | None = Field(default=None, gt=0)  # eval loss every N steps (and at the end)
    seed: int = 0


class PreferenceSpec(Strict):
    """Preference tuning after SFT (stages `pairs` and `preference`): DPO (Rafailov et al., 2023) on
    prompt/chosen/rejected pairs, a LoRA adapter (train.lora's shape) over the SFT model, whose
    reference is the SFT model itself (the adapter disabled). See docs/training.md."""
    method: Literal["dpo"] = "dpo"
    sources: tuple[SourceSpec, ...] = Field(min_length=1)  # format: preference
    beta: float = Field(default=0.1, gt=0)  # strength of the pull towards the reference model
    lr: float = Field(default=5e-6, gt=0)
    epochs: int = Field(default=1, gt=0)
    batch_size: int = Field(default=8, gt=0)  # pairs per optimizer step
    max_length: int = Field(default=512, gt=8)  # prompt + answer tokens; longer answers are cut
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    eval_fraction: float = Field(default=0.1, ge=0, lt=1)  # held-out pairs, by each pair's own hash
    eval_size: int | None = Field(default=None, ge=0)  # instead of eval_fraction: this many
    eval_steps: int | None = Field(default=None, gt=0)  # held-out terms every N steps (and at 0 and the end)
    seed: int = 0

    @field_validator("sources")
    @classmethod
    def _check_sources(cls, sources: tuple[SourceSpec, ...]) -> tuple[SourceSpec, ...]:
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"preference source names repeat: {names}")
        for source in sources:
            if source.format != "preference":
                raise ValueError(f"preference source '{source.name}' has format {source.format}; "
                                 "preference pairs are read with format: preference (prompt, chosen, rejected)")
            if source.generate is not None or source.epochs is not None:
                raise ValueError(f"preference source '{source.name}': generate and epochs apply to "
                                 "`sources` only; every pair is used once per preference epoch")
        return sources


class GgufSpec(Strict):
    dtype: Literal[GGUF_DTYPES] = "f16"  # type: ignore[valid-type]
    quantize: tuple[str, ...] = ()

    @field_validator("quantize")
    @classmethod
    def _check_quantize(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for quant in value:
            if quant not in QUANT_TYPES:
                raise ValueError(f"unknown quant type '{quant}'; allowed: {', '.join(sorted(QUANT_TYPES))}")
        if len(set(value)) != len(value):
            raise ValueError("quant types repeat")
        return value


class ExportSpec(Strict):
    merge: bool = True
    merge_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the base model's dtype
    gguf: GgufSpec | None = GgufSpec()

    @model_validator(mode="after")
    def _gguf_needs_merge(self) -> ExportSpec:
        if self.gguf is not None and not self.merge:
            raise ValueError("export.gguf converts the merged model; set export.merge: true "
                             "or remove export.gguf")
        return self


class JudgeSpec(ServedModel):
    """A judge GGUF file run in process, or an OpenAI-compatible chat endpoint."""


class EvaluateSpec(Strict):
    # Held-out instruction prompts with verifiable constraints (builder/evaluate/ifeval.py), answered
    # greedily by the base model and every GGUF file.
    prompts: str | None = None
    max_tokens: int = Field(default=64, ge=1, le=4096)  # generation budget per answer
    # Eval-split conversations answered to measure the stop rate and answer lengths.
    stop_examples: int = Field(default=16, ge=0, le=10000)
    # lm-evaluation-harness tasks: registry names, or paths to local task YAML files (.yaml).
    tasks: tuple[str, ...] = ()
    num_fewshot: int | None = Field(default=None, ge=0)
    limit: int | None = Field(default=None, ge=1)  # items per task
    chat_template: bool = False  # render task prompts with the GGUF's own chat template
    # Pairwise judge of each tuned file's answers against the base model's, both orders.
    judge: JudgeSpec | None = None


class Recipe(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    base: BaseSpec
    template: str = "chatml"
    # For templates that write no end-of-turn token: append the tokenizer's EOS after each trained
    # answer and train it (append_eos), or keep the template's text as is (keep: the model never
    # learns to stop). No effect on templates that close turns themselves.
    no_end_of_turn: Literal["append_eos", "keep"] = "append_eos"
    system_prompt: str | None = None
    sources: tuple[SourceSpec, ...] = Field(min_length=1)
    mixture: MixtureSpec = MixtureSpec()
    filters: FiltersSpec = FiltersSpec()
    decontaminate: DecontaminateSpec | None = None
    train: TrainSpec = TrainSpec()
    export: ExportSpec = ExportSpec()
    evaluate: EvaluateSpec | None = None
    preference: PreferenceSpec | None = None  # a second training stage on top of `train`

    @field_validator("template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        if value == "base" or value in BUILTIN_TEMPLATES or value.endswith((".jinja", ".j2")):
            return value
        allowed = ", ".join(sorted(BUILTIN_TEMPLATES))
        raise ValueError(f"unknown template '{value}'; allowed: {allowed}, base, or a path to a .jinja file")

    @model_validator(mode="after")
    def _unique_sources(self) -> Recipe:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names repeat: {names}")
        if self.mixture.size is not None and any(s.epochs is not None for s in self.sources):
            raise ValueError("sources[].epochs sets passes over a source when mixture.size is omitted; "
                             "with mixture.size, weights decide each source's share")
        if self.mixture.eval_size is not None and any(s.eval_fraction is not None for s in self.sources):
            raise ValueError("mixture.eval_size picks the eval split over all sources; drop "
                             "sources[].eval_fraction or use mixture.eval_fraction")
        return self

    def slice(self, *keys: str) -> dict:
        """The JSON-able part of the recipe under `keys` (what a stage reads), annotations dropped."""
        data = self.model_dump(mode="json", exclude=set(ANNOTATION_KEYS))
        for source in data["sources"] + list((data["preference"] or {}).get("sources", ())):
            if source["generate"] is None:  # keys added after sources had keys join them only when set
                del source["generate"]
        return {k: data[k] for k in keys}


def _submodel(annotation: object) -> type[BaseModel] | None:
    """The model inside an annotation: X, Optional[X] or tuple[X, ...]."""
    candidates = (annotation, *getattr(annotation, "__args__", ()))
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model that sits at `loc` (the parent of an unknown key)."""
    for part in loc:
        if isinstance(part, str):
            model = _submodel(model.model_fields[part].annotation) or model
    return sorted(model.model_fields)


def format_errors(doc: YamlDoc, exc: ValidationError, model: type[BaseModel]) -> list[str]:
    """One `file:line: key: what is wrong (allowed ...)` line per pydantic error."""
    problems = []
    errors = exc.errors()
    for err in errors:
        loc = tuple(err["loc"])
        # pydantic also calls a list whose item failed inside a nested section too short: say it once.
        if err["type"] == "too_short" and any(tuple(e["loc"])[:len(loc)] == loc and len(e["loc"]) > len(loc)
                                              for e in errors):
            continue
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(model, loc[:-1]))
            msg = f"unknown key '{key}'; allowed here: {allowed}"
        elif err["type"] == "missing":
            msg = f"missing required key '{key}'"
        else:
            text = err["msg"].removeprefix("Value error, ")
            msg = f"{key}: {text} (got {err['input']!r})"
        problems.append(f"{doc.where(loc)}: {msg}")
    return problems


def _check_files(doc: YamlDoc, recipe: Recipe, root: Path) -> list[str]:
    """Problems with files the recipe names (checked before any slow work starts)."""
    problems = []
    pairs = recipe.preference.sources if recipe.preference is not None else ()
    for where, source in [*((("sources", i), s) for i, s in enumerate(recipe.sources)),
                          *((("preference", "sources", i), s) for i, s in enumerate(pairs))]:
        if source.path is not None and not source.is_hub and not glob.glob(str(root / source.path)):
            problems.append(f"{doc.where((*where, 'path'))}: source '{source.name}': "
                            f"no file matches '{source.path}' (relative to {root})")
    for i, source in enumerate(recipe.sources):
        if source.generate is not None:
            where, generate = ("sources", i, "generate"), source.generate
            if not (root / generate.seed_tasks).is_file():
                problems.append(f"{doc.where((*where, 'seed_tasks'))}: source '{source.name}': seed tasks "
                                f"'{generate.seed_tasks}' not found (relative to {root})")
            if generate.teacher.gguf is not None and not (root / generate.teacher.gguf).is_file():
                problems.append(f"{doc.where((*where, 'teacher', 'gguf'))}: source '{source.name}': teacher "
                                f"'{generate.teacher.gguf}' not found (relative to {root})")
    model, folder = recipe.base.model, recipe.base.ref.folder
    if folder is not None and not (root / folder / "config.json").is_file():
        problems.append(f"{doc.where(('base', 'model'))}: base.model '{model}' is not an HF model "
                        "folder (no config.json); use builtin:NAME, a folder, or hf:org/name@revision")
    for i, path in enumerate(recipe.decontaminate.files if recipe.decontaminate else ()):
        if not (root / path).is_file():
            problems.append(f"{doc.where(('decontaminate', 'files', i))}: benchmark file '{path}' not found")
    if recipe.template.endswith((".jinja", ".j2")) and not (root / recipe.template).is_file():
        problems.append(f"{doc.where(('template',))}: template file '{recipe.template}' not found")
    return problems


Check = Callable[[YamlDoc, Recipe], list[str]]  # more problems (file:line messages) of a valid recipe


def load_recipe(path: Path, root: Path | None = None, checks: tuple[Check, ...] = ()) -> Recipe:
    """Load and validate a recipe, parsing its YAML once; raise RecipeError listing every problem
    with file:line (`checks` add the caller's, e.g. what this machine cannot train)."""
    path = Path(path)
    root = Path(root) if root is not None else Path.cwd()
    doc = load_yaml(path, root)
    if not isinstance(doc.data, dict):
        raise RecipeError([f"{doc.shown}:1: a recipe is a mapping of keys (name, base, sources, ...)"])
    try:
        recipe = Recipe.model_validate(doc.data)
    except ValidationError as exc:
        raise RecipeError(format_errors(doc, exc, Recipe)) from None
    problems = _check_files(doc, recipe, root) + [p for check in checks for p in check(doc, recipe)]
    if recipe.preference is not None and recipe.train.method == "qlora":
        problems.append(f"{doc.where(('train', 'method'))}: train.method: qlora cannot take a preference section: "
                        "preference trains over the SFT model merged in memory, which a 4-bit base cannot hold; "
                        "use lora (or full)")
    if recipe.name != path.stem:
        problems.append(f"{doc.where(('name',))}: name '{recipe.name}' must match the file name "
                        f"'{path.stem}' (it names the build folder and DVC stages)")
    if problems:
        raise RecipeError(problems)
    return recipe
