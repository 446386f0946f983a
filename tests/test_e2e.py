"""End to end: a temporary git+DVC repo runs `dvc repro` of a (smaller) default recipe.

Checks the outputs (token/label alignment, GGUF metadata, real Q8_0/Q4_K tensors, llama.cpp
loads and answers), that a second repro is a no-op, that `tunefile build` elsewhere gives the
same bytes, and then, edit by edit, that exactly the stale stages rerun: train.lr, reverting it,
a new quant type (no `tunefile dvc`: dvc.yaml does not change) and removing it again, one
source's row, a weight. The results travel through a DVC remote to a fresh clone, builds killed
with SIGKILL during train and gguf rerun to the same bytes, `dvc exp run -S` sets recipe keys
(a quant list too), and `launch: {num_processes: 2}` in params.yaml trains under accelerate launch.
The tests in this file run in order and share the repo.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import REPO, make_project, run_in, small_recipe, stages_run

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
STAGES = ["base", "dataset", "train", "merge", "gguf", "eval@base", "eval@f16", "quantize@q8_0", "eval@q8_0",
          "quantize@q4_k_m", "eval@q4_k_m"]
# the DVC stages of a recipe
KINDS = ["generate", "base", "dataset", "pairs", "train", "preference", "merge", "gguf", "quantize", "eval"]
DETERMINISTIC_FILES = ["dataset/train.parquet", "dataset/eval.parquet", "dataset/rejects.jsonl",
                       "base/model.safetensors", "train/adapter_model.safetensors", "train/adapter_config.json",
                       "merge/model.safetensors", "gguf/model-f16.gguf", "quantize/q8_0/model-q8_0.gguf",
                       "quantize/q4_k_m/model-q4_k_m.gguf"]


sh, ran = run_in, stages_run  # a command in the project (venv first on PATH); the DVC stages it ran


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("e2e") / "repo", small_recipe())
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    sh(root, "tunefile", "dvc")
    output = sh(root, "dvc", "repro")
    assert ran(output) == ["resolve"] + [f"default-{k}" for k in KINDS]
    return root


def stage_dir(root: Path, stage: str) -> Path:
    kind, _, param = stage.partition("@")
    return root / "build" / "default" / kind / param if param else root / "build" / "default" / stage


def test_outputs_are_complete(repo):
    build = repo / "build" / "default"
    for stage in STAGES:
        manifest = json.loads((stage_dir(repo, stage) / "manifest.json").read_text())
        assert manifest["stage"] == stage and len(manifest["key"]) == 32
    assert not list(build.rglob(".*tmp*"))  # no temp folders left behind
    metrics = json.loads((build / "eval" / "metrics.json").read_text())  # every type's, for `dvc metrics`
    assert sorted(metrics) == ["base", "f16", "q4_k_m", "q8_0"] and all(m["perplexity"] > 1 for m in metrics.values())
    # Did tuning help? The base model, converted and measured the same way, on the same tokens.
    assert all(metrics[t]["vs_base"]["perplexity_ratio"] < 1 for t in ("f16", "q8_0", "q4_k_m")), metrics


def test_dvc_plots_and_metrics_load_with_no_setup(repo):
    """A recipe without preference tuning: dvc.yaml declares the preference plots and metrics for
    every recipe, and their placeholder files (CSV headers, `{}`) load without a warning."""
    for command in (["dvc", "plots", "show"], ["dvc", "metrics", "show"]):
        output = sh(repo, *command)
        assert "WARNING" not in output and "failed to load" not in output, output
    assert (repo / "build/default/preference/steps.csv").read_text().startswith("step,epoch,loss,")


def test_dataset_tokens_and_labels_line_up(repo):
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(repo / "build" / "default" / "base")
    table = pq.read_table(repo / "build" / "default" / "dataset" / "train.parquet").to_pylist()
    assert len(table) == 240
    assert Counter(r["source"] for r in table) == {"demo_alpaca": 180, "demo_chats": 60}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row in table:
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels) <= 512
        assert all(label in (-100, token) for token, label in zip(ids, labels))
        assert ids == tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        # Every assistant answer is trained up to and including its <|im_end|>; nothing else is.
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        trained = [t for t, label in zip(ids, labels) if label != -100]
        assert trained.count(im_end) == len(answers)
        assert tokenizer.decode(trained) == "".join(a + "<|im_end|>" for a in answers)


def test_gguf_files_carry_template_lineage_and_real_quant_types(repo):
    from gguf import GGUFReader

    build = repo / "build" / "default"
    chatml = (REPO / "builder" / "templates" / "chatml.jinja").read_text()
    expected = {"model-f16.gguf": "F16", "model-q8_0.gguf": "Q8_0", "model-q4_k_m.gguf": "Q4_K"}
    for path in [build / "gguf" / "model-f16.gguf", build / "quantize" / "q8_0" / "model-q8_0.gguf",
                 build / "quantize" / "q4_k_m" / "model-q4_k_m.gguf"]:
        reader = GGUFReader(path)
        assert reader.fields["tokenizer.chat_template"].contents() == chatml
        assert reader.fields["tunefile.recipe"].contents() == "default"
        manifest = json.loads((build / "dataset" / "manifest.json").read_text())
        assert reader.fields["tunefile.dataset_key"].contents() == manifest["key"]
        types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2)
        assert types.most_common(1)[0][0] == expected[path.name], (path.name, types)


def test_llama_cpp_loads_and_answers(repo):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(repo / "build/default/quantize/q4_k_m/model-q4_k_m.gguf"),
                          n_ctx=256, verbose=False)
    try:
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": "Name a colour."}],
                                           max_tokens=8, temperature=0.0)
    finally:
        llm.close()
    assert 1 <= reply["usage"]["completion_tokens"] <= 8  # it answers, within max_tokens
    perplexity = {}
    for quant in ("f16", "q8_0", "q4_k_m"):
        metrics = json.loads((repo / "build/default/eval" / quant / "metrics.json").read_text())
        assert metrics["template_roundtrip"] == {"template_equal": True, "tokens_equal": True}
        assert all(metrics["template_checks"].values()), metrics["template_checks"]
        assert metrics["generated_tokens"] > 0 and metrics["perplexity"] > 1
        perplexity[quant] = metrics["perplexity"]
    # The quantization matrix: fewer bits never help beyond noise (0.5% for q8_0, 3% for q4_k_m).
    assert perplexity["q8_0"] >= perplexity["f16"] * 0.995 and perplexity["q4_k_m"] >= perplexity["f16"] * 0.97
    report = sh(repo, "tunefile", "report", "default").splitlines()
    files = ["base", "model-f16.gguf", "model-q8_0.gguf", "model-q4_k_m.gguf"]
    assert [line.split()[0] for line in report[3:]] == files
    assert all(line.endswith("ok") for line in report[4:])  # the base GGUF carries no training template
    assert all(float(line.split()[3].rstrip("x")) < 1 for line in report[4:])  # perplexity vs base


def test_eval_measures_checks_and_tasks_tuned_vs_base(repo):
    """evaluate: the instruction checks, the stop rate and the local lm-eval task on the base model
    and every GGUF file; `dvc metrics show` lists them side by side."""
    metrics = json.loads((repo / "build/default/eval/metrics.json").read_text())
    for quant, m in metrics.items():
        checks = m["checks"]
        answers_file = repo / "build/default/eval" / quant / "answers.jsonl"
        answers = [json.loads(a) for a in answers_file.read_text().splitlines()]
        prompts = [a for a in answers if a["kind"] == "prompt"]
        held = [a for a in answers if a["kind"] == "eval_split"]
        assert len(prompts) == 12 and all(a["checks"][-1]["check"] == "stops" for a in prompts)
        # Every rate is recomputed from the answers the stage wrote, one verdict per prompt and check.
        assert checks["prompts"] == 12
        assert checks["prompt_strict"] == round(sum(all(c["strict"] for c in a["checks"]) for a in prompts) / 12, 4)
        assert checks["prompt_loose"] == round(sum(all(c["loose"] for c in a["checks"]) for a in prompts) / 12, 4)
        assert set(checks["per_check"]) >= {"json", "bullets", "words", "sentences", "include", "stops"}
        assert checks["per_check"]["stops"]["n"] == 12
        assert checks["per_check"]["stops"]["strict"] == round(sum(a["stopped"] for a in prompts) / 12, 4)
        assert checks["stop_prompts"] == len(held) > 0
        # stopped: ended at <|im_end|>; a stop at EOS (or another token) is counted apart, never as a stop.
        assert all(a["stopped"] == (a["stopped_at"] == "end_of_turn") for a in answers)
        assert all((a["stopped_on"] == "<|im_end|>") == a["stopped"] for a in answers)
        assert checks["stop_rate"] == round(sum(a["stopped"] for a in held) / len(held), 4)
        assert checks["eos_stop_rate"] == round(sum(a["stopped_at"] == "eos" for a in held) / len(held), 4)
        assert checks["stopped_at"] == {at: sum(a["stopped_at"] == at for a in held)
                                        for at in ("end_of_turn", "eos", "other", "max_tokens")}
        assert checks["answer_tokens_max"] == max(a["tokens"] for a in prompts) <= 32
        task = m["tasks"]["tunefile_demo_mc"]
        assert task["samples"] == 40 and abs(task["acc"] * 40 - round(task["acc"] * 40)) < 1e-6  # k of 40 questions
        if quant != "base":
            versus, base = m["vs_base"], metrics["base"]
            assert versus["stop_rate_base"] == base["checks"]["stop_rate"]
            assert versus["stop_rate_delta"] == round(checks["stop_rate"] - base["checks"]["stop_rate"], 6)
            assert versus["eos_stop_rate_delta"] == round(checks["eos_stop_rate"] - base["checks"]["eos_stop_rate"], 6)
            assert versus["tasks"]["tunefile_demo_mc"]["acc_delta"] == round(
                task["acc"] - base["tasks"]["tunefile_demo_mc"]["acc"], 6)
        assert len(answers) - len(prompts) == checks["stop_prompts"]
    shown = sh(repo, "dvc", "metrics", "show")
    assert "base.checks.stop_rate" in shown and "f16.checks.stop_rate" in shown
    assert "f16.tasks.tunefile_demo_mc.acc" in shown


def test_lm_eval_adapter_matches_the_hf_backend(repo, monkeypatch):
    """The same local task through lm-eval's own `hf` backend on the merged model: the adapter over
    llama.cpp on the f16 GGUF gives the same accuracy within 0.05 (2 of 40 items; float paths differ)."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(repo)  # the task's data_files are relative to the project root
    results = evaluator.simple_evaluate(
        model="hf", model_args=f"pretrained={repo / 'build/default/merge'},dtype=float32", device="cpu",
        tasks=["tunefile_demo_mc"], task_manager=TaskManager(include_path=[str(repo / "data/tasks")],
                                                             include_defaults=False),
        batch_size=8, bootstrap_iters=0, log_samples=False)["results"]["tunefile_demo_mc"]
    ours = json.loads((repo / "build/default/eval/f16/metrics.json").read_text())["tasks"]["tunefile_demo_mc"]
    assert abs(results["acc,none"] - ours["acc"]) <= 0.05 and abs(results["acc_norm,none"] - ours["acc_norm"]) <= 0.05


