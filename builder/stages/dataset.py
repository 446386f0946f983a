"""dataset stage: sources -> conversations -> filters -> chat template -> tokens + labels -> dedup
-> eval split -> decontamination -> mixture.

Writes train.parquet, eval.parquet (see builder/examples.py for the columns), rejects.jsonl (one
line per dropped row: source, file, row, reason, detail), stats.json (per source counts, as DVC
metrics) and mixture.png (the mixture's composition and length histogram).

Reading, filtering, rendering and tokenizing happen per source into a shard kept in the store under
a key of exactly what the shard depends on (the source's rows and format, filters, template,
tokenizer, train_on, max_length, system prompt). Editing one source re-tokenizes only that
source; a new weight, size or seed re-samples from cached shards without loading the tokenizer.
"""
from __future__ import annotations

import functools
import json
import random
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from builder.cache import StageStore
from builder.errors import DataError
from builder.examples import (conversation_text, examples_table, token_counts, tokenize_examples,
                              write_split)
from builder.filters import check_conversation, check_tokens
from builder.hashing import hash_text, hash_value
from builder.mixture import allocate_counts, is_eval_example, sample_examples
from builder.recipe import FiltersSpec, Recipe, SourceSpec
from builder.report import write_mixture_png
from builder.sources import Reject, read_source
from builder.stages import StageContext
from builder.templates import TemplateError, read_template, special_tokens
from builder.templates.checks import check_template

