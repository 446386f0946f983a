"""pairs stage: the preference sources -> tokenized pairs, split into train and held-out pairs.

Reads each `preference.sources` entry (format: preference), renders prompt+chosen and
prompt+rejected through the recipe's template and the base tokenizer with labels on the answer
only (builder/data/pairs.py), and writes train.parquet and eval.parquet (builder.data.pairs.PAIR_COLUMNS),
rejects.jsonl (source, file, row, reason, detail) and stats.json (counts per source and reason).
"""
from __future__ import annotations

from collections import Counter

from builder.data.pairs import cap_pairs, split_pairs, tokenize_pairs, write_pairs
from builder.data.sources import read_source
from builder.data.tokenizer import load_tokenizer
from builder.errors import DataError
from builder.files import write_json, write_jsonl
from builder.stages import StageContext
from builder.templates import read_template


def run(ctx: StageContext) -> dict:
    spec, recipe = ctx.recipe.preference, ctx.recipe
    base_dir = ctx.input_dir("base")
    template = read_template(recipe.template, ctx.project.root, base_dir)
    tokenizer = load_tokenizer(base_dir, ctx.project.cache_dir)
    conversations, rejects, rows = [], [], Counter()
    for source in spec.sources:
        got, bad, read = read_source(source, ctx.project.root)
        conversations += got
        rejects += bad
        rows[source.name] = read
    pairs, bad = tokenize_pairs(conversations, template, tokenizer, spec.max_length, recipe.system_prompt,
                                recipe.no_end_of_turn)
    rejects += bad
    pairs = cap_pairs(pairs, {s.name: s.max_examples for s in spec.sources})
    train, held = split_pairs(pairs, spec.eval_fraction, spec.eval_size)
    if not train:
        first = "; ".join(f"{r.source} row {r.row}: {r.reason} ({r.detail})" for r in rejects[:3])
        raise DataError(f"preference: no training pair left out of {sum(rows.values())} rows"
                        + (f": {first}" if first else ""))
    write_pairs(ctx.out_dir / "train.parquet", train)
    write_pairs(ctx.out_dir / "eval.parquet", held)
    write_jsonl(ctx.out_dir / "rejects.jsonl", [r.to_dict() for r in rejects])
    stats = {}
    for source in spec.sources:
        name = source.name
        mine = [p for p in train if p.source == name]
        stats[name] = {"rows": rows[name], "train": len(mine), "eval": sum(p.source == name for p in held),
                       "rejected": dict(sorted(Counter(r.reason for r in rejects if r.source == name).items())),
                       "trained_tokens": sum(len(p.chosen_ids) + len(p.rejected_ids) - 2 * p.prompt_tokens
                                             for p in mine)}
    write_json(ctx.out_dir / "stats.json", stats)
    return {"train": len(train), "eval": len(held), "rejected": len(rejects)}
