"""dataset stage: sources -> conversations -> chat template -> tokens + labels -> dedup -> mixture.

Writes train.parquet, eval.parquet (messages, text, input_ids, labels with -100 on untrained
tokens, source, file, row), rejects.jsonl (one line per dropped row, with the reason) and
stats.json.

Reading, rendering and tokenizing happen per source into a shard kept in the store under a key
of exactly what the shard depends on (the source's files and format, template, tokenizer,
train_on, max_length, system prompt). Editing one source re-tokenizes only that source; a new
weight, size or seed re-samples from cached shards without loading the tokenizer at all.
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
from builder.hashing import hash_text, hash_value
from builder.mixture import allocate_counts, is_eval_example, sample_examples
from builder.recipe import SourceSpec
from builder.records import Conversation, Message
from builder.sources import Reject, read_source
from builder.stages import StageContext
from builder.templates import TemplateError, read_template, special_tokens
from builder.templates.checks import check_template
from builder.templates.tokens import IGNORE_INDEX, tokenize_chats

SHARD_VERSION = 2  # bump when a shard's content changes for the same inputs


@dataclass(frozen=True)
class Example:
    conversation: Conversation
    digest: str  # of the normalised conversation as the source gave it: the dedup and split key
    text: str
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class Shard:
    table: object  # pyarrow.Table of examples_table's schema
    rejects: list[Reject]
    conversations: int  # conversations read, before any reject of rendering or tokenizing
    cached: bool


def conversation_digest(conversation: Conversation) -> str:
    """Hash of the normalised conversation (roles + stripped contents)."""
    return hash_value([[m.role, m.content.strip()] for m in conversation.messages])


def with_system_prompt(conversation: Conversation, prompt: str | None) -> Conversation:
    if prompt is None or conversation.messages[0].role == "system":
        return conversation
    messages = (Message("system", prompt),) + conversation.messages
    return Conversation(messages, conversation.source, conversation.row, conversation.file)


def tokenize_examples(conversations: list[Conversation], template: str, tokenizer, train_on: str,
                      max_length: int, system_prompt: str | None = None) -> tuple[list[Example], list[Reject]]:
    """Render, tokenize and label (ids and labels built together by tokenize_chats); return the
    examples and the rejects, each with the template's countable reason."""
    finals = [with_system_prompt(conv, system_prompt) for conv in conversations]
    results = tokenize_chats(template, [final.to_dicts() for final in finals], tokenizer, train_on=train_on)
    examples, rejects = [], []
    for conv, final, result in zip(conversations, finals, results):
        if isinstance(result, TemplateError):
            rejects.append(Reject(conv.source, conv.file, conv.row, result.reason, str(result)))
        elif len(result.input_ids) > max_length:
            rejects.append(Reject(conv.source, conv.file, conv.row, "too_long",
                                  f"{len(result.input_ids)} tokens > max_length {max_length}"))
        else:
            examples.append(Example(final, conversation_digest(conv), result.text, result.input_ids, result.labels))
    return examples, rejects


def examples_schema(with_digest: bool = True):
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    fields = [("source", pa.string()), ("file", pa.string()), ("row", pa.int64()),
              ("messages", pa.list_(message)), ("text", pa.string()),
              ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))]
    return pa.schema(fields + [("digest", pa.string())] * with_digest)


def examples_table(examples: list[Example]):
    """Examples as an Arrow table (the shard format; `digest` is dropped from the stage's outputs)."""
    import pyarrow as pa

    return pa.Table.from_pydict({
        "source": [e.conversation.source for e in examples],
        "file": [e.conversation.file for e in examples],
        "row": [e.conversation.row for e in examples],
        "messages": [e.conversation.to_dicts() for e in examples],
        "text": [e.text for e in examples],
        "input_ids": [e.input_ids for e in examples],
        "labels": [e.labels for e in examples],
        "digest": [e.digest for e in examples],
    }, schema=examples_schema())


