"""Benchmark: what incremental rebuilds cost, against baselines measured in the same run.

    .venv/bin/python bench/incremental.py [--quick]

1. No-op `dvc repro` for 1 and 3 recipes (and 10 without --quick) vs bare `dvc status` on the same
   dvc.yaml (target <= 1.5x for 1 and 3).
2. File digest throughput: tunefile's xxh3-128 vs hashlib.md5 and `cat` on one 1 GiB file
   (target: <= 0.1x md5's time).
3. Dataset rebuild after editing one of two sources, as a fraction of a cold dataset build
   (target: <= that source's share of rows + 0.05), in process and as `tunefile stage` commands.
Prints numbers and ratios; exits 0. Runs in a temporary folder; needs the project's .venv.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def sh(cwd: Path, *cmd: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def make_project(root: Path, recipes: list[str], size: int) -> Path:
    root.mkdir(parents=True)
    shutil.copytree(REPO / "data", root / "data")
    (root / "recipes").mkdir()
    text = (REPO / "recipes" / "default.yaml").read_text().replace("size: 2000 ", f"size: {size} ")
    for name in recipes:
        (root / "recipes" / f"{name}.yaml").write_text(text.replace("name: default ", f"name: {name} "))
    (root / "params.yaml").write_text(f"recipes: [{', '.join(recipes)}]\ndevice: cpu\ncache_dir: .tunefile\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["tunefile", "dvc"]):
        sh(root, *cmd)
    return root


def bench_noop(work: Path, counts: list[int]) -> None:
    print("\n## no-op `dvc repro` vs `dvc status` (median of 5, alternating)")
    print(f"{'recipes':>8} {'dvc status s':>13} {'dvc repro s':>12} {'ratio':>6}")
    for n in counts:
        root = make_project(work / f"noop{n}", [f"r{i}" for i in range(n)], size=64)
        sh(root, "dvc", "repro")  # build once; recipes share base/dataset/train/merge via the stage store
        pairs = [(sh(root, "dvc", "status"), sh(root, "dvc", "repro")) for _ in range(5)]  # alternating
        status = statistics.median(p[0] for p in pairs)
        repro = statistics.median(p[1] for p in pairs)
        target = "  (target <= 1.5x)" if n <= 3 else ""
        print(f"{n:>8} {status:>13.3f} {repro:>12.3f} {repro / status:>6.2f}x{target}")


def bench_hashing(work: Path, size: int) -> None:
    from builder.hashing import hash_file

    path = work / "big.bin"
    with open(path, "wb") as f:
        block = os.urandom(1 << 24)
        for _ in range(size >> 24):
            f.write(block)
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache

    def md5() -> None:
        digest = hashlib.md5()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)

    timings = {}
    for name, fn in [("cat", lambda: subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)),
                     ("xxh3-128 (tunefile)", lambda: hash_file(path)), ("md5 (hashlib)", md5)]:
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - started)
        timings[name] = min(runs)
    print(f"\n## file digest on {size / 2**30:.2f} GiB (best of 3, page cache warm)")
    for name, seconds in timings.items():
        print(f"{name:>22}: {seconds:.3f} s  {size / seconds / 1e9:6.2f} GB/s")
    ours = timings["xxh3-128 (tunefile)"]
    print(f"xxh3/md5 time: {ours / timings['md5 (hashlib)']:.3f}x (target <= 0.1x); "
          f"xxh3/cat: {ours / timings['cat']:.2f}x")
    path.unlink()


def write_sources(root: Path, alpaca_rows: int, chat_rows: int) -> None:
    """Bigger sources made from the demo data (a row number keeps every row distinct)."""
    alpaca = [json.loads(line) for line in (REPO / "data" / "demo_alpaca.jsonl").read_text().splitlines()]
    chats = json.loads((REPO / "data" / "demo_chats.json").read_text())
    with open(root / "data" / "demo_alpaca.jsonl", "w") as f:
        for i in range(alpaca_rows):
            row = dict(alpaca[i % len(alpaca)])
            row["instruction"] = f"{row['instruction']} (#{i})"
            f.write(json.dumps(row) + "\n")
    rows = []
    for i in range(chat_rows):
        row = json.loads(json.dumps(chats[i % len(chats)]))
        row["conversations"][0]["value"] += f" (#{i})"
        rows.append(row)
    (root / "data" / "demo_chats.json").write_text(json.dumps(rows))


def bench_one_source_edit(work: Path, alpaca_rows: int, chat_rows: int) -> None:
    from builder.engine.plan import plan_stages
    from builder.engine.runner import run_stage
    from builder.recipe.project import load_project

    root = make_project(work / "edit", ["default"], size=4000)
    write_sources(root, alpaca_rows, chat_rows)
    sh(root, "tunefile", "build", "default", "--until", "base")
    sizes = {name: (root / "data" / name).stat().st_size for name in ("demo_alpaca.jsonl", "demo_chats.json")}
    share = sizes["demo_chats.json"] / sum(sizes.values())  # by bytes: multi-turn chats are longer rows

    def dataset_in_process() -> float:
        project = load_project(root)
        recipe = project.load_recipe("default")
        plan = {s.name: s for s in plan_stages(recipe, project)}
        started = time.perf_counter()
        run_stage(project, recipe, plan["dataset"], plan)
        return time.perf_counter() - started

    def clear() -> None:
        shutil.rmtree(root / ".tunefile" / "chunks", ignore_errors=True)
        shutil.rmtree(root / ".tunefile" / "stages", ignore_errors=True)

    def edit_chats(tag: str) -> None:
        path = root / "data" / "demo_chats.json"
        rows = json.loads(path.read_text())
        rows[0]["conversations"][1]["value"] += tag
        path.write_text(json.dumps(rows))

    print(f"\n## dataset rebuild after editing one row of demo_chats ({chat_rows} of "
          f"{alpaca_rows + chat_rows} rows, {share:.3f} of the input bytes)")
    clear()
    dataset_in_process()  # warm imports (transformers, tokenizer) for the in-process numbers
    clear()
    cold = dataset_in_process()
    edit_chats(" (edited)")
    partial = dataset_in_process()
    print(f"in process:   cold {cold:.2f} s, after edit {partial:.2f} s -> {partial / cold:.3f} "
          f"(target <= {share + 0.05:.3f})")
    clear()
    cold_cmd = sh(root, "tunefile", "stage", "dataset", "default")
    edit_chats(" (again)")
    partial_cmd = sh(root, "tunefile", "stage", "dataset", "default")
    print(f"as commands:  cold {cold_cmd:.2f} s, after edit {partial_cmd:.2f} s -> {partial_cmd / cold_cmd:.3f} "
          f"(target <= {share + 0.05:.3f}; includes process start in both)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (for a smoke run)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bench_hashing(work, (1 << 28) if args.quick else (1 << 30))
        bench_one_source_edit(work, *((4000, 1000) if args.quick else (24000, 6000)))
        bench_noop(work, [1, 3] if args.quick else [1, 3, 10])


if __name__ == "__main__":
    main()
