"""Benchmark: the dataset stage at scale, against baselines measured in the same run.

    .venv/bin/python bench/dataset_build.py [--sizes 20000 200000] [--quick]

Data: ../shared/data when present (the 175 Self-Instruct seed tasks as alpaca rows and FastChat's
500 ShareGPT conversations), else the demo data; replicated to each size with a unique suffix on
every row (so dedup keeps them all). Template chatml, the builtin tiny-llama tokenizer, one
alpaca source. Every tunefile number is a whole `tunefile build R --until dataset` process with
the base already built and the chunk cache cold, as a user runs it. Prints:
1. the Hugging Face path: a whole process that imports transformers, loads the tokenizer and calls
   apply_chat_template(..., return_assistant_tokens_mask=True) per row (chatml with generation
   markers), at the smallest size;
2. bare `tokenizers` encode_batch of the same rendered texts (encoding alone, after loading), on
   every core and on one thread: the baselines of tunefile's all-cores and 1-worker per-row work;
3. tunefile with 1 worker and with every core, at each size: seconds, rows/s, peak RSS;
4. appending 1% new rows at the largest size and rebuilding (the chunk cache warm);
and the ratio against each target. Exits 0; runs in a temporary folder; needs the project's .venv.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TOKENIZERS_PARALLELISM": "true"}
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MEASURED = """
import resource, subprocess, sys, time
started = time.perf_counter()
done = subprocess.run(sys.argv[2:], cwd=sys.argv[1], capture_output=True, text=True)
seconds = time.perf_counter() - started
if done.returncode:
    sys.exit(done.stdout[-2000:] + done.stderr[-2000:])
print(seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""
HF_PATH = """
import json, sys, time
started = time.perf_counter()
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
tok.chat_template = sys.argv[3]
rows = [json.loads(line) for line in open(sys.argv[2])]
trained = 0
for row in rows:
    user = row["instruction"] + ("\\n\\n" + row["input"] if row.get("input") else "")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained += sum(out["assistant_masks"])
print(time.perf_counter() - started, trained)
"""


def base_rows() -> list[dict]:
    """Alpaca rows from the shared data (seed-task instances, and each ShareGPT human/gpt pair)."""
    rows = []
    if SHARED.is_dir():
        for line in (SHARED / "alpaca_seed_tasks.jsonl").read_text().splitlines():
            task = json.loads(line)
            rows += [{"instruction": task["instruction"], "input": i["input"], "output": i["output"]}
                     for i in task["instances"]]
        for conv in json.loads((SHARED / "fastchat_dummy_conversation.json").read_text()):
            turns = conv["conversations"]
            rows += [{"instruction": a["value"], "input": "", "output": b["value"]}
                     for a, b in zip(turns[::2], turns[1::2]) if a["from"] == "human" and b["from"] == "gpt"]
        return rows
    for line in (REPO / "data" / "demo_alpaca.jsonl").read_text().splitlines():
        rows.append(json.loads(line))
    return rows


def write_rows(path: Path, rows: list[dict], count: int, start: int = 0) -> None:
    with open(path, "a" if start else "w") as f:
        for k in range(start, start + count):
            row = rows[k % len(rows)]
            f.write(json.dumps({**row, "instruction": f"{row['instruction']} (#{k})"}) + "\n")


def measured(cwd: Path, *cmd: str) -> tuple[float, float]:
    """(seconds, peak RSS in MiB of the command and its children)."""
    done = subprocess.run([sys.executable, "-c", MEASURED, str(cwd), *cmd], env=ENV, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr}")
    seconds, rss = done.stdout.split()
    return float(seconds), int(rss) / 1024


def make_project(root: Path, rows: list[dict], size: int, workers: int | None, model: Path) -> Path:
    (root / "recipes").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    write_rows(root / "data" / "rows.jsonl", rows, size)
    (root / "recipes" / "r.yaml").write_text(
        f"name: r\nbase: {{model: {model}}}\ntemplate: chatml\nmixture: {{seed: 1, eval_fraction: 0.0}}\n"
        "sources:\n  - {name: rows, path: data/rows.jsonl, format: alpaca}\n")
    params = "recipes: [r]\ndevice: cpu\ncache_dir: .tunefile\n" + (f"workers: {workers}\n" if workers else "")
    (root / "params.yaml").write_text(params)
    measured(root, str(BIN / "tunefile"), "build", "r", "--until", "base")
    return root


def build(root: Path, cold: bool = True) -> tuple[float, float, float]:
    """(seconds, peak RSS MiB, seconds of per-row work) of a whole `tunefile build --until dataset`."""
    if cold:
        for folder in ("chunks", "stages"):
            shutil.rmtree(root / ".tunefile" / folder, ignore_errors=True)
    shutil.rmtree(root / "build" / "r" / "dataset", ignore_errors=True)
    seconds, rss = measured(root, str(BIN / "tunefile"), "build", "r", "--until", "dataset")
    manifest = json.loads((root / "build" / "r" / "dataset" / "manifest.json").read_text())
    return seconds, rss, manifest["summary"]["seconds"]["read_and_tokenize"]


BARE = """
import sys, time
import pyarrow.parquet as pq
from tokenizers import Tokenizer
texts = pq.read_table(sys.argv[2], columns=["text"]).column("text").to_pylist()
tokenizer = Tokenizer.from_file(sys.argv[1])
started = time.perf_counter()
tokenizer.encode_batch(texts, add_special_tokens=False)
print(time.perf_counter() - started, len(texts))
"""


def bare_tokenizers(model: Path, root: Path, parallel: bool) -> tuple[float, int]:
    """Seconds for tokenizers' encode_batch over the texts tunefile rendered (every core, or one
    thread with TOKENIZERS_PARALLELISM=false), and their count; encoding alone, in a fresh process."""
    env = {**ENV, "TOKENIZERS_PARALLELISM": "true" if parallel else "false"}
    out = subprocess.run([sys.executable, "-c", BARE, str(model / "tokenizer.json"),
                          str(root / "build" / "r" / "dataset" / "train.parquet")],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1])


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def tiny_model(work: Path) -> Path:
    """builtin:tiny-llama built once (about a minute) and used by every project as a local folder."""
    seed = work / "seed"
    (seed / "recipes").mkdir(parents=True)
    (seed / "data").mkdir()
    (seed / "data" / "x.jsonl").write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    (seed / "recipes" / "r.yaml").write_text("name: r\nbase: {model: builtin:tiny-llama}\n"
                                             "sources:\n  - {name: x, path: data/x.jsonl, format: alpaca}\n")
    (seed / "params.yaml").write_text("recipes: [r]\ndevice: cpu\n")
    measured(seed, str(BIN / "tunefile"), "build", "r", "--until", "base")
    model = work / "tiny-llama"
    shutil.copytree(seed / "build" / "r" / "base", model, ignore=shutil.ignore_patterns("manifest.json"))
    return model


