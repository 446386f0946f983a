"""End to end: a temporary git+DVC repo runs `dvc repro` of a (smaller) default recipe, twice.

Checks the outputs (token/label alignment, GGUF metadata, real Q8_0/Q4_K tensors, llama.cpp
loads and answers), that the second repro is a no-op, that `tunefile build` elsewhere gives the
same bytes, and that editing train.lr does not rebuild the dataset.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, make_project, small_recipe

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
STAGES = ["base", "dataset", "train", "merge", "gguf", "quantize@q8_0", "eval@q8_0", "quantize@q4_k_m", "eval@q4_k_m"]
DETERMINISTIC_FILES = ["dataset/train.parquet", "dataset/eval.parquet", "dataset/rejects.jsonl",
                       "base/model.safetensors", "train/adapter_model.safetensors", "train/adapter_config.json",
                       "merge/model.safetensors", "gguf/model-f16.gguf", "quantize@q8_0/model-q8_0.gguf",
                       "quantize@q4_k_m/model-q4_k_m.gguf"]


def sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("e2e") / "repo", small_recipe())
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    sh(root, "tunefile", "dvc")
    output = sh(root, "dvc", "repro")
    assert ran(output) == ["resolve"] + [f"default-{s.replace('@', '-')}" for s in STAGES]
    return root


def test_outputs_are_complete(repo):
    build = repo / "build" / "default"
    for stage in STAGES:
        manifest = json.loads((build / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage and len(manifest["key"]) == 32
    assert not list(build.glob(".*tmp*"))  # no temp folders left behind


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
    for path in [build / "gguf" / "model-f16.gguf", build / "quantize@q8_0" / "model-q8_0.gguf",
                 build / "quantize@q4_k_m" / "model-q4_k_m.gguf"]:
        reader = GGUFReader(path)
        assert reader.fields["tokenizer.chat_template"].contents() == chatml
        assert reader.fields["tunefile.recipe"].contents() == "default"
        manifest = json.loads((build / "dataset" / "manifest.json").read_text())
        assert reader.fields["tunefile.dataset_key"].contents() == manifest["key"]
        types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2)
        assert types.most_common(1)[0][0] == expected[path.name], (path.name, types)


def test_llama_cpp_loads_and_answers(repo):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(repo / "build/default/quantize@q4_k_m/model-q4_k_m.gguf"),
                          n_ctx=256, verbose=False)
    try:
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": "Name a colour."}],
                                           max_tokens=8, temperature=0.0)
    finally:
        llm.close()
    assert reply["usage"]["completion_tokens"] > 0
    for quant in ("q8_0", "q4_k_m"):
        metrics = json.loads((repo / "build/default" / f"eval@{quant}" / "metrics.json").read_text())
        assert metrics["template_roundtrip"] == {"template_equal": True, "tokens_equal": True}
        assert metrics["generated_tokens"] > 0 and metrics["perplexity"] > 1


def test_second_repro_is_a_no_op(repo):
    stamps = {p: p.stat().st_mtime_ns for p in (repo / "build" / "default").glob("*/manifest.json")}
    output = sh(repo, "dvc", "repro")
    assert ran(output) == ["resolve"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "changed" not in sh(repo, "dvc", "status", "default-eval-q4_k_m")


def test_rebuild_elsewhere_gives_the_same_bytes(repo, tmp_path):
    other = make_project(tmp_path / "other", small_recipe())
    sh(other, "tunefile", "build", "default")
    for rel in DETERMINISTIC_FILES:
        a = (repo / "build" / "default" / rel).read_bytes()
        b = (other / "build" / "default" / rel).read_bytes()
        assert a == b, f"{rel} differs between two builds from scratch"


def test_editing_lr_does_not_rebuild_the_dataset(repo):
    recipe = repo / "recipes" / "default.yaml"
    recipe.write_text(recipe.read_text().replace("lr: 2.0e-4", "lr: 1.0e-4"))
    output = sh(repo, "dvc", "repro")
    assert ran(output) == ["resolve", "default-train", "default-merge", "default-gguf", "default-quantize-q8_0",
                           "default-eval-q8_0", "default-quantize-q4_k_m", "default-eval-q4_k_m"]
    plan = sh(repo, "tunefile", "plan", "default")
    assert all(line.endswith("up to date") for line in plan.strip().splitlines()), plan