def test_lm_eval_adapter_rolling_generation_and_item_cache(repo, tmp_path):
    """loglikelihood_rolling of a short text equals its loglikelihood after the prefix token;
    generate_until stops at `until`; a second pass is answered from the item cache alone."""
    import llama_cpp
    from lm_eval.api.instance import Instance

    from builder.evaluate.lmeval import make_adapter
    from builder.llm.items import ItemCache

    llm = llama_cpp.Llama(model_path=str(repo / "build/default/gguf/model-f16.gguf"), n_ctx=256, logits_all=True,
                          seed=0, verbose=False)
    text = "Rain is water that falls from clouds."
    def request(kind: str, args: tuple) -> Instance:
        return Instance(kind, {}, args, 0)

    try:
        for attempt in range(2):
            cache = ItemCache(tmp_path / "items.sqlite", "model-key")
            lm = make_adapter(llm, cache)
            rolling = lm.loglikelihood_rolling([request("loglikelihood_rolling", (text,))])[0]
            (logprob, _), = lm.loglikelihood([request("loglikelihood", ("", text))])
            until = {"until": ["."], "max_gen_toks": 16}
            generated = lm.generate_until([request("generate_until", ("Rain is", until))])[0]
            counts = (cache.hits, cache.misses)
            cache.close()
            assert rolling < 0 and abs(rolling - logprob) < 1e-6
            assert "." not in generated
            assert counts == ((1, 2) if attempt == 0 else (3, 0)), counts  # the two scorings share one item
    finally:
        llm.close()


