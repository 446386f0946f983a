"""Recipe -> stages with content keys. Pure: reads recipes and file digests, imports no torch.

Each stage's key hashes exactly what its output depends on: the recipe slice it reads, the
digests of the files it reads, the keys of the stages it reads from, a per-stage code version
(bump it when a stage's output changes on purpose) and the versions of the libraries that
shape its output.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

from builder.evaluate.lmeval import task_files
from builder.hashing import StatCache, canonical_json, hash_value
from builder.models import BUILTIN_MODELS, CORPUS, model_files
from builder.recipe.project import Project, project_path
from builder.recipe.schema import Recipe
from builder.stages import KINDS, Stage
from builder.templates import BUILTIN_TEMPLATES
from builder.versions import library_version


def _files_of(pattern: str, root: Path, stat: StatCache) -> dict[str, str]:
    matches = sorted(glob.glob(str(root / pattern)))
    return {project_path(Path(m), root): stat.digest(Path(m)) for m in matches}


def _base_identity(recipe: Recipe, root: Path, stat: StatCache) -> dict:
    ref = recipe.base.ref
    if ref.builtin is not None:
        spec = BUILTIN_MODELS[ref.builtin]
        return {"builtin": {"version": spec.version, "seed": spec.seed, "vocab_size": spec.vocab_size,
                            "config": spec.config, "pretrain": spec.pretrain,
                            "corpus": stat.digest(CORPUS)}}
    if ref.hub is not None:
        return {"hub": {"repo": ref.hub.repo, "revision": ref.hub.revision}}
    return {"files": {p.name: stat.digest(p) for p in model_files(root / ref.folder)}}


def _template_identity(recipe: Recipe, root: Path, stat: StatCache) -> dict:
    # `base` means the base tokenizer's template: the base key already covers it.
    if recipe.template == "base":
        return {"name": "base"}
    path = BUILTIN_TEMPLATES.get(recipe.template) or root / recipe.template
    return {"name": recipe.template, "digest": stat.digest(path)}


def _evaluation_identity(recipe: Recipe, root: Path, stat: StatCache) -> dict:
    """What the eval stages' extra measurements read: the evaluate section, the prompts file,
    every file of each local lm-eval task's folder and, with tasks, lm-eval's version. Nothing for
    a recipe without `evaluate`, so its keys stay as they were."""
    if recipe.evaluate is None:
        return {}
    spec = recipe.evaluate
    files = [root / spec.prompts] if spec.prompts else []
    files += task_files(list(spec.tasks), root)
    if spec.judge is not None and spec.judge.gguf:
        files.append(root / spec.judge.gguf)
    section = recipe.slice("evaluate")["evaluate"]
    if section.get("judge") and section["judge"].get("openai"):  # where it is served changes no verdict
        section["judge"]["openai"].pop("base_url")
    return {"evaluate": section,
            "evaluate_files": {project_path(f, root): stat.digest(f) for f in files if f.is_file()},
            **({"lm_eval": library_version("lm_eval")} if spec.tasks else {})}


def served_identity(served: dict, root: Path, stat: StatCache) -> dict:
    """A teacher's identity in keys: a GGUF file's digest, or the served model's name and
    pinned revision (never the URL it is served from, nor any API key)."""
    if served.get("gguf"):
        return {"gguf": stat.digest(root / served["gguf"])}
    return {"openai": {k: v for k, v in served["openai"].items() if k != "base_url"}}


def _generate_stages(recipe: Recipe, root: Path, stat: StatCache) -> list[Stage]:
    """One generate@<source> per generated source. Its key is what it writes: the generate section
    (the teacher by identity), the seed tasks' digest; not the source's name or weight."""
    stages = []
    for source in recipe.sources:
        if source.generate is None:
            continue
        section = source.generate.model_dump(mode="json")
        section["teacher"] = served_identity(section["teacher"], root, stat)
        stages.append(_stage(recipe, f"generate@{source.name}", [], {"generate": section},
                             {"seed_tasks": stat.digest(root / source.generate.seed_tasks)}))
    return stages


def _preference_stages(recipe: Recipe, root: Path, stat: StatCache, base: Stage, train: Stage, template: dict,
                       eot: dict) -> tuple[Stage, Stage]:
    """`pairs` renders and tokenizes the preference sources (what its key reads: the sources and
    their files, the template and tokenizer, max_length and the held-out split); `preference`
    trains on them over the SFT model. Editing beta or lr reruns preference alone, not pairs."""
    section = recipe.slice("preference")["preference"]
    files = {s.name: _files_of(s.path, root, stat) if s.path and not s.is_hub else {}
             for s in recipe.preference.sources}
    split = ("sources", "max_length", "eval_fraction", "eval_size")
    pairs = _stage(recipe, "pairs", [base], {"preference": {k: section[k] for k in split},
                                             **recipe.slice("template", "system_prompt"), **eot},
                   {"files": files, "template": template})
    training = {k: v for k, v in section.items() if k not in split}
    preference = _stage(recipe, "preference", [base, train, pairs], {"preference": training}, {})
    return pairs, preference


def _stage(recipe: Recipe, name: str, upstream: list[Stage], slice_: dict, extra: dict) -> Stage:
    kind = name.split("@")[0]
    inputs = {
        "stage": kind,
        "code_version": KINDS[kind].code_version,
        "recipe": slice_,
        "upstream": {s.name: s.key for s in upstream},
        "libraries": {lib: library_version(lib) for lib in KINDS[kind].libraries},
        **extra,
    }
    return Stage(recipe=recipe.name, name=name, upstream=tuple(s.name for s in upstream),
                 inputs=inputs, key=hash_value(inputs))


def plan_stages(recipe: Recipe, project: Project, stat: StatCache | None = None) -> list[Stage]:
    """The recipe's stages in build order, each with its key."""
    own_cache = stat is None
    stat = stat or StatCache(project.cache_dir / "stat-cache.json")
    root = project.root
    base = _stage(recipe, "base", [], recipe.slice("base"), {"model": _base_identity(recipe, root, stat)})
    template = _template_identity(recipe, root, stat)  # read by dataset, merge and eval@base
    # Inline rows are in the recipe slice; a hub source is pinned by the revision in its path.
    # A generated source is read from its generate stage's output: that stage's key stands for it.
    sources = {s.name: _files_of(s.path, root, stat) if s.path and not s.is_hub else {} for s in recipe.sources}
    generated = _generate_stages(recipe, root, stat)
    benchmarks = {p: stat.digest(root / p) for p in (recipe.decontaminate.files if recipe.decontaminate else ())}
    # no_end_of_turn joins the key only off its default, so keys built before the key existed stay.
    eot = recipe.slice("no_end_of_turn") if recipe.no_end_of_turn != "append_eos" else {}
    dataset = _stage(recipe, "dataset", [*generated, base],
                     {**recipe.slice("template", "system_prompt", "sources", "mixture", "filters", "decontaminate"),
                      **eot,
                      "train": {k: recipe.train.model_dump(mode="json")[k] for k in ("train_on", "max_length")}},
                     {"files": sources, "template": template,
                      **({"benchmarks": benchmarks} if benchmarks else {})})
    train = _stage(recipe, "train", [base, dataset], recipe.slice("train"), {})
    # Read (and so watched by resolve) whether or not the recipe exports: dvc.yaml stays the same.
    evaluation = _evaluation_identity(recipe, root, stat)
    stages = [*generated, base, dataset, train]
    tuned = train  # the last training stage: what merge folds into the base
    if recipe.preference is not None:
        pairs, preference = _preference_stages(recipe, root, stat, base, train, template, eot)
        stages[-1:-1] = [pairs]
        stages.append(preference)
        tuned = preference
    if recipe.export.merge:
        # Without a preference section merge reads [base, train] exactly as before: its key is unchanged.
        merge = _stage(recipe, "merge", [base, train, *([tuned] if tuned is not train else [])],
                       {**recipe.slice("template"), "merge_dtype": recipe.export.merge_dtype},
                       {"template": template})
        stages.append(merge)
        if recipe.export.gguf is not None:
            # The recipe's name is written into the GGUF (general.name, lineage), so it is an input.
            gguf = _stage(recipe, "gguf", [merge], {"name": recipe.name, "dtype": recipe.export.gguf.dtype}, {})
            # The base model through the same converter and eval code, prompted with the recipe's
            # template: what every tuned file is compared with (did tuning help?).
            stages += [gguf, _stage(recipe, "eval@base", [base, dataset],
                                    {"type": "base", "dtype": recipe.export.gguf.dtype},
                                    {"template": template, **evaluation})]
            # A judge compares each tuned file's answers with the base model's: those evals read eval@base.
            versus = [stages[-1]] if recipe.evaluate is not None and recipe.evaluate.judge is not None else []
            if recipe.export.gguf.dtype not in recipe.export.gguf.quantize:
                # The unquantized GGUF is measured too: the baseline of the quantization matrix.
                stages.append(_stage(recipe, f"eval@{recipe.export.gguf.dtype}", [gguf, dataset, *versus],
                                     {"type": recipe.export.gguf.dtype}, evaluation))
            for quant in recipe.export.gguf.quantize:
                quantize = _stage(recipe, f"quantize@{quant}", [gguf], {"type": quant}, {})
                evaluate = _stage(recipe, f"eval@{quant}", [quantize, dataset, *versus], {"type": quant}, evaluation)
                stages += [quantize, evaluate]
    if own_cache:
        stat.save()
    return stages


