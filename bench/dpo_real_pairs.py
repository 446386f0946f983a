"""Benchmark: preference tuning end to end under `dvc repro`, on pairs built from real data.

    .venv/bin/python bench/dpo_real_pairs.py [--pairs demo|seed] [--keep DIR]

`--pairs seed` (the default when ../shared/data is there) builds 88 pairs from the 175 human-written
Self-Instruct seed tasks: the prompt is a task's instruction (and input), chosen its own answer,
rejected the answer of a task from the other half (off-task). `--pairs demo` uses data/demo_pairs.jsonl. In a
temporary git + DVC repo holding recipes/default-dpo.yaml (its preference sources pointed at those
pairs), it runs `tunefile dvc` and `dvc repro`, prints the held-out preference accuracy of the SFT
model and of the model after DPO (build/<recipe>/eval/metrics.json), then edits preference.beta and
prints which DVC stages `dvc repro` reran. Exits 1 if accuracy did not rise or the rerun list is not
exactly preference and what follows it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
RECIPE = "default-dpo"


def seed_task_pairs(path: Path, seed: int = 0) -> list[dict]:
    """Pairs from the seed tasks: a task's own answer chosen, the answer of a task from a disjoint
    pool rejected (off-task). Disjoint, so no answer is chosen in one pair and rejected in another
    (DPO would raise it in one and lower it in the other)."""
    tasks = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(tasks)
    prompts, distractors = tasks[:len(tasks) // 2 + 1], tasks[len(tasks) // 2 + 1:]
    rows = []
    for i, task in enumerate(prompts):
        instance = task["instances"][0]
        prompt = task["instruction"] + (f"\n\n{instance['input']}" if instance["input"].strip() else "")
        other = distractors[i % len(distractors)]["instances"][0]["output"]
        if other.strip() != instance["output"].strip():
            rows.append({"prompt": prompt, "chosen": instance["output"], "rejected": other})
    return rows


def sh(cwd: Path, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", choices=("demo", "seed"), default="seed" if SHARED.is_dir() else "demo")
    parser.add_argument("--keep", type=Path, help="build in this folder and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="dpo-bench-")) / "repo"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shutil.copytree(REPO / "data", root / "data")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    (root / "recipes").mkdir()
    recipe = (REPO / "recipes" / f"{RECIPE}.yaml").read_text()
    if args.pairs == "seed":
        rows = seed_task_pairs(SHARED / "alpaca_seed_tasks.jsonl")
        (root / "data" / "seed_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        recipe = recipe.replace("{name: demo_pairs, path: data/demo_pairs.jsonl",
                                "{name: seed_pairs, path: data/seed_pairs.jsonl")
        recipe = recipe.replace("eval_size: 16 ", "eval_size: 24 ")
    (root / "recipes" / f"{RECIPE}.yaml").write_text(recipe)
    (root / "params.yaml").write_text(f"recipes: [{RECIPE}]\ndevice: cpu\ncache_dir: .tunefile\n")
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    sh(root, "tunefile", "dvc")
    started = time.time()
    first = ran(sh(root, "dvc", "repro"))
    print(f"pairs: {args.pairs}; dvc repro ran {len(first)} stages in {time.time() - started:.0f}s: {', '.join(first)}")
    build = root / "build" / RECIPE
    preference = json.loads((build / "preference" / "metrics.json").read_text())
    print(f"first-step loss {preference['first_loss']:.6f} (ln 2 = 0.693147); last step {preference['train_loss']:.6f}")
    held = json.loads((build / "eval" / "metrics.json").read_text())["f16"]["preference"]
    print(f"held-out preference accuracy ({held['pairs']} pairs): SFT {held['accuracy_sft']:.4f} -> DPO "
          f"{held['accuracy']:.4f}; log-prob margin {held['logp_margin_sft']:.3f} -> {held['logp_margin']:.3f}")
    path = root / "recipes" / f"{RECIPE}.yaml"
    path.write_text(path.read_text().replace("beta: 0.02 ", "beta: 0.04 "))
    started = time.time()
    second = ran(sh(root, "dvc", "repro"))
    print(f"after preference.beta 0.02 -> 0.04, dvc repro reran ({time.time() - started:.0f}s): {', '.join(second)}")
    expected = ["resolve"] + [f"{RECIPE}-{k}" for k in ("preference", "merge", "gguf", "quantize", "eval")]
    ok = held["accuracy"] > held["accuracy_sft"] and second == expected
    print("OK" if ok else f"FAILED (expected the rerun list {expected} and a higher accuracy)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