def test_batched_answers_are_the_answers_one_at_a_time(repo):
    """Several sequences per llama.cpp decode give the f16 file's answers as create_chat_completion
    one at a time does (a near-tie may round differently in a batch: at most one of 12 may differ)."""
    import llama_cpp

    from builder.llm.llama import BatchGenerator, format_chat, token_text

    llm = llama_cpp.Llama(model_path=str(repo / "build/default/gguf/model-f16.gguf"), n_ctx=512, seed=0, verbose=False)
    prompts = [json.loads(line)["prompt"] for line in (repo / "data/demo_prompts.jsonl").read_text().splitlines()]
    try:
        one = []
        for prompt in prompts:
            llm.reset()
            out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=32,
                                             temperature=0.0, seed=0)
            one.append((out["choices"][0]["message"]["content"] or "", out["choices"][0]["finish_reason"] == "stop"))
        template = llm.metadata["tokenizer.chat_template"]
        generator = BatchGenerator(llm)
        batched = generator.generate([format_chat(llm, template, [{"role": "user", "content": p}], True)[1]
                                      for p in prompts], [[token_text(llm, llm.token_eos())]] * len(prompts), 32)
        generator.close()
    finally:
        llm.close()
    assert sum((b["text"], b["stopped"]) == a for a, b in zip(one, batched)) >= len(prompts) - 1