def hf_path(model: Path, rows_file: Path) -> float:
    out = subprocess.run([sys.executable, "-c", HF_PATH, str(model), str(rows_file), CHATML_GENERATION], env=ENV,
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[20000, 200000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement at the small size (median)")
    parser.add_argument("--quick", action="store_true", help="sizes 5000 and 50000, one run each")
    args = parser.parse_args()
    small, large = (5000, 50000) if args.quick else args.sizes
    runs = 1 if args.quick else args.runs
    rows = base_rows()
    cores = os.cpu_count() or 1
    print(f"# dataset stage benchmark: {len(rows)} distinct rows from "
          f"{'../shared/data' if SHARED.is_dir() else 'the demo data'}, replicated; {cores} cores; "
          f"median of {runs} at {small} rows")
    with tempfile.TemporaryDirectory(prefix="tunefile-dataset-bench-") as tmp:
        work = Path(tmp)
        model = tiny_model(work)
        projects = {(size, w): make_project(work / f"p{size}-{w}", rows, size, w, model)
                    for size in (small, large) for w in (1, cores)}
        # The HF path and tunefile alternate, so that a slower spell of the machine hits both.
        hf, results = [], {key: [] for key in projects}
        for _ in range(runs):
            hf.append(hf_path(model, projects[small, 1] / "data" / "rows.jsonl"))
            for w in (1, cores):
                results[small, w].append(build(projects[small, w]))
        for w in (1, cores):
            results[large, w].append(build(projects[large, w]))
        bare_seconds, texts = median([bare_tokenizers(model, projects[small, 1], True) for _ in range(runs)])
        bare_one, _ = median([bare_tokenizers(model, projects[small, 1], False) for _ in range(runs)])
        root = projects[large, cores]  # append 1% to the large source; rebuild with the chunk cache warm
        write_rows(root / "data" / "rows.jsonl", rows, large // 100, start=large)
        append_seconds = build(root, cold=False)[0]

    hf_seconds = median(hf)
    pick = {key: (median([r[0] for r in v]), median([r[1] for r in v]), median([r[2] for r in v]))
            for key, v in results.items()}
    print("\n| run | rows | seconds | rows/s | per-row work s | peak RSS MiB |\n|---|---|---|---|---|---|")
    print(f"| HF apply_chat_template + assistant mask, 1 process | {small} | {hf_seconds:.2f} | "
          f"{small / hf_seconds:.0f} | | |")
    print(f"| bare tokenizers encode_batch (rendered texts), every core | {texts} | {bare_seconds:.2f} | "
          f"{texts / bare_seconds:.0f} | | |")
    print(f"| bare tokenizers encode_batch (rendered texts), one thread | {texts} | {bare_one:.2f} | "
          f"{texts / bare_one:.0f} | | |")
    for (size, workers), (seconds, rss, work_s) in sorted(pick.items()):
        print(f"| tunefile build --until dataset, {workers} worker(s) | {size} | {seconds:.2f} | "
              f"{size / seconds:.0f} | {work_s:.2f} | {rss:.0f} |")
    print(f"| append {large // 100} rows (1%) and rebuild, {cores} workers | {large + large // 100} | "
          f"{append_seconds:.2f} | | | |")
    fast, slow = pick[small, cores], pick[small, 1]
    bare_rate = texts / bare_seconds
    checks = [
        ("tunefile build (all cores) / HF path, whole processes", fast[0] / hf_seconds, "<=", 1 / 3),
        ("per-row work throughput (all cores) / bare tokenizers", (small / fast[2]) / bare_rate, ">=", 0.5),
        ("per-row work throughput (1 worker) / bare tokenizers on one thread", (small / slow[2]) / (texts / bare_one),
         ">=", 0.5),
        (f"time per row at {large} / at {small}", (pick[large, cores][0] / large) / (fast[0] / small), "<=", 1.25),
        (f"peak RSS at {large} / at {small}", pick[large, cores][1] / fast[1], "<=", 1.5),
        ("append-1% rebuild / cold build", append_seconds / pick[large, cores][0], "<=", 0.10),
        ("1 worker / all cores, whole build", slow[0] / fast[0], ">=", 1.0),
    ]
    print("\n| ratio | value | target | met |\n|---|---|---|---|")
    for name, value, op, target in checks:
        met = value <= target if op == "<=" else value >= target
        print(f"| {name} | {value:.3f} | {op} {target:.3g} | {'yes' if met else 'NO'} |")


if __name__ == "__main__":
    main()
