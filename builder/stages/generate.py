"""generate@<source> stage: a teacher writes the source's rows by Self-Instruct (builder/generate/selfinstruct.py).

Writes generated.jsonl (Self-Instruct rows: instruction, instances, is_classification; what the
dataset stage reads as the source), rejects.jsonl (every dropped candidate with its reason and
detail) and stats.json (kept, requests, tokens, rejects by reason). Every teacher request is
cached in .tunefile/teacher-requests.sqlite under (teacher identity, prompt, sampling, seed) and
committed as its reply arrives: a killed run resumes without re-sending an answered request, a
rebuild gives the same bytes from a server that samples differently each time, and a larger
count or a new filter sends only what the cache does not hold. This run's sent requests and cache
hits are in the manifest (stats.json is the same bytes however many were cached).
"""
from __future__ import annotations

import sys
from collections import Counter

from builder.files import write_json, write_jsonl
from builder.generate.selfinstruct import read_seed_tasks, self_instruct
from builder.llm.items import ItemCache
from builder.llm.served import map_concurrent, open_served
from builder.recipe.project import project_path
from builder.stages import StageContext

CLASSIFY_SAMPLING = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 16}  # a Yes or No, greedily


class CachedTeacher:
    """`ask(requests)`: each request's reply from the cache, or from the teacher (up to
    `concurrency` at once) and then into the cache; counts the tokens of every reply used."""

    def __init__(self, client, cache, concurrency: int, sampling: dict):
        self.client, self.cache, self.sampling, self.concurrency = client, cache, sampling, concurrency
        self.tokens = Counter()

    def one(self, request) -> dict:
        sampling = CLASSIFY_SAMPLING if request.kind == "classify" else self.sampling
        key = {"prompt": request.prompt, "sampling": sampling, "seed": request.seed}
        reply = self.cache.get("teacher", key)
        if reply is None:
            reply = self.client.chat(request.prompt, **sampling, seed=request.seed).to_dict()
            self.cache.put("teacher", key, reply)
        return reply

    def __call__(self, requests: list) -> list[dict]:
        replies = map_concurrent(self.one, requests, self.concurrency)
        for reply in replies:
            self.tokens.update(prompt=reply["prompt_tokens"], completion=reply["completion_tokens"])
        return replies


def run(ctx: StageContext) -> dict:
    from tqdm import tqdm

    source = next(s for s in ctx.recipe.sources if s.name == ctx.stage.param)
    spec = source.generate
    seeds = read_seed_tasks(ctx.project.root / spec.seed_tasks)
    client, identity, concurrency = open_served(spec.teacher, ctx.project, f"sources[{source.name}].generate.teacher")
    cache = ItemCache(ctx.project.cache_dir / "teacher-requests.sqlite", identity)
    teacher = CachedTeacher(client, cache, concurrency, spec.sampling.model_dump())
    bar = tqdm(total=spec.count, desc=ctx.stage.name, unit="task", disable=not sys.stderr.isatty(), file=sys.stderr)
    try:
        result = self_instruct(spec, seeds, teacher, progress=lambda kept: bar.update(kept - bar.n))
    finally:
        bar.close()
        client.close()
        cache.close()
    reasons = Counter(r["reason"] for r in result.rejects)
    stats = {"teacher": identity, "count": spec.count, "kept": len(result.tasks),
             "count_reached": len(result.tasks) >= spec.count, "seed_tasks": len(seeds),
             "candidates": result.candidates, "surplus": result.surplus, "rounds": result.rounds,
             "rejects": dict(sorted(reasons.items())),
             "classification_tasks": sum(t["is_classification"] for t in result.tasks),
             "classification_unclear": result.unclear,
             "instances": sum(len(t["instances"]) for t in result.tasks),
             "requests": {**result.requests, "total": sum(result.requests.values())},
             "tokens": dict(teacher.tokens), "rouge_l_comparisons": result.comparisons}
    write_jsonl(ctx.out_dir / "generated.jsonl", result.tasks)
    write_jsonl(ctx.out_dir / "rejects.jsonl", result.rejects)
    write_json(ctx.out_dir / "stats.json", stats)
    if not stats["count_reached"]:
        top = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common(4)) or "none"
        folder = project_path(ctx.project.stage_dir(ctx.recipe.name, ctx.stage.name), ctx.project.root)
        print(f"warning: {ctx.recipe.name}/{ctx.stage.name}: kept {len(result.tasks)} of {spec.count} tasks after "
              f"{result.requests['instruction']} instruction requests (generate.max_requests {spec.request_cap}); "
              f"rejects: {top}; see {folder}/rejects.jsonl", file=sys.stderr)
    print(f"{ctx.recipe.name}/{ctx.stage.name}: kept {len(result.tasks)} tasks (count {spec.count}) of "
          f"{result.candidates} candidates; {cache.misses} requests sent to the teacher, {cache.hits} answered "
          "from the request cache")
    return {"kept": len(result.tasks), "count": spec.count, "requests_sent": cache.misses, "cache_hits": cache.hits,
            "tokens": dict(teacher.tokens)}
