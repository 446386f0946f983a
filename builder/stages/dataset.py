"""dataset stage: sources -> conversations -> filters -> chat template -> tokens + labels -> dedup
-> eval split -> decontamination -> mixture -> order.

Writes train.parquet, eval.parquet (see builder/data/examples.py for the columns), rejects.jsonl (one
line per dropped row: source, file, row, reason, detail), stats.json (per source counts, as DVC
metrics) and mixture.png (the mixture's composition and length histogram).

Each source is read, filtered, rendered and tokenized in chunks of rows (builder/data/shards.py), in
parallel, each chunk cached under a key of exactly what it depends on. Editing one row
re-tokenizes its chunk; appending rows, only the new chunks; a new weight, size or seed re-mixes
cached chunks without loading the tokenizer. Mixing works on light per-row columns (digest,
token counts); the chosen rows are gathered chunk by chunk and written in batches, so memory
stays flat however large the sources are.
"""
from __future__ import annotations

import random
import resource
import sys
import time
from collections import Counter

from builder.data.dedup import Deduplicator, decontaminate
from builder.data.examples import write_rows
from builder.data.mixture import allocate_counts, cap_pools, order_rows, pick_eval, sample_examples
from builder.data.report import length_histogram, source_stats, write_mixture_png
from builder.data.shards import ChunkBuilder, SourceRows, check_reject_rate, shard_settings
from builder.data.sources import Reject
from builder.errors import DataError
from builder.files import write_json, write_jsonl
from builder.recipe.schema import Recipe
from builder.stages import StageContext
from builder.templates import TemplateError, read_template, special_tokens
from builder.templates.checks import check_template


def check_recipe_template(recipe: Recipe, template: str, tokens: dict) -> None:
    """A template that cannot train (no end-of-turn marker, drops a role, not prefix-stable, marks
    nothing) fails before any source is read; one without an end-of-turn token needs an EOS to
    append (no_end_of_turn: append_eos), or gets a warning (keep: the model will not learn to stop)."""
    try:
        report = check_template(template, train_on=recipe.train.train_on,
                                with_system=recipe.system_prompt is not None, **tokens)
    except TemplateError as exc:
        raise DataError(f"template '{recipe.template}' cannot be trained on ({exc.reason}): {exc}") from exc
    if report.end_of_turn:
        return
    if recipe.no_end_of_turn == "append_eos" and not tokens.get("eos_token"):
        raise DataError(f"template '{recipe.template}' writes no end-of-turn token and the base tokenizer has "
                        "no eos_token to append after each answer; use a template that closes turns, or set "
                        "no_end_of_turn: keep (the model will not learn to stop)")
    if recipe.no_end_of_turn == "keep":
        print(f"warning: template '{recipe.template}' writes no end-of-turn token and no_end_of_turn is keep: "
              "the model will not learn to stop and will run on into the next turn; remove no_end_of_turn to "
              "append and train EOS", file=sys.stderr)


def load_sources(ctx: StageContext, template: str) -> dict[str, SourceRows]:
    """Every source's usable examples, chunk by chunk from the store or built by the worker pool."""
    sources = {}
    with ChunkBuilder(ctx.project.params.dataset_workers) as builder:
        for spec in ctx.project.readable_sources(ctx.recipe):
            settings = shard_settings(ctx.recipe, spec, template, ctx.input_dir("base"), ctx.project.cache_dir,
                                      ctx.plan["base"].key, ctx.stage.inputs["libraries"])
            chunks = builder.load(settings, ctx.project.root)
            sources[spec.name] = SourceRows.of(spec.name, chunks, ctx.project.cache_dir)
            check_reject_rate(spec, sources[spec.name], ctx.recipe.mixture.max_reject_rate)
    return sources


def deduplicate(recipe: Recipe, sources: dict[str, SourceRows]) -> tuple[dict[str, list[int]], dict[str, list[Reject]]]:
    """Usable rows per source after dedup across sources in recipe order, and every source's rejects."""
    mixture = recipe.mixture
    dedup = Deduplicator(mixture.dedup, mixture.near_threshold, mixture.seed,
                         describe=lambda where: sources[where[0]].describe(where[1]))
    kept, rejects = {}, {}
    for name, rows in sources.items():
        rejects[name] = list(rows.rejects)
        if mixture.dedup == "near":
            messages, kept[name] = rows.messages(), []
            for i, digest in enumerate(rows.digests):
                drop = dedup.check(digest, next(messages), (name, i))
                if drop is None:
                    kept[name].append(i)
                else:
                    rejects[name].append(Reject(name, *rows.file_row(i), *drop))
        else:
            kept[name], drops = dedup.check_exact(name, rows.digests)
            rejects[name] += [Reject(name, *rows.file_row(i), *drop) for i, drop in drops]
        if not kept[name]:
            first = "; ".join(f"row {r.row}: {r.reason} ({r.detail})" for r in rejects[name][:3])
            raise DataError(f"source '{name}' has no usable example: {first}")
    return kept, rejects


def draw_mixture(recipe: Recipe, pools: dict[str, list[int]]) -> dict[str, list[int]]:
    """Rows sampled per source: counts by weight (or natural size), one seeded RNG per source, so
    editing one source does not reshuffle another's sample."""
    mixture = recipe.mixture
    counts = (allocate_counts([s.weight for s in recipe.sources], mixture.size) if mixture.size is not None
              else [round(len(pools[s.name]) * (s.epochs or 1)) for s in recipe.sources])
    picked = {}
    for spec, count in zip(recipe.sources, counts):
        if count and not pools[spec.name]:
            raise DataError(f"source '{spec.name}' has no training example left after the eval split and "
                            f"decontamination, but the mixture asks for {count}")
        picked[spec.name] = sample_examples(pools[spec.name], count, random.Random(f"{mixture.seed}:{spec.name}"))
    return picked