def test_second_repro_is_a_no_op(repo):
    stamps = {p: p.stat().st_mtime_ns for p in (repo / "build" / "default").rglob("manifest.json")}
    placeholders = {repo / "build" / "default" / kind / "manifest.json" for kind in ("generate", "pairs", "preference")}
    assert len(stamps) == len(STAGES) + len(placeholders) and placeholders <= set(stamps)  # kinds it does not build
    output = sh(repo, "dvc", "repro")
    assert ran(output) == []  # not even resolve: its deps (recipes, params.yaml, sources) are unchanged
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "up to date" in sh(repo, "dvc", "status")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same recipe built from scratch elsewhere with `tunefile build` (no DVC)."""
    other = make_project(tmp_path_factory.mktemp("e2e") / "other", small_recipe())
    sh(other, "tunefile", "build", "default")
    return other


def test_rebuild_elsewhere_gives_the_same_bytes(repo, reference):
    for rel in DETERMINISTIC_FILES:
        a = (repo / "build" / "default" / rel).read_bytes()
        b = (reference / "build" / "default" / rel).read_bytes()
        assert a == b, f"{rel} differs between two builds from scratch"


def test_dataset_from_cached_shards_is_identical(reference, tmp_path):
    build = reference / "build" / "default"
    names = ("train.parquet", "eval.parquet", "rejects.jsonl")
    before = {name: (build / "dataset" / name).read_bytes() for name in names}
    backup = tmp_path / "stages"
    os.replace(reference / ".tunefile" / "stages", backup)  # force a real dataset build
    try:
        (build / "dataset" / "manifest.json").unlink()
        output = sh(reference, "tunefile", "build", "default", "--until", "dataset")
        assert "default/dataset: built" in output
        manifest = json.loads((build / "dataset" / "manifest.json").read_text())
        assert manifest["summary"]["shards"] == {"demo_alpaca": "cached", "demo_chats": "cached"}
        assert {name: (build / "dataset" / name).read_bytes() for name in before} == before
    finally:
        shutil.rmtree(reference / ".tunefile" / "stages")
        os.replace(backup, reference / ".tunefile" / "stages")


def test_a_second_recipe_reuses_equal_stages(reference):
    """Same base and data, another lr: base and dataset come from the stage store, train is built."""
    text = small_recipe().replace("name: default ", "name: twin ").replace("lr: 2.0e-4", "lr: 3.0e-4")
    (reference / "recipes" / "twin.yaml").write_text(text)
    output = sh(reference, "tunefile", "build", "twin", "--until", "train")
    assert "twin/base: restored from the stage store" in output
    assert "twin/dataset: restored from the stage store" in output
    assert "twin/train: built" in output
    for rel in ("dataset/train.parquet", "base/model.safetensors"):
        assert (reference / "build/twin" / rel).read_bytes() == (reference / "build/default" / rel).read_bytes()
    key = json.loads((reference / "build/twin/dataset/manifest.json").read_text())["key"]
    stored = reference / ".tunefile" / "stages" / key[:2] / key / "train.parquet"
    assert (reference / "build/twin/dataset/train.parquet").stat().st_ino == stored.stat().st_ino  # a link, not a copy


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def commit(repo: Path, message: str) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--allow-empty", "-qm", message)


def test_editing_lr_does_not_rebuild_the_dataset(repo):
    commit(repo, "built")  # what the reverts below must come back to, byte for byte
    edit(repo / "recipes" / "default.yaml", "lr: 2.0e-4", "lr: 1.0e-4")
    output = sh(repo, "dvc", "repro")
    # default-preference reads train's folder: it reruns, and finds no preference section (its placeholder stays).
    assert ran(output) == ["resolve", "default-train", "default-preference", "default-merge", "default-gguf",
                           "default-quantize", "default-eval"]
    plan = sh(repo, "tunefile", "plan", "default")
    assert all(line.endswith("up to date") for line in plan.strip().splitlines()), plan


def test_reverting_an_edit_restores_without_training(repo, reference):
    edit(repo / "recipes" / "default.yaml", "lr: 1.0e-4", "lr: 2.0e-4")
    plan = sh(repo, "tunefile", "plan", "default")
    assert "train.lr 0.0001 -> 0.0002" in plan
    output = sh(repo, "dvc", "repro")
    assert "built in" not in output  # DVC's run-cache or the stage store restores every stage
    adapter = "train/adapter_model.safetensors"
    assert (repo / "build/default" / adapter).read_bytes() == (reference / "build/default" / adapter).read_bytes()
    # Restored folders are the built ones, manifests included: DVC's hashes, and dvc.lock, are as committed.
    assert sh(repo, "git", "status", "--porcelain") == ""
    assert (repo / "dvc.lock").read_text() == sh(repo, "git", "show", "HEAD:dvc.lock")
    assert "up to date" in sh(repo, "dvc", "status")


def test_checking_out_an_older_commit_rebuilds_nothing(repo):
    """A newer commit (lr 1e-4) on a branch, then back to the older one: `dvc repro` restores the
    older results without building, and git sees no change."""
    sh(repo, "git", "checkout", "-q", "-b", "newer-lr")
    edit(repo / "recipes" / "default.yaml", "lr: 2.0e-4", "lr: 1.0e-4")
    assert "built in" not in sh(repo, "dvc", "repro")  # built by the test above: restored
    commit(repo, "lr 1e-4")
    sh(repo, "git", "checkout", "-q", "-")
    assert "lr: 2.0e-4" in (repo / "recipes" / "default.yaml").read_text()
    output = sh(repo, "dvc", "repro")
    assert "built in" not in output, output
    assert sh(repo, "git", "status", "--porcelain") == ""
    assert "up to date" in sh(repo, "dvc", "status")


def gguf_files(repo: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (repo / "build/default").rglob("*.gguf")}


def test_adding_a_quant_type_builds_only_it(repo):
    """No `tunefile dvc`: dvc.yaml does not change. Only q5_k_m is quantized and measured; the
    other GGUF files are the same files (inode and mtime)."""
    dvc_yaml = (repo / "dvc.yaml").read_text()
    before = gguf_files(repo)
    edit(repo / "recipes" / "default.yaml", "quantize: [q8_0, q4_k_m]", "quantize: [q8_0, q4_k_m, q5_k_m]")
    output = sh(repo, "dvc", "repro")
    assert ran(output) == ["resolve", "default-quantize", "default-eval"]
    assert [line.split(":")[0] for line in output.splitlines() if ": built in" in line] == [
        "default/quantize@q5_k_m", "default/eval@q5_k_m"]
    after = gguf_files(repo)
    assert {k: v for k, v in after.items() if k != "model-q5_k_m.gguf"} == before and "model-q5_k_m.gguf" in after
    assert (repo / "dvc.yaml").read_text() == dvc_yaml
    assert "q5_k_m" in json.loads((repo / "build/default/eval/metrics.json").read_text())


def test_removing_a_quant_type_rebuilds_nothing(repo):
    before = gguf_files(repo)
    edit(repo / "recipes" / "default.yaml", "quantize: [q8_0, q4_k_m, q5_k_m]", "quantize: [q8_0, q4_k_m]")
    output = sh(repo, "dvc", "repro")
    assert ran(output) == ["resolve", "default-quantize", "default-eval"]
    assert ": built in" not in output and "restored" not in output
    assert "default/quantize@q5_k_m: removed" in output
    del before["model-q5_k_m.gguf"]
    assert gguf_files(repo) == before
    evaluated = json.loads((repo / "build/default/eval/metrics.json").read_text())
    assert sorted(evaluated) == ["base", "f16", "q4_k_m", "q8_0"]
    assert "up to date" in sh(repo, "dvc", "status")


def test_editing_one_source_retokenizes_only_it(repo):
    chats = repo / "data" / "demo_chats.json"
    rows = json.loads(chats.read_text())
    rows[0]["conversations"][1]["value"] += " Hope that helps."
    chats.write_text(json.dumps(rows, indent=1))
    assert "stale: source demo_chats changed (data/demo_chats.json)" in sh(repo, "tunefile", "plan", "default")
    output = sh(repo, "dvc", "repro")
    assert ran(output)[:3] == ["resolve", "default-dataset", "default-train"]
    manifest = json.loads((repo / "build/default/dataset/manifest.json").read_text())
    assert manifest["summary"]["shards"] == {"demo_alpaca": "cached", "demo_chats": "built"}


def test_changing_a_weight_resamples_without_tokenizing(repo):
    edit(repo / "recipes" / "default.yaml", "weight: 3 ", "weight: 2 ")
    output = sh(repo, "dvc", "repro")
    assert ran(output)[:3] == ["resolve", "default-dataset", "default-train"]
    manifest = json.loads((repo / "build/default/dataset/manifest.json").read_text())
    assert manifest["summary"]["shards"] == {"demo_alpaca": "cached", "demo_chats": "cached"}


def test_results_travel_through_a_dvc_remote(repo, tmp_path):
    remote = tmp_path / "remote"
    sh(repo, "dvc", "remote", "add", "-d", "shared", str(remote))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "build")
    sh(repo, "dvc", "push")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    sh(clone, "dvc", "pull")
    status = sh(clone, "dvc", "status")
    assert "Data and pipelines are up to date" in status, status
    assert ran(sh(clone, "dvc", "repro")) == []
    for rel in ["gguf/model-f16.gguf", "quantize/q4_k_m/model-q4_k_m.gguf", "train/adapter_model.safetensors"]:
        assert (clone / "build/default" / rel).read_bytes() == (repo / "build/default" / rel).read_bytes()
    lazy = tmp_path / "lazy"  # `dvc repro --pull` fetches what it would otherwise rebuild
    sh(tmp_path, "git", "clone", "-q", str(repo), str(lazy))
    output = sh(lazy, "dvc", "repro", "--pull")
    assert "built in" not in output and (lazy / "build/default/quantize/q4_k_m/model-q4_k_m.gguf").is_file()


def kill_during(root: Path, stage: str, cmd: list[str]) -> None:
    """Start cmd, SIGKILL its whole process group once `stage` is being written."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while not list((root / "build" / "default").glob(f".{stage}.tmp-*")):
        assert process.poll() is None and time.time() < deadline, f"{stage} never started"
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_killed_builds_rerun_to_the_same_bytes(reference, tmp_path):
    root = make_project(tmp_path / "killed", small_recipe())
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    sh(root, "tunefile", "dvc")
    kill_during(root, "train", ["dvc", "repro"])
    assert not (root / "build/default/train").exists()
    sh(root, "dvc", "repro", "default-merge")
    kill_during(root, "gguf", ["dvc", "repro"])
    assert not (root / "build/default/gguf").exists()
    sh(root, "dvc", "repro")
    assert not list((root / "build" / "default").glob(".*tmp*"))
    for rel in DETERMINISTIC_FILES:
        assert (root / "build/default" / rel).read_bytes() == (reference / "build/default" / rel).read_bytes(), rel


