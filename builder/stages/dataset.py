"""dataset stage: sources -> conversations -> dedup -> chat template -> tokens + labels -> mixture.

Writes train.parquet, eval.parquet (messages, text, input_ids, labels with -100 on untrained
tokens, source, row), rejects.jsonl (one line per dropped row, with the reason) and stats.json.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass

from builder.errors import DataError
from builder.hashing import hash_value
from builder.mixture import allocate_counts, is_eval_example, sample_examples
from builder.records import Conversation, Message
from builder.sources import Reject, read_source
from builder.stages import StageContext
from builder.templates import TemplateError, read_template, render_chat

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    conversation: Conversation
    digest: str
    text: str
    input_ids: list[int]
    labels: list[int]


def conversation_digest(conversation: Conversation) -> str:
    """Hash of the normalised conversation (roles + stripped contents): the dedup and split key."""
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
    return Conversation(messages, conversation.source, conversation.row)


def tokenize_examples(conversations: list[Conversation], template: str, tokenizer, train_on: str,
                      max_length: int) -> tuple[list[Example], list[tuple[Conversation, str, str]]]:
    """Render and tokenize; return examples and (conversation, reason, detail) rejects."""
    rendered, rejects = [], []
    for conv in conversations:
        try:
            result = render_chat(template, conv.to_dicts(), bos_token=tokenizer.bos_token or "",
                                 eos_token=tokenizer.eos_token or "", train_on=train_on)
            rendered.append((conv, result))
        except TemplateError as exc:
            rejects.append((conv, "template_error", str(exc)))
    encodings = tokenizer([r.text for _, r in rendered], add_special_tokens=False,
                          return_offsets_mapping=True) if rendered else {"input_ids": [], "offset_mapping": []}
    examples = []
    for (conv, result), ids, offsets in zip(rendered, encodings["input_ids"], encodings["offset_mapping"]):
        labels = label_tokens(ids, offsets, result.trained_spans)
        if len(ids) > max_length:
            rejects.append((conv, "too_long", f"{len(ids)} tokens > max_length {max_length}"))
        elif all(label == IGNORE_INDEX for label in labels):
            rejects.append((conv, "no_trained_tokens", "the template marks no token of this example for loss"))
        else:
            examples.append(Example(conv, conversation_digest(conv), result.text, ids, labels))
    return examples, rejects


def write_parquet(path, examples: list[Example]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("source", pa.string()), ("row", pa.int64()), ("messages", pa.list_(message)),
                        ("text", pa.string()), ("input_ids", pa.list_(pa.int32())),
                        ("labels", pa.list_(pa.int32()))])
    table = pa.Table.from_pydict({
        "source": [e.conversation.source for e in examples],
        "row": [e.conversation.row for e in examples],
        "messages": [e.conversation.to_dicts() for e in examples],
        "text": [e.text for e in examples],
        "input_ids": [e.input_ids for e in examples],
        "labels": [e.labels for e in examples],
    }, schema=schema)
    pq.write_table(table, path, compression="zstd")


def run(ctx: StageContext) -> dict:
    from transformers import AutoTokenizer

    recipe, root = ctx.recipe, ctx.project.root
    # The tokenizer comes from the base stage: the template may be the base's own.
    tokenizer = AutoTokenizer.from_pretrained(ctx.input_dir("base"))
    template = read_template(recipe.template, root, ctx.input_dir("base"))

    stats: dict[str, dict] = {}
    rejects: list[Reject] = []
    seen: set[str] = set()
    pools: dict[str, list[Example]] = {}
    eval_examples: list[Example] = []
    for spec in recipe.sources:
        conversations, source_rejects = read_source(spec, root)
        reasons = Counter(r.reason for r in source_rejects)
        # Exact dedup across sources: the first occurrence in source order wins.
        unique = []
        for conv in conversations:
            digest = conversation_digest(conv)
            if digest in seen:
                reasons["duplicate"] += 1
                source_rejects.append(Reject(spec.name, spec.path, conv.row, "duplicate", "seen earlier"))
                continue
            if recipe.mixture.dedup == "exact":
                seen.add(digest)
            unique.append(with_system_prompt(conv, recipe.system_prompt))
        examples, bad = tokenize_examples(unique, template, tokenizer, recipe.train.train_on,
                                          recipe.train.max_length)
        for conv, reason, detail in bad:
            reasons[reason] += 1
            source_rejects.append(Reject(spec.name, spec.path, conv.row, reason, detail))
        if not examples:
            first = "; ".join(f"row {r.row}: {r.reason} ({r.detail})" for r in source_rejects[:3])
            raise DataError(f"source '{spec.name}' has no usable example: {first}")
        held_out, pools[spec.name] = [], []
        for e in examples:
            (held_out if is_eval_example(e.digest, recipe.mixture.eval_fraction) else pools[spec.name]).append(e)
        eval_examples += held_out
        rejects += source_rejects
        stats[spec.name] = {"conversations": len(conversations), "rejected": dict(sorted(reasons.items())),
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
        for reject in sorted(rejects, key=lambda r: (r.source, r.row, r.reason)):
            f.write(json.dumps(reject.to_dict(), sort_keys=True, ensure_ascii=False) + "\n")
    summary = {"sources": stats, "train_examples": len(train), "eval_examples": len(eval_examples),
               "rejected": len(rejects), "train_tokens": sum(len(e.input_ids) for e in train),
               "trained_tokens": sum(s["trained_tokens"] for s in stats.values())}
    (ctx.out_dir / "stats.json").write_text(json.dumps(summary, sort_keys=True, indent=1) + "\n")
    return {"train_examples": len(train), "eval_examples": len(eval_examples), "rejected": len(rejects)}