SHARD_VERSION = 3  # bump when a shard's content changes for the same inputs
# Deliberate drops: they never count toward a source's reject rate (mixture.max_reject_rate).
# Every filter rejects with its own key name as the reason.
DELIBERATE = {"duplicate", "near_duplicate", "decontaminated", "too_long", *FiltersSpec.model_fields}
DEDUPLICATED = {"duplicate", "near_duplicate"}
CHUNK = 2000  # conversations tokenized per batch (and per progress-bar step)
HISTOGRAM_EDGES = (0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclass(frozen=True)
class Shard:
    table: object  # pyarrow.Table of examples_table's schema
    rejects: list[Reject]
    conversations: int  # conversations read, before any filter or reject of rendering or tokenizing
    rows: int  # rows read (conversations + malformed rows)
    cached: bool


def shard_key(ctx: StageContext, spec: SourceSpec, template: str) -> str:
    """Everything one source's shard depends on, and nothing else (weights and seeds are not)."""
    recipe = ctx.recipe
    return hash_value({
        "version": SHARD_VERSION,
        "source": spec.model_dump(mode="json", exclude={"weight", "max_examples", "epochs", "eval_fraction"}),
        "files": ctx.stage.inputs["files"][spec.name],
        "template": hash_text(template),
        "tokenizer": ctx.plan["base"].key,
        "filters": recipe.filters.model_dump(mode="json"),
        "train_on": recipe.train.train_on,
        "max_length": recipe.train.max_length,
        "system_prompt": recipe.system_prompt,
        **({"no_end_of_turn": recipe.no_end_of_turn} if recipe.no_end_of_turn != "append_eos" else {}),
        "libraries": ctx.stage.inputs["libraries"],
    })


def progress(total: int, what: str):  # noqa: ANN201
    """A progress bar on an interactive terminal; silent in CI, under DVC's log capture and in tests."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="conv", disable=not sys.stderr.isatty() or total < CHUNK)


def build_shard(spec: SourceSpec, recipe: Recipe, root: Path, template: str, tokenizer):  # noqa: ANN001, ANN201
    """Read, filter, render and tokenize one source: (examples table, rejects, conversations, rows)."""
    conversations, rejects, rows = read_source(spec, root)
    kept = []
    for conv in conversations:
        rejection = check_conversation(conv, recipe.filters)
        if rejection is None:
            kept.append(conv)
        else:
            rejects.append(Reject(conv.source, conv.file, conv.row, *rejection))
    examples = []
    with progress(len(kept), f"{spec.name}: render + tokenize") as bar:
        for start in range(0, len(kept), CHUNK):
            part, bad = tokenize_examples(kept[start:start + CHUNK], template, tokenizer(), recipe.train.train_on,
                                          recipe.train.max_length, recipe.system_prompt, recipe.no_end_of_turn)
            examples += part
            rejects += bad
            bar.update(len(kept[start:start + CHUNK]))
    final = []
    for example in examples:
        rejection = check_tokens(len(example.input_ids), recipe.filters)
        if rejection is None:
            final.append(example)
        else:
            conv = example.conversation
            rejects.append(Reject(conv.source, conv.file, conv.row, *rejection))
    return examples_table(final), rejects, len(conversations), rows


def load_shard(ctx: StageContext, spec: SourceSpec, template: str, tokenizer, store: StageStore) -> Shard:
    """The source's examples (an Arrow table) and rejects: from the store if this exact shard was
    built before, else built now and stored."""
    import pyarrow.parquet as pq

    key = shard_key(ctx, spec, template)
    with tempfile.TemporaryDirectory(dir=ctx.out_dir.parent) as tmp:
        folder = Path(tmp)
        if store.get(key, folder):
            meta = json.loads((folder / "meta.json").read_text())
            rejects = [Reject(**json.loads(line)) for line in (folder / "rejects.jsonl").read_text().splitlines()]
            return Shard(pq.read_table(folder / "examples.parquet"), rejects, meta["conversations"], meta["rows"],
                         cached=True)
        table, rejects, conversations, rows = build_shard(spec, ctx.recipe, ctx.project.root, template, tokenizer)
        pq.write_table(table, folder / "examples.parquet", compression="zstd")
        (folder / "rejects.jsonl").write_text("".join(
            json.dumps(r.to_dict(), sort_keys=True, ensure_ascii=False) + "\n" for r in rejects))
        (folder / "meta.json").write_text(json.dumps({"conversations": conversations, "rows": rows}))
        store.put(key, folder)
        return Shard(table, rejects, conversations, rows, cached=False)


def check_reject_rate(spec: SourceSpec, shard: Shard, limit: float) -> int:
    """The number of malformed rows (rejects that are not deliberate drops); raise DataError when
    their share of the rows read passes the recipe's limit, showing the first reasons."""
    malformed = [r for r in shard.rejects if r.reason not in DELIBERATE]
    if shard.rows and len(malformed) / shard.rows > limit:
        first = "; ".join(f"{r.file} row {r.row}: {r.reason} ({r.detail})" for r in malformed[:5])
        raise DataError(f"source '{spec.name}': {len(malformed)} of {shard.rows} rows are malformed "
                        f"({len(malformed) / shard.rows:.1%} > mixture.max_reject_rate {limit:.1%}); "
                        f"first: {first}. Fix the rows, map columns with fields:, or raise the limit")
    return len(malformed)


class Deduplicator:
    """Across sources, in source order: the first occurrence wins (exact: the normalised
    conversation's digest; near: MinHash/LSH over word 5-grams, confirmed by exact Jaccard)."""

    def __init__(self, mode: str, threshold: float, seed: int):
        self.mode, self.seen, self.near = mode, {}, None
        if mode == "near":
            from builder.dedup import NearDuplicateIndex

            self.near = NearDuplicateIndex(threshold=threshold, seed=seed)
        self.count = 0

    def check(self, digest: str, messages: list[dict] | None, where: str) -> tuple[str, str] | None:
        if self.mode == "none":
            return None
        if digest in self.seen:
            return "duplicate", f"same as {self.seen[digest]}"
        self.seen[digest] = where
        if self.near is not None:
            self.count += 1
            twin = self.near.add(self.count, conversation_text(messages))
            if twin is not None:
                return "near_duplicate", f"near-duplicate of an earlier example (#{twin} in source order)"
        return None


def pick_eval(recipe: Recipe, digests: dict[str, list[str]], kept: dict[str, list[int]]) -> dict[str, set[int]]:
    """Eval rows per source, chosen by each example's own hash (stable when other rows change):
    below the source's (or the mixture's) eval_fraction, or the eval_size smallest hashes overall."""
    if recipe.mixture.eval_size is not None:
        ranked = sorted((int(digests[s][i][:16], 16), s, i) for s in kept for i in kept[s])
        chosen: dict[str, set[int]] = {s: set() for s in kept}
        for _, source, i in ranked[:recipe.mixture.eval_size]:
            chosen[source].add(i)
        return chosen
    fractions = {s.name: s.eval_fraction if s.eval_fraction is not None else recipe.mixture.eval_fraction
                 for s in recipe.sources}
    return {s: {i for i in kept[s] if is_eval_example(digests[s][i], fractions[s])} for s in kept}


def decontaminate(recipe: Recipe, root: Path, tables: dict, eval_rows: dict[str, set[int]],
                  pools: dict[str, list[int]]) -> dict[str, list[tuple[int, str]]]:
    """Train rows sharing a word n-gram with an eval example or a benchmark file: {source: [(row, n-gram)]}."""
    from builder.dedup import NgramIndex, read_benchmark_texts

    spec = recipe.decontaminate
    index = NgramIndex(spec.ngram)
    for path in spec.files:
        try:
            texts = read_benchmark_texts(root / path)
        except ValueError as exc:
            raise DataError(f"decontaminate.files: {exc}") from None
        for text in texts:
            index.add(text)
    if spec.against_eval:
        for source, rows in eval_rows.items():
            messages = tables[source].column("messages")
            for i in sorted(rows):
                index.add(conversation_text(messages[i].as_py()))
    hits: dict[str, list[tuple[int, str]]] = {}
    for source, pool in pools.items():
        messages = tables[source].column("messages")
        for i in pool:
            overlap = index.first_overlap(conversation_text(messages[i].as_py()))
            if overlap is not None:
                hits.setdefault(source, []).append((i, overlap))
    return hits


def length_histogram(tables: dict) -> dict:
    """Token lengths of the train examples per source, in fixed bins (the report's histogram)."""
    import numpy as np

    lengths = {s: token_counts(t)[0] for s, t in tables.items()}
    longest = max([max(n, default=0) for n in lengths.values()] + [1])
    edges = [e for e in HISTOGRAM_EDGES if e < longest] + [next((e for e in HISTOGRAM_EDGES if e >= longest), longest)]
    counts = {s: np.histogram(n, bins=edges)[0].astype(int).tolist() for s, n in lengths.items()}
    return {"edges": edges, "counts": counts}


def _take(table, indices: list[int]):  # noqa: ANN001, ANN202
    import pyarrow as pa

    return table.take(pa.array(indices, type=pa.int64()))  # typed: an empty list has no type of its own


def _row_of(table, i: int) -> tuple[str, int]:
    row = table.slice(i, 1).select(["file", "row"]).to_pylist()[0]
    return row["file"], row["row"]


def warn_if_never_stops(recipe: Recipe, report, eos_token: str | None) -> None:  # noqa: ANN001
    """A template without an end-of-turn token trains a model that cannot stop, unless EOS is
    appended (no_end_of_turn: append_eos, the default): fail when there is no EOS to append, warn
    when the recipe keeps the text as is."""
    import sys

    if report.end_of_turn:
        return
    if recipe.no_end_of_turn == "append_eos" and not eos_token:
        raise DataError(f"template '{recipe.template}' writes no end-of-turn token and the base tokenizer has "
                        "no eos_token to append after each answer; use a template that closes turns, or set "
                        "no_end_of_turn: keep (the model will not learn to stop)")
    if recipe.no_end_of_turn == "keep":
        print(f"warning: template '{recipe.template}' writes no end-of-turn token and no_end_of_turn is keep: "
              "the model will not learn to stop and will run on into the next turn; remove no_end_of_turn to "
              "append and train EOS", file=sys.stderr)


def run(ctx: StageContext) -> dict:
    import pyarrow as pa

    recipe = ctx.recipe
    root = ctx.project.root
    base_dir = ctx.input_dir("base")
    template = read_template(recipe.template, root, base_dir)
    # A template that cannot train (no end-of-turn marker, drops a role, not prefix-stable, marks
    # nothing) fails here, before any source is read, rather than as a dataset of rejects.
    tokens = {"bos_token": None, "eos_token": None, **special_tokens(base_dir)}
    try:
        report = check_template(template, train_on=recipe.train.train_on,
                                with_system=recipe.system_prompt is not None, **tokens)
    except TemplateError as exc:
        raise DataError(f"template '{recipe.template}' cannot be trained on ({exc.reason}): {exc}") from exc
    warn_if_never_stops(recipe, report, tokens["eos_token"])

    @functools.cache
    def tokenizer():  # loaded only when a shard must be built (transformers is slow to import)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(base_dir)

    # Rows are handled as indices into each shard's Arrow table; only the rows that make the
    # mixture are ever copied, so re-mixing large cached sources stays cheap.
    store = StageStore(ctx.project.cache_dir, "shards")
    mixture = recipe.mixture
    dedup = Deduplicator(mixture.dedup, mixture.near_threshold, mixture.seed)
    stats: dict[str, dict] = {}
    rejects: dict[str, list[Reject]] = {}
    tables, digests, kept, shards = {}, {}, {}, {}
    for spec in recipe.sources:
        shard = load_shard(ctx, spec, template, tokenizer, store)
        shards[spec.name] = "cached" if shard.cached else "built"
        malformed = check_reject_rate(spec, shard, mixture.max_reject_rate)
        table = tables[spec.name] = shard.table
        digests[spec.name] = table.column("digest").to_pylist()
        messages = table.column("messages").to_pylist() if mixture.dedup == "near" else None
        files, numbers = table.column("file").to_pylist(), table.column("row").to_pylist()
        source_rejects, rows = list(shard.rejects), []
        for i, digest in enumerate(digests[spec.name]):
            where = f"{spec.name} {files[i]} row {numbers[i]}"
            drop = dedup.check(digest, messages[i] if messages else None, where)
            if drop is None:
                rows.append(i)
            else:
                source_rejects.append(Reject(spec.name, files[i], numbers[i], *drop))
        if not rows:
            first = "; ".join(f"row {r.row}: {r.reason} ({r.detail})" for r in source_rejects[:3])
            raise DataError(f"source '{spec.name}' has no usable example: {first}")
        kept[spec.name], rejects[spec.name] = rows, source_rejects
        stats[spec.name] = {"rows": shard.rows, "conversations": shard.conversations, "malformed": malformed,
                            "usable": len(rows)}

    eval_rows = pick_eval(recipe, digests, kept)
    pools = {s: [i for i in kept[s] if i not in eval_rows[s]] for s in kept}
    if recipe.decontaminate is not None:
        for source, hits in decontaminate(recipe, root, tables, eval_rows, pools).items():
            dropped = {i for i, _ in hits}
            pools[source] = [i for i in pools[source] if i not in dropped]
            for i, ngram in hits:
                rejects[source].append(Reject(source, *_row_of(tables[source], i), "decontaminated",
                                              f"shares the {recipe.decontaminate.ngram}-gram {ngram!r}"))
    for spec in recipe.sources:
        if spec.max_examples is not None and len(pools[spec.name]) > spec.max_examples:
            rng = random.Random(f"{mixture.seed}:{spec.name}:max_examples")
            pools[spec.name] = sorted(rng.sample(pools[spec.name], spec.max_examples))

    counts = (allocate_counts([s.weight for s in recipe.sources], mixture.size) if mixture.size is not None
              else [round(len(pools[s.name]) * (s.epochs or 1)) for s in recipe.sources])
    train_parts, eval_parts, sampled = [], [], {}
    for spec, count in zip(recipe.sources, counts):
        if count and not pools[spec.name]:
            raise DataError(f"source '{spec.name}' has no training example left after the eval split and "
                            f"decontamination, but the mixture asks for {count}")
        # One RNG per source: editing one source does not reshuffle another's sample.
        picked = sample_examples(pools[spec.name], count, random.Random(f"{mixture.seed}:{spec.name}"))
        part = sampled[spec.name] = _take(tables[spec.name], picked)
        tokens, trained = token_counts(part)
        reasons = Counter(r.reason for r in rejects[spec.name])
        stats[spec.name].update(
            rejected=dict(sorted(reasons.items())), eval=len(eval_rows[spec.name]),
            deduplicated=sum(n for r, n in reasons.items() if r in DEDUPLICATED),
            filtered=sum(n for r, n in reasons.items() if r in DELIBERATE - DEDUPLICATED),
            train_pool=len(pools[spec.name]), sampled=len(picked), tokens=sum(tokens), trained_tokens=sum(trained),
            mean_tokens=round(sum(tokens) / len(tokens), 1) if tokens else 0.0, max_tokens=max(tokens, default=0))
        train_parts.append(part)
        eval_parts.append(_take(tables[spec.name], sorted(eval_rows[spec.name])))
    train = pa.concat_tables(train_parts)
    order = list(range(len(train)))
    random.Random(mixture.seed).shuffle(order)
    train = _take(train, order)
    eval_table = pa.concat_tables(eval_parts)

    write_split(ctx.out_dir / "train.parquet", train)
    write_split(ctx.out_dir / "eval.parquet", eval_table)
    every = [r for source in rejects.values() for r in source]
    with open(ctx.out_dir / "rejects.jsonl", "w", encoding="utf-8") as f:
        for reject in sorted(every, key=lambda r: (r.source, r.file, r.row, r.reason)):
            f.write(json.dumps(reject.to_dict(), sort_keys=True, ensure_ascii=False) + "\n")
    summary = {"sources": stats, "order": [s.name for s in recipe.sources], "train_examples": len(train),
               "eval_examples": len(eval_table), "rejected": len(every),
               "train_tokens": sum(s["tokens"] for s in stats.values()),
               "trained_tokens": sum(s["trained_tokens"] for s in stats.values()),
               "length_histogram": length_histogram(sampled)}
    (ctx.out_dir / "stats.json").write_text(json.dumps(summary, sort_keys=True, indent=1) + "\n")
    write_mixture_png(summary, ctx.out_dir / "mixture.png")
    return {"train_examples": len(train), "eval_examples": len(eval_table), "rejected": len(every),
            "shards": shards}