def test_dvc_experiments_set_recipe_keys(repo):
    """Recipes are DVC params files: `dvc exp run -S` edits one and reruns exactly what it made stale."""
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--allow-empty", "-qm",
       "before the experiment")
    output = sh(repo, "dvc", "exp", "run", "-S", "recipes/default.yaml:train.lr=0.0005")
    assert "default-dataset" not in ran(output) and "default-train" in ran(output)
    assert "lr: 0.0005" in (repo / "recipes" / "default.yaml").read_text()
    rows = list(csv.DictReader(io.StringIO(sh(repo, "dvc", "exp", "show", "--csv"))))
    assert {row["train.lr"] for row in rows} >= {"0.0002", "0.0005"} and all(row["eval_loss"] for row in rows)


def test_dvc_experiments_set_a_quant_list(repo):
    before = gguf_files(repo)
    output = sh(repo, "dvc", "exp", "run", "-S", "recipes/default.yaml:export.gguf.quantize=[q8_0,q4_k_m,q3_k_m]")
    assert ran(output) == ["resolve", "default-quantize", "default-eval"]
    assert [line.split(":")[0] for line in output.splitlines() if ": built in" in line] == [
        "default/quantize@q3_k_m", "default/eval@q3_k_m"]
    assert {k: v for k, v in gguf_files(repo).items() if k in before} == before
    import yaml

    recipe = yaml.safe_load((repo / "recipes" / "default.yaml").read_text())
    assert recipe["export"]["gguf"]["quantize"] == ["q8_0", "q4_k_m", "q3_k_m"]