def split_eval(recipe: Recipe, root, sources: dict[str, SourceRows], kept: dict[str, list[int]],
               rejects: dict[str, list[Reject]]) -> tuple[dict[str, set[int]], dict[str, list[int]]]:
    """Eval rows per source (by each example's own hash), and the training pools left after
    decontamination against them (and the benchmark files) and the per-source caps."""
    eval_rows = pick_eval(recipe, {name: rows.digests for name, rows in sources.items()}, kept)
    pools = {name: [i for i in kept[name] if i not in eval_rows[name]] for name in kept}
    if recipe.decontaminate is not None:
        for name, hits in decontaminate(recipe, root, sources, eval_rows, pools).items():
            dropped = {i for i, _ in hits}
            pools[name] = [i for i in pools[name] if i not in dropped]
            rejects[name] += [Reject(name, *sources[name].file_row(i), "decontaminated",
                                     f"shares the {recipe.decontaminate.ngram}-gram {ngram!r}") for i, ngram in hits]
    return eval_rows, cap_pools(recipe, pools)


def summarize(recipe: Recipe, sources: dict[str, SourceRows], kept: dict, rejects: dict, eval_rows: dict,
              pools: dict, picked: dict, train: list, held_out: list) -> dict:
    """stats.json: per source counts, totals, the length histogram and the length along the order."""
    stats = {name: source_stats(sources[name], kept[name], rejects[name], eval_rows[name], pools[name],
                                picked[name]) for name in sources}
    return {"sources": stats, "order": [s.name for s in recipe.sources], "train_examples": len(train),
            "eval_examples": len(held_out), "rejected": sum(len(r) for r in rejects.values()),
            "mixture_order": recipe.mixture.order,
            "train_tokens": sum(s["tokens"] for s in stats.values()),
            "trained_tokens": sum(s["trained_tokens"] for s in stats.values()),
            "length_histogram": length_histogram({n: sources[n].tokens[picked[n]] for n in sources}),
            "length_by_position": [round(t, 1) for t in _length_by_position(recipe.mixture, train, sources)]}


def write_rejects(path, rejects: dict[str, list[Reject]]) -> None:
    every = sorted((r for source in rejects.values() for r in source),
                   key=lambda r: (r.source, r.file, r.row, r.reason))
    write_jsonl(path, (r.to_dict() for r in every))


def run(ctx: StageContext) -> dict:
    recipe, root, base_dir = ctx.recipe, ctx.project.root, ctx.input_dir("base")
    template = read_template(recipe.template, root, base_dir)
    check_recipe_template(recipe, template, {"bos_token": None, "eos_token": None, **special_tokens(base_dir)})
    laps = [("start", time.perf_counter(), _peak_rss_mib())]
    sources = load_sources(ctx, template)
    laps.append(("read_and_tokenize", time.perf_counter(), _peak_rss_mib()))
    kept, rejects = deduplicate(recipe, sources)
    eval_rows, pools = split_eval(recipe, root, sources, kept, rejects)
    picked = draw_mixture(recipe, pools)
    train = order_rows(recipe.mixture, picked, sources)
    held_out = [(name, i) for name in eval_rows for i in sorted(eval_rows[name])]
    summary = summarize(recipe, sources, kept, rejects, eval_rows, pools, picked, train, held_out)
    laps.append(("mix", time.perf_counter(), _peak_rss_mib()))
    write_json(ctx.out_dir / "stats.json", summary)
    write_rows(ctx.out_dir / "train.parquet", train, sources)
    write_rows(ctx.out_dir / "eval.parquet", held_out, sources)
    write_rejects(ctx.out_dir / "rejects.jsonl", rejects)
    laps.append(("write", time.perf_counter(), _peak_rss_mib()))
    write_mixture_png(summary, ctx.out_dir / "mixture.png")
    laps.append(("report", time.perf_counter(), _peak_rss_mib()))
    chunks = {name: Counter("cached" if c.cached else "built" for c in rows.chunks) for name, rows in sources.items()}
    return {"train_examples": len(train), "eval_examples": len(held_out), "rejected": summary["rejected"],
            "shards": {name: "built" if c["built"] else "cached" for name, c in chunks.items()},
            "chunks": {name: dict(sorted(c.items())) for name, c in chunks.items()},
            "seconds": {name: round(t - laps[k][1], 3) for k, (name, t, _) in enumerate(laps[1:])},
            "peak_rss_mib": {name: rss for name, _, rss in laps}}


def _peak_rss_mib() -> int:
    """This process's peak resident memory so far (the workers' is their own)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


POSITION_BINS = 20


def _length_by_position(mixture, train: list[tuple[str, int]], sources: dict[str, SourceRows]) -> list[float]:
    """Mean tokens per example in POSITION_BINS equal slices of the order training reads: one seeded
    shuffle of the split for mixture.order: shuffle (the trainer shuffles every epoch: flat), the
    split's own order for curriculum (rising)."""
    import numpy as np

    if not train:
        return []
    tokens = np.asarray([sources[name].tokens[i] for name, i in train], dtype=np.float64)
    if mixture.order == "shuffle":
        tokens = tokens[np.random.default_rng(mixture.seed).permutation(len(tokens))]
    return [float(np.mean(part)) for part in np.array_split(tokens, min(POSITION_BINS, len(tokens)))]
