"""lm-evaluation-harness on GGUF files: an lm-eval `LM` over llama-cpp-python, and the tasks a recipe lists.

    scores = run_tasks(recipe.evaluate, llm, ItemCache(path, model_key), project_root)

`evaluate.tasks` holds registry task names (`hellaswag`, or `hellaswag@REVISION` to read its
dataset at a pinned Hub revision) or paths to local task YAML files (`data/tasks/demo_mc.yaml`);
a local task runs with its folder as lm-eval's include path. The adapter scores what users ship
(the GGUF file, for every quant type), tokenizing as lm-eval's `hf` backend does: BOS where the
model's tokenizer adds one, special tokens parsed in text, an empty context conditioned on BOS
(else EOS). Every request's result is kept in the item cache (builder/llm/items.py) keyed by the
model's key and the request, so adding a task or a quant type computes only the new items, and a
killed eval resumes where it stopped. Scoring and chat prompts are builder/llm/llama.py's.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from pathlib import Path
from unittest import mock

from builder.errors import StageError
from builder.llm.items import ItemCache
from builder.llm.llama import BatchScorer, format_chat, token_text


class LlamaCppLM:
    """lm-eval's model interface over an open llama_cpp.Llama (logits_all=True): the requests, each
    answered from the item cache or computed (scores in batches). A mixin: `make_adapter` puts it
    before lm-eval's TemplateLM, which is imported only when tasks run."""

    def __init__(self, llm, cache: ItemCache):
        super().__init__()
        self.llm, self.cache = llm, cache

    @property
    def eot_token_id(self) -> int:
        return self.llm.token_eos()

    @property
    def prefix_token_id(self) -> int:
        bos = self.llm.token_bos()
        return bos if bos >= 0 else self.llm.token_eos()

    @property
    def max_length(self) -> int:
        return self.llm.n_ctx()

    @property
    def tokenizer_name(self) -> str:
        return "gguf"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = token_text(self.llm, self.prefix_token_id)
        add = add_special_tokens if add_special_tokens is not None else not (bos and string.startswith(bos))
        return self.llm.tokenize(string.encode("utf-8"), add_bos=add, special=True)

    def _scored(self, requests: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """Each (tokens, first) from the item cache, the rest scored in batches (then cached)."""
        keys = [{"tokens": list(tokens), "first": first} for tokens, first in requests]
        found = [self.cache.get("loglikelihood", key) for key in keys]
        todo = {}  # one scoring per distinct request: (tokens, first) -> its result
        for k, f in enumerate(found):
            if f is None:
                todo.setdefault((tuple(keys[k]["tokens"]), keys[k]["first"]), None)
        if todo:
            scorer = BatchScorer(self.llm)
            try:
                scored = dict(zip(todo, scorer.score([(list(tokens), first) for tokens, first in todo])))
            finally:
                scorer.close()
            for (tokens, first), result in scored.items():
                self.cache.put("loglikelihood", {"tokens": list(tokens), "first": first}, list(result))
            found = [f if f is not None else scored[(tuple(key["tokens"]), key["first"])]
                     for f, key in zip(found, keys)]
        return [(float(f[0]), bool(f[1])) for f in found]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        wanted = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            wanted.append((whole, max(1, len(whole) - len(continuation))))
        return self._scored(wanted)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows = []  # (request index, tokens, first)
        for k, (text,) in enumerate(r.args for r in requests):
            for context, predicted in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1, context_len=1)):
                windows.append((k, context + predicted, len(context)))
        totals = [0.0] * len(requests)
        for (k, _, _), (logprob, _) in zip(windows, self._scored([(w[1], w[2]) for w in windows])):
            totals[k] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            request = {"prompt": self.tok_encode(context), "until": until,
                       "max_tokens": int(gen_kwargs.get("max_gen_toks", 256))}
            text = self.cache.get("generate", request)
            if text is None:
                self.llm.reset()
                reply = self.llm.create_completion(request["prompt"], max_tokens=request["max_tokens"],
                                                   temperature=0.0, seed=0, stop=until or None)
                text = reply["choices"][0]["text"]
                self.cache.put("generate", request, text)
            out.append(text)
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        template = self.chat_template()
        if not template:
            raise StageError("evaluate.chat_template is on, but the GGUF carries no tokenizer.chat_template")
        return format_chat(self.llm, template, chat_history, add_generation_prompt)[0]


def make_adapter(llm, cache: ItemCache):
    """An lm-eval TemplateLM over an open llama_cpp.Llama (logits_all=True)."""
    from lm_eval.api.model import TemplateLM

    class GGUFLM(LlamaCppLM, TemplateLM):
        pass

    return GGUFLM(llm, cache)