def test_a_recipe_added_to_params_makes_dvc_repro_say_run_tunefile_dvc(repo):
    params = (repo / "params.yaml").read_text()
    (repo / "recipes" / "second.yaml").write_text(
        (repo / "recipes" / "default.yaml").read_text().replace("name: default ", "name: second "))
    (repo / "params.yaml").write_text(params.replace("recipes: [default]", "recipes: [default, second]"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert errors == ["error: params.yaml builds default, second but dvc.yaml builds default; "
                      "run `tunefile dvc` to regenerate dvc.yaml"]
    (repo / "params.yaml").write_text(params)
    (repo / "recipes" / "second.yaml").unlink()


def test_launch_settings_train_under_accelerate_launch_from_dvc_repro(repo):
    """params.yaml `launch: {num_processes: 2}`: `dvc repro` runs the train stage under accelerate
    launch (2 CPU processes, gloo); dvc.yaml is the same file, and the manifest records 2 processes."""
    dvc_yaml = (repo / "dvc.yaml").read_text()
    with open(repo / "params.yaml", "a") as f:
        f.write("launch: {num_processes: 2}\n")
    edit(repo / "recipes" / "default.yaml", "lr: 0.0005", "lr: 0.0003")  # (set by the experiment above)
    output = sh(repo, "dvc", "repro", "default-train")
    assert ran(output) == ["resolve", "default-train"]
    assert "default/train: accelerate launch --multi_gpu --num_processes 2" in output
    summary = json.loads((repo / "build/default/train/manifest.json").read_text())["summary"]
    metrics = json.loads((repo / "build/default/train/metrics.json").read_text())
    # Two processes share each optimizer step's micro-batches (gradient_accumulation 1): half the steps.
    assert summary["processes"] == 2 and summary["steps"] == metrics["steps"] == -(-metrics["micro_batches"] // 2)
    assert (repo / "dvc.yaml").read_text() == dvc_yaml


def test_adding_a_task_computes_only_its_items(repo):
    """A second local task: `dvc repro` reruns the eval stage, and every eval computes only the new
    task's 160 requests (40 questions x 4 choices); the first task and the checks come from the
    item cache. Removing it again restores the earlier metrics from the stage store."""
    sh(repo, "dvc", "repro")  # the test before trained only (dvc repro default-train)
    tasks = repo / "data" / "tasks"
    config = (tasks / "demo_mc.yaml").read_text().replace("task: tunefile_demo_mc", "task: tunefile_demo_mc_q")
    (tasks / "demo_mc_q.yaml").write_text(config.replace('doc_to_text: "Question: {{question}}\\nAnswer:"',
                                                         'doc_to_text: "Q: {{question}}\\nA:"'))
    recipe = repo / "recipes" / "default.yaml"
    original = recipe.read_text()
    # `dvc exp run -S` (above) rewrote the recipe in block style.
    edit(recipe, "  - data/tasks/demo_mc.yaml\n", "  - data/tasks/demo_mc.yaml\n  - data/tasks/demo_mc_q.yaml\n")
    output = sh(repo, "dvc", "repro")
    assert ran(output) == ["resolve", "default-eval"]
    for quant in ("base", "f16", "q8_0", "q4_k_m"):
        summary = json.loads((stage_dir(repo, f"eval@{quant}") / "manifest.json").read_text())["summary"]
        assert summary["item_cache"]["computed"] == 160, (quant, summary["item_cache"])
        assert summary["item_cache"]["hits"] >= 160 + 12
        metrics = json.loads((stage_dir(repo, f"eval@{quant}") / "metrics.json").read_text())
        assert sorted(metrics["tasks"]) == ["tunefile_demo_mc", "tunefile_demo_mc_q"]
    recipe.write_text(original)
    sh(repo, "dvc", "repro")
    assert "tunefile_demo_mc_q" not in (repo / "build/default/eval/metrics.json").read_text()


def test_a_served_judge_compares_tuned_with_base_and_its_url_and_key_stay_out(repo, monkeypatch):
    """evaluate.judge.openai against an OpenAI-compatible server on 127.0.0.1: both orders, a win
    rate with its interval, saved verdicts; the API key comes from the variable params.yaml names
    and is in no file; moving the server (a new base_url) reruns nothing."""
    from helpers import CannedChat

    def prefer_stopping(prompt: str) -> str:  # the shorter answer wins; equal lengths tie
        a = prompt.split("[The Start of Assistant A's Answer]")[1].split("[The End")[0]
        b = prompt.split("[The Start of Assistant B's Answer]")[1].split("[The End")[0]
        return "[[C]]" if len(a) == len(b) else "[[A]]" if len(a) < len(b) else "[[B]]"

    servers = [CannedChat(prefer_stopping), CannedChat(prefer_stopping)]
    secret = "sk-tunefile-test-4b1d"
    monkeypatch.setenv("TUNEFILE_TEST_JUDGE_KEY", secret)
    params = (repo / "params.yaml").read_text()
    try:
        endpoints = "endpoints: {api_key_env: TUNEFILE_TEST_JUDGE_KEY, concurrency: 2}\n"
        (repo / "params.yaml").write_text(params + endpoints)
        recipe = repo / "recipes" / "default.yaml"
        judge = f"  judge: {{openai: {{base_url: '{servers[0].url}', model: canned}}}}\n"
        recipe.write_text(recipe.read_text() + judge)
        output = sh(repo, "dvc", "repro")
        assert ran(output) == ["resolve", "default-eval"]
        metrics = json.loads((repo / "build/default/eval/metrics.json").read_text())
        assert "judge" not in metrics["base"]
        for quant in ("f16", "q8_0", "q4_k_m"):
            judge = metrics[quant]["judge"]
            assert judge["judge"] == "openai:canned" and judge["pairs"] == 12 + metrics[quant]["checks"]["stop_prompts"]
            assert judge["wins"] + judge["ties"] + judge["losses"] == judge["pairs"] and judge["invalid"] == 0
            assert judge["win_rate_ci95"][0] <= judge["win_rate"] <= judge["win_rate_ci95"][1]
            records = (repo / "build/default/eval" / quant / "judge.jsonl").read_text().splitlines()
            assert len(records) == judge["pairs"] and all(len(json.loads(r)["orders"]) == 2 for r in records)
        sent = len(servers[0].requests)
        assert all(r["headers"]["Authorization"] == f"Bearer {secret}" for r in servers[0].requests)
        assert sent <= 2 * 3 * metrics["f16"]["judge"]["pairs"]  # equal pairs are judged once for all files
        for path in [*(repo / "build").rglob("*"), *(repo / ".tunefile").rglob("*.json"), repo / "dvc.lock"]:
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
        assert "judge win vs base" in sh(repo, "tunefile", "report", "default")
        recipe.write_text(recipe.read_text().replace(servers[0].url, servers[1].url))
        assert ran(sh(repo, "dvc", "repro")) == ["resolve"]  # where the judge is served is not in the key
        assert len(servers[1].requests) == 0
    finally:
        (repo / "params.yaml").write_text(params)
        for server in servers:
            server.close()