def write_split(path: Path, table) -> None:
    import pyarrow.parquet as pq

    # One schema for tables built here and tables read back from a shard (parquet renames list
    # items to "element"): the same rows must give the same bytes either way.
    table = table.drop_columns(["digest"]).cast(examples_schema(with_digest=False)).combine_chunks()
    pq.write_table(table, path, compression="zstd")


def token_counts(table) -> tuple[list[int], list[int]]:
    """Per row: number of tokens, and number of trained tokens (labels != -100)."""
    import numpy as np
    import pyarrow.compute as pc

    labels = table.column("labels").combine_chunks()
    trained = np.bincount(pc.list_parent_indices(labels).to_numpy(),
                          weights=(pc.list_flatten(labels).to_numpy() != IGNORE_INDEX), minlength=len(table))
    return pc.list_value_length(labels).to_numpy().tolist(), trained.astype(int).tolist()


def shard_key(ctx: StageContext, spec: SourceSpec, template: str) -> str:
    """Everything one source's shard depends on, and nothing else (weights and seeds are not)."""
    recipe = ctx.recipe
    return hash_value({
        "version": SHARD_VERSION,
        "source": spec.model_dump(mode="json", exclude={"weight"}),
        "files": ctx.stage.inputs["files"][spec.name],
        "template": hash_text(template),
        "tokenizer": ctx.plan["base"].key,
        "train_on": recipe.train.train_on,
        "max_length": recipe.train.max_length,
        "system_prompt": recipe.system_prompt,
        "libraries": ctx.stage.inputs["libraries"],
    })


def load_shard(ctx: StageContext, spec: SourceSpec, template: str, tokenizer, store: StageStore) -> Shard:
    """The source's examples (an Arrow table) and rejects: from the store if this exact shard was
    built before, else read, rendered and tokenized now and stored."""
    import pyarrow.parquet as pq

    key = shard_key(ctx, spec, template)
    with tempfile.TemporaryDirectory(dir=ctx.out_dir.parent) as tmp:
        folder = Path(tmp)
        if store.get(key, folder):
            meta = json.loads((folder / "meta.json").read_text())
            rejects = [Reject(**json.loads(line)) for line in (folder / "rejects.jsonl").read_text().splitlines()]
            return Shard(pq.read_table(folder / "examples.parquet"), rejects, meta["conversations"], cached=True)
        conversations, rejects = read_source(spec, ctx.project.root)
        recipe = ctx.recipe
        examples, bad = tokenize_examples(conversations, template, tokenizer(), recipe.train.train_on,
                                          recipe.train.max_length, recipe.system_prompt)
        rejects = rejects + bad
        table = examples_table(examples)
        pq.write_table(table, folder / "examples.parquet", compression="zstd")
        (folder / "rejects.jsonl").write_text("".join(
            json.dumps(r.to_dict(), sort_keys=True, ensure_ascii=False) + "\n" for r in rejects))
        (folder / "meta.json").write_text(json.dumps({"conversations": len(conversations)}))
        store.put(key, folder)
        return Shard(table, rejects, len(conversations), cached=False)