def local_task(entry: str, root: Path) -> tuple[str, Path] | None:
    """(task name, folder) of a local task YAML path, else None (a registry name)."""
    if not entry.endswith((".yaml", ".yml")):
        return None
    import yaml

    path = root / entry
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise StageError(f"evaluate.tasks: cannot read {entry}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise StageError(f"evaluate.tasks: {entry} is not an lm-eval task file (it needs a `task:` name)")
    return config["task"], path.parent


def registry_task(name: str) -> tuple[str, Path, Path] | None:
    """(name, folder, file) of the registry YAML file that defines task `name`, found by its `task:` line."""
    import importlib.util

    line = re.compile(rf"^task:\s*['\"]?{re.escape(name)}['\"]?\s*$", re.MULTILINE)
    package = importlib.util.find_spec("lm_eval")  # not imported: importing it reads the Hub settings
    for path in sorted(Path(package.submodule_search_locations[0], "tasks").rglob("*.yaml")):
        try:
            if line.search(path.read_text(encoding="utf-8", errors="replace")):
                return name, path.parent, path
        except OSError:
            continue
    return None


def pinned_task(entry: str, folder: Path) -> tuple[str, Path] | None:
    """`name@revision`: a registry task whose dataset is read at that revision. Written as a task
    file in `folder` that includes the registry's YAML and sets dataset_kwargs.revision."""
    import yaml

    name, _, revision = entry.partition("@")
    found = registry_task(name) if revision else None
    if found is None:
        return None

    class Permissive(yaml.SafeLoader):  # registry YAMLs use lm-eval's own tags (!function)
        pass

    Permissive.add_multi_constructor("", lambda loader, suffix, node: None)
    try:
        config = yaml.load(found[2].read_text(encoding="utf-8"), Loader=Permissive) or {}
    except yaml.YAMLError:
        config = {}
    kwargs = config.get("dataset_kwargs") if isinstance(config.get("dataset_kwargs"), dict) else {}
    text = yaml.safe_dump({"include": str(found[2]), "task": name, "dataset_kwargs": {**kwargs, "revision": revision}},
                          sort_keys=True)
    (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return name, folder


def hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def task_files(entries: list[str], root: Path) -> list[Path]:
    """Every file of each local task's folder: its YAML, data and includes (the key digests them)."""
    files = []
    for entry in entries:
        if entry.endswith((".yaml", ".yml")):
            folder = (root / entry).parent
            files += sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return sorted(set(files))


@contextlib.contextmanager
def _in_folder(folder: Path):
    """Relative data_files in a local task resolve against the project root, as written."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _offline():
    """Hugging Face libraries offline for the block (env for later imports, flags for loaded ones)."""

    flags = [(sys.modules.get("huggingface_hub.constants"), "HF_HUB_OFFLINE"),
             (sys.modules.get("datasets.config"), "HF_HUB_OFFLINE"),
             (sys.modules.get("datasets.config"), "HF_DATASETS_OFFLINE")]
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}))
        for module, name in flags:
            if module is not None and hasattr(module, name):
                stack.enter_context(mock.patch.object(module, name, True))
        yield


def run_tasks(spec, llm, cache: ItemCache, root: Path) -> dict:
    """Scores of every task in spec.tasks on the open GGUF: {task: {metric: value}}."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tunefile-tasks-") as pins:
        found = {entry: local_task(entry, root) or pinned_task(entry, Path(pins)) or registry_task(entry)
                 for entry in spec.tasks}
        found = {entry: task[:2] if task else None for entry, task in found.items()}
        local = all(entry.endswith((".yaml", ".yml")) for entry in found)
        # Registry tasks load their data from the Hub. When it cannot be reached, only what is in
        # the local cache: a missing dataset fails in seconds, not after the retries.
        with (contextlib.nullcontext() if local or hub_reachable() else _offline()), _in_folder(root):
            return _evaluate(spec, llm, cache, found)


def _evaluate(spec, llm, cache: ItemCache, found: dict) -> dict:
    import logging
    from unittest import mock

    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    names = [task[0] if task else entry for entry, task in found.items()]
    folders = sorted({str(task[1]) for task in found.values() if task})
    # Indexing all of lm-eval's registry takes seconds (thousands of YAML files): only for names
    # that are not one task file (groups and tags such as mmlu).
    manager = TaskManager(include_path=folders or None, include_defaults=any(t is None for t in found.values()))
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        raise StageError(f"evaluate.tasks: unknown task {', '.join(missing)} (not in lm-eval's registry nor in "
                         "the local task files listed)")
    model = make_adapter(llm, cache)
    # lm-eval's environment report runs pip and git in subprocesses (seconds); the stage key and
    # manifest already record the library versions. No torch seed: nothing here runs torch.
    import datasets
    import lm_eval.api.task

    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the stage prints one line per stage; lm-eval's bars would flood DVC's log
    with mock.patch.object(evaluator, "add_env_info", lambda storage: None), \
            mock.patch.object(evaluator, "get_git_commit_hash", lambda: None), \
            mock.patch.object(lm_eval.api.task, "tqdm", lambda items, **kwargs: items):
        try:
            results = evaluator.simple_evaluate(
                model=model, tasks=names, num_fewshot=spec.num_fewshot, limit=spec.limit, task_manager=manager,
                apply_chat_template=spec.chat_template,
                fewshot_as_multiturn=spec.chat_template and bool(spec.num_fewshot),
                log_samples=False, bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=None,
                fewshot_random_seed=0)
        except (ConnectionError, OSError) as exc:
            raise StageError(f"evaluate.tasks: a task's dataset could not be loaded ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); registry tasks download their data from the Hugging Face Hub. "
                             "Offline, use local task YAML files") from None
        finally:
            if bars:
                datasets.enable_progress_bars()
    scores = {}
    for name in names:
        metrics = results["results"].get(name, {})
        scores[name] = {k.split(",")[0]: round(v, 6) for k, v in sorted(metrics.items())
                        if isinstance(v, float) and not math.isnan(v) and not k.split(",")[0].endswith("_stderr")}
        scores[name]["samples"] = results.get("n-samples", {}).get(name, {}).get("effective")
    return scores
