"""lm-evaluation-harness on GGUF files: an lm-eval `LM` over llama-cpp-python, and the tasks a recipe lists.

    scores = run_tasks(recipe.evaluate, llm, ItemCache(path, model_key), project_root)

`evaluate.tasks` holds registry task names (`hellaswag`, or `hellaswag@REVISION` to read its
dataset at a pinned Hub revision) or paths to local task YAML files (`data/tasks/demo_mc.yaml`);
a local task runs with its folder as lm-eval's include path. The
adapter scores what users ship (the GGUF file, for every quant type), tokenizing as lm-eval's `hf`
backend does: BOS where the model's tokenizer adds one, special tokens parsed in text, an empty
context conditioned on BOS (else EOS). Every request's result is kept in an item cache keyed by
the model's key and the request, so adding a task or a quant type computes only the new items, and
a killed eval resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path

from builder.errors import StageError
from builder.hashing import hash_value


class ItemCache:
    """Results by (model key, kind, request): one SQLite file, committed after every item; safe to
    share between the threads of a concurrent client."""

    def __init__(self, path: Path, model_key: str):
        import sqlite3
        import threading

        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(path), timeout=60, check_same_thread=False)
        # WAL without a sync per commit: a crash keeps every committed item, at no fsync per item.
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS items (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.model_key, self.hits, self.misses = model_key, 0, 0

    def _key(self, kind: str, request: object) -> str:
        return hash_value({"model": self.model_key, "kind": kind, "request": request})

    def get(self, kind: str, request: object):
        with self.lock:
            row = self.db.execute("SELECT value FROM items WHERE key = ?", (self._key(kind, request),)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
        return json.loads(row[0])

    def put(self, kind: str, request: object, value: object) -> None:
        with self.lock:
            if self.db is None:  # closed: a client thread whose build already failed
                return
            self.db.execute("INSERT OR REPLACE INTO items VALUES (?, ?)",
                            (self._key(kind, request), json.dumps(value, sort_keys=True)))
            self.db.commit()

    def close(self) -> None:
        with self.lock:
            if self.db is not None:
                self.db.close()
                self.db = None


def log_softmax_rows(logits):
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    peak = logits.max(axis=1, keepdims=True)
    return logits - (np.log(np.exp(logits - peak).sum(axis=1, keepdims=True)) + peak)


class BatchScorer:
    """Scores several token sequences per llama_decode: a second context on the same loaded model,
    each sequence its own seq_id in one unified KV cache, logits for every token. Sequences are
    packed into batches of at most `capacity` tokens and MAX_SEQUENCES sequences."""

    MAX_SEQUENCES = 16
    LOGITS_BUDGET = 256 * 2**20  # bytes of float32 logits per batch

    def __init__(self, llm):
        import llama_cpp
        from llama_cpp import _internals

        self.llm, self.vocab = llm, llm.n_vocab()
        budget = min(4096, llm._model.n_ctx_train(), self.LOGITS_BUDGET // (4 * self.vocab))
        self.capacity = max(llm.n_ctx(), budget)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = self.capacity
        params.n_seq_max = self.MAX_SEQUENCES
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = os.cpu_count() or 1
        self.ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self.batch = _internals.LlamaBatch(n_tokens=self.capacity, embd=0, n_seq_max=self.MAX_SEQUENCES, verbose=False)

    def score(self, requests: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(log-probability of tokens[first:] given the tokens before, greedy?) for each (tokens, first)."""
        import numpy as np

        results: list = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda k: -len(requests[k][0]))  # longest first: tight batches
        while order:
            picked, used = [], 0
            while order and len(picked) < self.MAX_SEQUENCES and used + len(requests[order[0]][0]) - 1 <= self.capacity:
                used += len(requests[order[0]][0]) - 1
                picked.append(order.pop(0))
            self.batch.reset()
            for seq, k in enumerate(picked):
                self.batch.add_sequence(requests[k][0][:-1], seq, logits_all=True)
            self.ctx.kv_cache_clear()
            self.ctx.decode(self.batch)
            logits = np.ctypeslib.as_array(self.ctx.get_logits(), shape=(used, self.vocab))
            start = 0
            for k in picked:
                tokens, first = requests[k]
                rows = log_softmax_rows(logits[start + first - 1:start + len(tokens) - 1])
                targets = np.asarray(tokens[first:])
                results[k] = (float(rows[np.arange(len(targets)), targets].sum()), bool((rows.argmax(axis=1) == targets).all()))
                start += len(tokens) - 1
        return results

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()