def run(ctx: StageContext) -> dict:
    import pyarrow as pa

    recipe = ctx.recipe
    base_dir = ctx.input_dir("base")
    template = read_template(recipe.template, ctx.project.root, base_dir)
    # A template that cannot train (no end-of-turn marker, drops a role, not prefix-stable, marks
    # nothing) fails here, before any source is read, rather than as a dataset of rejects.
    try:
        check_template(template, train_on=recipe.train.train_on, with_system=recipe.system_prompt is not None,
                       **{"bos_token": None, "eos_token": None, **special_tokens(base_dir)})
    except TemplateError as exc:
        raise DataError(f"template '{recipe.template}' cannot be trained on ({exc.reason}): {exc}") from exc

    @functools.cache
    def tokenizer():  # loaded only when a shard must be built (transformers is slow to import)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(base_dir)

    # Rows are handled as indices into each shard's Arrow table; only the rows that make the
    # mixture are ever copied, so re-mixing large cached sources stays cheap.
    store = StageStore(ctx.project.cache_dir, "shards")
    stats: dict[str, dict] = {}
    rejects: list[Reject] = []
    seen: set[str] = set()
    tables, pools, held_out, shards = {}, {}, {}, {}
    for spec in recipe.sources:
        shard = load_shard(ctx, spec, template, tokenizer, store)
        shards[spec.name] = "cached" if shard.cached else "built"
        tables[spec.name] = shard.table
        source_rejects = list(shard.rejects)
        digests = shard.table.column("digest").to_pylist()
        kept = []
        for i, digest in enumerate(digests):
            # Exact dedup across sources: the first occurrence in source order wins.
            if recipe.mixture.dedup == "exact" and digest in seen:
                row = shard.table.slice(i, 1).select(["file", "row"]).to_pylist()[0]
                source_rejects.append(Reject(spec.name, row["file"], row["row"], "duplicate", "seen earlier"))
                continue
            seen.add(digest)
            kept.append(i)
        if not kept:
            first = "; ".join(f"row {r.row}: {r.reason} ({r.detail})" for r in source_rejects[:3])
            raise DataError(f"source '{spec.name}' has no usable example: {first}")
        held_out[spec.name] = [i for i in kept if is_eval_example(digests[i], recipe.mixture.eval_fraction)]
        pools[spec.name] = [i for i in kept if not is_eval_example(digests[i], recipe.mixture.eval_fraction)]
        rejects += source_rejects
        reasons = Counter(r.reason for r in source_rejects)
        stats[spec.name] = {"conversations": shard.conversations, "rejected": dict(sorted(reasons.items())),
                            "usable": len(kept), "eval": len(held_out[spec.name]),
                            "train_pool": len(pools[spec.name])}

    weights = [s.weight for s in recipe.sources]
    size = recipe.mixture.size
    counts = (allocate_counts(weights, size) if size is not None
              else [len(pools[s.name]) for s in recipe.sources])
    train_parts, eval_parts = [], []
    for spec, count in zip(recipe.sources, counts):
        # One RNG per source: editing one source does not reshuffle another's sample.
        picked = sample_examples(pools[spec.name], count, random.Random(f"{recipe.mixture.seed}:{spec.name}"))
        part = tables[spec.name].take(picked)
        tokens, trained = token_counts(part)
        stats[spec.name].update(sampled=len(picked), tokens=sum(tokens), trained_tokens=sum(trained))
        train_parts.append(part)
        eval_parts.append(tables[spec.name].take(held_out[spec.name]))
    train = pa.concat_tables(train_parts)
    order = list(range(len(train)))
    random.Random(recipe.mixture.seed).shuffle(order)
    train = train.take(order)
    eval_table = pa.concat_tables(eval_parts)

    write_split(ctx.out_dir / "train.parquet", train)
    write_split(ctx.out_dir / "eval.parquet", eval_table)
    with open(ctx.out_dir / "rejects.jsonl", "w", encoding="utf-8") as f:
        for reject in sorted(rejects, key=lambda r: (r.source, r.file, r.row, r.reason)):
            f.write(json.dumps(reject.to_dict(), sort_keys=True, ensure_ascii=False) + "\n")
    summary = {"sources": stats, "train_examples": len(train), "eval_examples": len(eval_table),
               "rejected": len(rejects), "train_tokens": sum(s["tokens"] for s in stats.values()),
               "trained_tokens": sum(s["trained_tokens"] for s in stats.values())}
    (ctx.out_dir / "stats.json").write_text(json.dumps(summary, sort_keys=True, indent=1) + "\n")
    return {"train_examples": len(train), "eval_examples": len(eval_table), "rejected": len(rejects),
            "shards": shards}