def plan_project(project: Project, stat: StatCache | None = None) -> dict[str, list[Stage]]:
    """Every recipe in params.yaml -> its stages (one stat cache for all of them)."""
    own_cache = stat is None
    stat = stat or StatCache(project.cache_dir / "stat-cache.json")
    plans = {name: plan_stages(project.load_recipe(name), project, stat) for name in project.params.recipes}
    if own_cache:
        stat.save()
    return plans


def members(stages: list[Stage], kind: str) -> list[Stage]:
    """The stages one DVC stage runs: those of its kind (none when the recipe turns the kind off)."""
    return [s for s in stages if s.kind == kind]


def spec_text(recipe: str, kind: str, stages: list[Stage]) -> str:
    """The spec file of DVC stage `kind`: its bytes change iff the key of a stage it runs changes
    (or one is added or removed). A single stage's spec also shows its inputs, for people."""
    group = members(stages, kind)
    if len(group) == 1 and not KINDS[kind].grouped:
        stage = group[0]
        value = {"key": stage.key, "recipe": recipe, "stage": stage.name, "inputs": stage.inputs}
    else:
        value = {"recipe": recipe, "stage": kind, "keys": {s.name: s.key for s in group}}
    return json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def _flatten(value: object, prefix: str = "") -> dict[str, object]:
    """Leaf paths of a nested value; lists of named items (sources) are keyed by name."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        value = {v["name"]: v for v in value}
    if isinstance(value, dict) and value:
        out: dict[str, object] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _describe(path: str, before: str, after: str) -> str:
    """One changed input in words: `train.lr 0.0002 -> 0.0001`, `source demo_chats changed (...)`."""
    head, _, rest = path.partition(".")
    if head == "recipe":
        return f"{rest} {before} -> {after}"
    if head == "files":
        source, _, file = rest.partition(".")
        change = "added" if before == "<absent>" else "removed" if after == "<absent>" else "changed"
        return f"source {source} {change} ({file})" if change == "changed" else f"source {source}: {file} {change}"
    if head == "upstream":
        return f"upstream {rest} changed"
    if head == "libraries":
        return f"{rest} {before} -> {after}"
    if head == "code_version":
        return f"stage code version {before} -> {after}"
    if head == "template":
        return "template changed"
    if head == "benchmarks":
        return f"decontamination file {rest} changed"
    if head == "model":
        return f"base model changed ({rest})"
    return f"{path} {before} -> {after}"


def explain_changes(old_inputs: dict, new_inputs: dict) -> list[str]:
    """What differs between two stage inputs, in words; upstream changes only when nothing else did."""
    old, new = _flatten(old_inputs), _flatten(new_inputs)
    lines, upstream = [], []
    for path in sorted(set(old) | set(new)):
        if old.get(path, "<absent>") != new.get(path, "<absent>"):
            before = canonical_json(old[path]) if path in old else "<absent>"
            after = canonical_json(new[path]) if path in new else "<absent>"
            (upstream if path.startswith("upstream.") else lines).append(_describe(path, before, after))
    return sorted(set(lines)) or upstream
