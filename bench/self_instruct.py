"""Benchmark: the generate@<source> stage's own cost, against an instant teacher on 127.0.0.1.

    .venv/bin/python bench/self_instruct.py [--count 2000] [--concurrency 8]

A canned OpenAI-compatible server answers at once (tasks drawn from bench/rouge_filter.py's
candidates: natural word statistics, a third near-copies; and some the filters must drop), so what
is timed is tunefile: prompts, parsing, the filters with the ROUGE-L index, the request cache and
the HTTP round trips. Measured in one run: a cold build (every request sent), a rebuild from the
request cache (stage store emptied: no request sent), and doubling `count` (only the new rounds'
requests sent). Seeds: the 175 Alpaca seed tasks from ../shared/data when present, else the repo's
demo seed tasks."""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
SHARED_SEEDS = REPO.parent / "shared" / "data" / "alpaca_seed_tasks.jsonl"
BAD = ["Draw a map of the town.", "Plot the data.", "Go.", "- a list", "Écrivez une phrase.", "Watch this video."]


def reply_for(prompt: str, rng: random.Random, pool: list[str], lock: threading.Lock) -> str:
    """Tasks for an instruction prompt (natural word statistics and near-copies, from
    bench/rouge_filter.py, and some the filters must drop), Yes/No for a classification question,
    instances otherwise."""
    with lock:
        if prompt.rstrip().endswith("Is it classification?"):
            return rng.choice(["Yes", "No", "No"])
        if not prompt.rstrip().endswith(":"):  # an instance prompt
            words = rng.choice(pool).split()
            if "is a classification task" in prompt.split("\n\n")[0]:
                return f"Class label: A\nInput: {' '.join(words)}\nClass label: B\nInput: {' '.join(words[::-1])}"
            return f"Input: {' '.join(words[:4])}\nOutput: {' '.join(words)} {rng.choice(pool)}"
        tasks = [rng.choice(BAD) if rng.random() < 0.1 else rng.choice(pool) for _ in range(6)]
        return " " + tasks[0] + "".join(f"\nTask {10 + k}: {t}" for k, t in enumerate(tasks[1:]))


class InstantTeacher:
    """The tests' canned OpenAI-compatible server (tests/conftest.py), answering at once."""

    def __init__(self, size: int, seed: int = 0):
        from conftest import CannedChat  # tests/ is on the path (see the top of this file)
        from rouge_filter import candidates, seeds  # bench/ is on the path when a bench runs

        rng, lock = random.Random(seed), threading.Lock()
        pool = candidates(seeds(), size, seed)
        self.canned = CannedChat(lambda prompt: reply_for(prompt, rng, pool, lock))
        self.url = self.canned.url

    @property
    def sent(self) -> int:
        return len(self.canned.requests)

    def close(self) -> None:
        self.canned.close()


def make_project(root: Path, url: str, count: int, concurrency: int) -> None:
    (root / "data").mkdir(parents=True)
    seeds = SHARED_SEEDS if SHARED_SEEDS.is_file() else REPO / "data" / "demo_seed_tasks.jsonl"
    shutil.copy(seeds, root / "data" / "seed_tasks.jsonl")
    (root / "recipes").mkdir()
    (root / "params.yaml").write_text(f"recipes: [gen]\ndevice: cpu\nendpoints: {{concurrency: {concurrency}}}\n")
    write_recipe(root, url, count)


def write_recipe(root: Path, url: str, count: int) -> None:
    (root / "recipes" / "gen.yaml").write_text(f"""name: gen
base: {{model: "builtin:tiny-llama"}}
sources:
  - name: synth
    format: self_instruct
    generate:
      seed_tasks: data/seed_tasks.jsonl
      count: {count}
      teacher: {{openai: {{base_url: "{url}", model: instant}}}}
      seed: 1
""")


def timed_build(root: Path, teacher: InstantTeacher) -> tuple[float, int, dict]:
    from builder.engine.build import run_dvc_stage
    from builder.recipe.project import load_project

    before, started = teacher.sent, time.perf_counter()
    run_dvc_stage(load_project(root), "gen", "generate", say=lambda line: None)
    seconds = time.perf_counter() - started
    stats = json.loads((root / "build" / "gen" / "generate" / "synth" / "stats.json").read_text())
    return seconds, teacher.sent - before, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    teacher = InstantTeacher(size=20 * args.count)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "p"
        make_project(root, teacher.url, args.count, args.concurrency)
        cold, sent, stats = timed_build(root, teacher)
        rows.append(("cold build", args.count, cold, sent, stats))
        first = (root / "build" / "gen" / "generate" / "synth" / "generated.jsonl").read_bytes()
        shutil.rmtree(root / "build")
        shutil.rmtree(root / ".tunefile" / "stages")
        cached, sent_again, again = timed_build(root, teacher)
        same = (root / "build" / "gen" / "generate" / "synth" / "generated.jsonl").read_bytes() == first
        rows.append(("rebuild from the request cache", args.count, cached, sent_again, again))
        write_recipe(root, teacher.url, 2 * args.count)
        doubled, sent_more, more = timed_build(root, teacher)
        rows.append(("count doubled", 2 * args.count, doubled, sent_more, more))
    teacher.close()
    print(f"seed tasks: {stats['seed_tasks']}; concurrency {args.concurrency}; an instant teacher on 127.0.0.1\n")
    print("| run | count | seconds | requests sent | requests used | candidates | rouge_l rejects | ms per kept task |")
    print("|---|---|---|---|---|---|---|---|")
    for name, count, seconds, sent, s in rows:
        print(f"| {name} | {count} | {seconds:.2f} | {sent} | {s['requests']['total']} | {s['candidates']} | "
              f"{s['rejects'].get('rouge_l', 0)} | {1000 * seconds / s['kept']:.2f} |")
    print("\n| ratio | value |\n|---|---|")
    print(f"| rebuild from cache / cold build, seconds | {cached / cold:.3f} |")
    print(f"| rebuild from cache: same generated.jsonl bytes | {'yes' if same else 'NO'} |")
    print(f"| count doubled: requests sent / requests used | {sent_more / more['requests']['total']:.3f} |")
    resent = sent_more - (more["requests"]["total"] - stats["requests"]["total"])
    print(f"| count doubled: old requests re-sent | {resent} |")


if __name__ == "__main__":
    main()
