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
from builder.templates import TemplateError, read_template, render_chat

IGNORE_INDEX = -100
SHARD_VERSION = 1  # bump when a shard's content changes for the same inputs


@dataclass(frozen=True)
class Example:
    conversation: Conversation
    digest: str  # of the normalised conversation as the source gave it: the dedup and split key
    text: str
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class Shard:
    examples: list[Example]
    rejects: list[Reject]
    conversations: int  # conversations read, before any reject of rendering or tokenizing
    cached: bool


def conversation_digest(conversation: Conversation) -> str:
    """Hash of the normalised conversation (roles + stripped contents)."""
    return hash_value([[m.role, m.content.strip()] for m in conversation.messages])


def label_tokens(input_ids: list[int], offsets: list[tuple[int, int]],
                 spans: list[tuple[int, int]]) -> list[int]:
    """A token is trained iff all its characters lie in one trained span; else IGNORE_INDEX."""
    labels = []
    span_index = 0
    for token, (start, end) in zip(input_ids, offsets):
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        inside = (span_index < len(spans) and end > start
                  and spans[span_index][0] <= start and end <= spans[span_index][1])
        labels.append(token if inside else IGNORE_INDEX)
    return labels


def with_system_prompt(conversation: Conversation, prompt: str | None) -> Conversation:
    if prompt is None or conversation.messages[0].role == "system":
        return conversation
    messages = (Message("system", prompt),) + conversation.messages
    return Conversation(messages, conversation.source, conversation.row, conversation.file)


def tokenize_examples(conversations: list[Conversation], template: str, tokenizer, train_on: str,
                      max_length: int, system_prompt: str | None = None) -> tuple[list[Example], list[Reject]]:
    """Render and tokenize; return the examples and the rejects (with reasons)."""
    rendered, rejects = [], []
    for conv in conversations:
        try:
            result = render_chat(template, with_system_prompt(conv, system_prompt).to_dicts(),
                                 bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
                                 train_on=train_on)
            rendered.append((conv, result))
        except TemplateError as exc:
            rejects.append(Reject(conv.source, conv.file, conv.row, "template_error", str(exc)))
    texts = [r.text for _, r in rendered]
    encodings = (tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts
                 else {"input_ids": [], "offset_mapping": []})
    examples = []
    for (conv, result), ids, offsets in zip(rendered, encodings["input_ids"], encodings["offset_mapping"]):
        labels = label_tokens(ids, offsets, result.trained_spans)
        if len(ids) > max_length:
            rejects.append(Reject(conv.source, conv.file, conv.row, "too_long",
                                  f"{len(ids)} tokens > max_length {max_length}"))
        elif all(label == IGNORE_INDEX for label in labels):
            rejects.append(Reject(conv.source, conv.file, conv.row, "no_trained_tokens",
                                  "the template marks no token of this example for loss"))
        else:
            final = with_system_prompt(conv, system_prompt)
            examples.append(Example(final, conversation_digest(conv), result.text, ids, labels))
    return examples, rejects


SCHEMA_FIELDS = ("source", "file", "row", "messages", "text", "input_ids", "labels")


def write_parquet(path: Path, examples: list[Example], with_digest: bool = False) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    fields = [("source", pa.string()), ("file", pa.string()), ("row", pa.int64()),
              ("messages", pa.list_(message)), ("text", pa.string()),
              ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))]
    columns = {
        "source": [e.conversation.source for e in examples],
        "file": [e.conversation.file for e in examples],
        "row": [e.conversation.row for e in examples],
        "messages": [e.conversation.to_dicts() for e in examples],
        "text": [e.text for e in examples],
        "input_ids": [e.input_ids for e in examples],
        "labels": [e.labels for e in examples],
    }
    if with_digest:
        fields.append(("digest", pa.string()))
        columns["digest"] = [e.digest for e in examples]
    pq.write_table(pa.Table.from_pydict(columns, schema=pa.schema(fields)), path, compression="zstd")