class BatchGenerator(BatchScorer):
    """Greedy generation of several prompts per llama_decode, on the same kind of second context:
    each prompt its own seq_id, then one token per live sequence per decode. A sequence ends at an
    end-of-generation token (stopped), at one of its stop texts (stopped; the text is cut there)
    or after max_tokens (not stopped): what create_completion does with temperature 0, one
    sequence at a time."""

    def generate(self, prompts: list[list[int]], stops: list[list[str]], max_tokens: int) -> list[dict]:
        results: list = [None] * len(prompts)
        order = list(range(len(prompts)))
        while order:
            group, used = [], 0
            while order and len(group) < self.MAX_SEQUENCES and used + len(prompts[order[0]]) + max_tokens <= self.capacity:
                used += len(prompts[order[0]]) + max_tokens
                group.append(order.pop(0))
            if not group:  # one prompt longer than the context: generate nothing, as llama.cpp would refuse
                k = order.pop(0)
                results[k] = {"text": "", "tokens": 0, "stopped": False}
                continue
            for k, result in zip(group, self._group([prompts[k] for k in group], [stops[k] for k in group], max_tokens)):
                results[k] = result
        return results

    def _group(self, prompts: list[list[int]], stops: list[list[str]], max_tokens: int) -> list[dict]:
        import llama_cpp
        import numpy as np

        vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self.ctx.kv_cache_clear()
        self.batch.reset()
        for seq, prompt in enumerate(prompts):
            self.batch.add_sequence(prompt, seq, logits_all=False)
        self.ctx.decode(self.batch)
        live = list(range(len(prompts)))
        out: list[list[int]] = [[] for _ in prompts]
        done: list[dict | None] = [None] * len(prompts)
        while live:
            logits = np.ctypeslib.as_array(self.ctx.get_logits(), shape=(len(live), self.vocab))
            nexts = []
            for row, seq in enumerate(live):
                token = int(np.argmax(logits[row]))
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    done[seq] = self._result(out[seq], stops[seq], stopped=True)
                    continue
                out[seq].append(token)
                text = self._text(out[seq])
                if any(stop in text for stop in stops[seq]):
                    done[seq] = self._result(out[seq], stops[seq], stopped=True)
                elif len(out[seq]) >= max_tokens:
                    done[seq] = self._result(out[seq], stops[seq], stopped=False)
                else:
                    nexts.append(seq)
            live = nexts
            if live:
                self.batch.reset()
                for i, seq in enumerate(live):
                    b = self.batch.batch
                    b.token[i], b.pos[i] = out[seq][-1], len(prompts[seq]) + len(out[seq]) - 1
                    b.seq_id[i][0], b.n_seq_id[i], b.logits[i] = seq, 1, True
                self.batch.batch.n_tokens = len(live)
                self.ctx.decode(self.batch)
        return done  # type: ignore[return-value]

    def _text(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="ignore")

    def _result(self, tokens: list[int], stops: list[str], stopped: bool) -> dict:
        text = self._text(tokens)
        cuts = [text.index(stop) for stop in stops if stop in text]
        return {"text": text[:min(cuts)] if cuts else text, "tokens": len(tokens), "stopped": stopped}


def make_adapter(llm, cache: ItemCache):
    """An lm-eval TemplateLM over an open llama_cpp.Llama (logits_all=True)."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class GGUFLM(TemplateLM):
        def __init__(self):
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
            bos = _piece(self.llm, self.prefix_token_id)
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
            from builder.stages.evaluate import format_chat

            template = self.chat_template()
            if not template:
                raise StageError("evaluate.chat_template is on, but the GGUF carries no tokenizer.chat_template")
            return format_chat(self.llm, template, chat_history, add_generation_prompt)[0]

    return GGUFLM()


def _piece(llm, token: int) -> str:
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""


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
    import sys
    from unittest import mock

    flags = [(sys.modules.get("huggingface_hub.constants"), "HF_HUB_OFFLINE"),
             (sys.modules.get("datasets.config"), "HF_HUB_OFFLINE"), (sys.modules.get("datasets.config"), "HF_DATASETS_OFFLINE")]
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
                apply_chat_template=spec.chat_template, fewshot_as_multiturn=spec.chat_template and bool(spec.num_fewshot),
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