def read_examples(path: Path) -> list[Example]:
    import pyarrow.parquet as pq

    examples = []
    for row in pq.read_table(path).to_pylist():
        messages = tuple(Message(m["role"], m["content"]) for m in row["messages"])
        conv = Conversation(messages, row["source"], row["row"], row["file"])
        examples.append(Example(conv, row["digest"], row["text"], row["input_ids"], row["labels"]))
    return examples


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
    """The source's examples and rejects: from the store if this exact shard was built before."""
    key = shard_key(ctx, spec, template)
    with tempfile.TemporaryDirectory(dir=ctx.out_dir.parent) as tmp:
        folder = Path(tmp)
        if store.get(key, folder):
            meta = json.loads((folder / "meta.json").read_text())
            rejects = [Reject(**json.loads(line)) for line in (folder / "rejects.jsonl").read_text().splitlines()]
            return Shard(read_examples(folder / "examples.parquet"), rejects, meta["conversations"], cached=True)
        conversations, rejects = read_source(spec, ctx.project.root)
        recipe = ctx.recipe
        examples, bad = tokenize_examples(conversations, template, tokenizer(), recipe.train.train_on,
                                          recipe.train.max_length, recipe.system_prompt)
        rejects = rejects + bad
        write_parquet(folder / "examples.parquet", examples, with_digest=True)
        (folder / "rejects.jsonl").write_text("".join(
            json.dumps(r.to_dict(), sort_keys=True, ensure_ascii=False) + "\n" for r in rejects))
        (folder / "meta.json").write_text(json.dumps({"conversations": len(conversations)}))
        store.put(key, folder)
        return Shard(examples, rejects, len(conversations), cached=False)


def run(ctx: StageContext) -> dict:
    recipe = ctx.recipe
    base_dir = ctx.input_dir("base")
    template = read_template(recipe.template, ctx.project.root, base_dir)

    @functools.cache
    def tokenizer():  # loaded only when a shard must be built (transformers is slow to import)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(base_dir)

    store = StageStore(ctx.project.cache_dir, "shards")
    stats: dict[str, dict] = {}
    rejects: list[Reject] = []
    seen: set[str] = set()
    pools: dict[str, list[Example]] = {}
    eval_examples: list[Example] = []
    shards: dict[str, str] = {}
    for spec in recipe.sources:
        shard = load_shard(ctx, spec, template, tokenizer, store)
        shards[spec.name] = "cached" if shard.cached else "built"
        source_rejects = list(shard.rejects)
        # Exact dedup across sources: the first occurrence in source order wins.
        examples = []
        for example in shard.examples:
            if recipe.mixture.dedup == "exact" and example.digest in seen:
                conv = example.conversation
                source_rejects.append(Reject(spec.name, conv.file, conv.row, "duplicate", "seen earlier"))
                continue
            seen.add(example.digest)
            examples.append(example)
        if not examples:
            first = "; ".join(f"row {r.row}: {r.reason} ({r.detail})" for r in source_rejects[:3])
            raise DataError(f"source '{spec.name}' has no usable example: {first}")
        held_out, pools[spec.name] = [], []
        for e in examples:
            (held_out if is_eval_example(e.digest, recipe.mixture.eval_fraction) else pools[spec.name]).append(e)
        eval_examples += held_out
        rejects += source_rejects
        reasons = Counter(r.reason for r in source_rejects)
        stats[spec.name] = {"conversations": shard.conversations, "rejected": dict(sorted(reasons.items())),
                            "usable": len(examples), "eval": len(held_out), "train_pool": len(pools[spec.name])}

    weights = [s.weight for s in recipe.sources]
    size = recipe.mixture.size
    counts = (allocate_counts(weights, size) if size is not None
              else [len(pools[s.name]) for s in recipe.sources])
    train: list[Example] = []
    for spec, count in zip(recipe.sources, counts):
        # One RNG per source: editing one source does not reshuffle another's sample.
        picked = sample_examples(pools[spec.name], count, random.Random(f"{recipe.mixture.seed}:{spec.name}"))
        train += picked
        stats[spec.name].update(sampled=len(picked), tokens=sum(len(e.input_ids) for e in picked),
                                trained_tokens=sum(sum(l != IGNORE_INDEX for l in e.labels) for e in picked))
    random.Random(recipe.mixture.seed).shuffle(train)

    write_parquet(ctx.out_dir / "train.parquet", train)
    write_parquet(ctx.out_dir / "eval.parquet", eval_examples)
    with open(ctx.out_dir / "rejects.jsonl", "w", encoding="utf-8") as f:
        for reject in sorted(rejects, key=lambda r: (r.source, r.file, r.row, r.reason)):
            f.write(json.dumps(reject.to_dict(), sort_keys=True, ensure_ascii=False) + "\n")
    summary = {"sources": stats, "train_examples": len(train), "eval_examples": len(eval_examples),
               "rejected": len(rejects), "train_tokens": sum(len(e.input_ids) for e in train),
               "trained_tokens": sum(s["trained_tokens"] for s in stats.values())}
    (ctx.out_dir / "stats.json").write_text(json.dumps(summary, sort_keys=True, indent=1) + "\n")
    return {"train_examples": len(train), "eval_examples": len(eval_examples), "rejected": len(rejects),
            "shards": shards}
