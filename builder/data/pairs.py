"""Preference pairs -> token ids and labels: prompt+chosen and prompt+rejected rendered through the
recipe's template and tokenizer (the SFT path), labels on the last answer only.

    pairs, rejects = tokenize_pairs(conversations, template, tokenizer, max_length=512)
    pairs[0].prompt_tokens, pairs[0].chosen_ids, pairs[0].chosen_labels   # labels: -100 off the answer

A pair is kept only when both sides share a token-identical prompt prefix, the answer starts right
after it, and at least one answer token fits in max_length. Tokens after the last trained one
(a template's newline after the end-of-turn marker) carry no loss and are dropped; an answer longer
than max_length is cut (keep the start, as TRL's keep_start). Every refusal is a countable reason:
same_answers (from the row), no_trained_tokens, prompt_mismatch, prompt_too_long, duplicate.
"""
from __future__ import annotations

from dataclasses import dataclass

from builder.data.examples import conversation_digest
from builder.data.mixture import hash_prefixes
from builder.data.records import Conversation, Message, with_system_prompt
from builder.data.sources import Reject
from builder.hashing import hash_value
from builder.templates import TemplateError
from builder.templates.tokens import IGNORE_INDEX, tokenize_batch


@dataclass(frozen=True)
class Pair:
    source: str
    file: str
    row: int
    prompt: tuple[Message, ...]  # the messages before the answer (system prompt included)
    chosen: str
    rejected: str
    prompt_tokens: int           # the shared prefix: ids[:prompt_tokens] are the same on both sides
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    digest: str                  # of prompt, chosen and rejected: the dedup and held-out split key


def pair_digest(conversation: Conversation) -> str:
    return hash_value([conversation_digest(conversation), (conversation.rejected or "").strip()])


def _first_trained(labels) -> int:
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def _last_trained(labels) -> int:
    return max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def _side(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """One side's tokens up to its last trained one, cut to max_length."""
    end = min(_last_trained(labels) + 1, max_length)
    return ids[:end], labels[:end]


def check_pair(chosen: tuple[list[int], list[int]], rejected: tuple[list[int], list[int]],
               max_length: int) -> tuple[int, tuple, tuple] | tuple[str, str]:
    """(prompt_tokens, chosen side, rejected side), or (reason, detail) for a pair that cannot train."""
    (c_ids, c_labels), (r_ids, r_labels) = chosen, rejected
    start = _first_trained(c_labels)
    if _first_trained(r_labels) != start or c_ids[:start] != r_ids[:start]:
        return "prompt_mismatch", ("prompt+chosen and prompt+rejected do not share a token-identical prompt "
                                   "(the answer's first token merges with the prompt's last characters)")
    if start >= max_length:
        return "prompt_too_long", f"the prompt has {start} tokens, leaving no answer token in max_length {max_length}"
    return start, _side(c_ids, c_labels, max_length), _side(r_ids, r_labels, max_length)


def tokenize_pairs(conversations: list[Conversation], template: str, tokenizer, max_length: int,
                   system_prompt: str | None = None, no_end_of_turn: str = "append_eos"
                   ) -> tuple[list[Pair], list[Reject]]:
    """Preference conversations (messages ending with the chosen answer, `rejected` beside them) ->
    pairs and rejects, in input order; a later exact duplicate of a pair is rejected."""
    finals = [with_system_prompt(conv, system_prompt) for conv in conversations]
    sides = [[m.__dict__ for m in final.messages] for final in finals]
    sides += [[*side[:-1], {"role": "assistant", "content": conv.rejected}] for side, conv in zip(sides, finals)]
    batch, results = tokenize_batch(template, sides, tokenizer, train_on="last_assistant",
                                    no_end_of_turn=no_end_of_turn)

    def tokens(k: int) -> tuple[list[int], list[int]]:
        row = results[k]
        lo, hi = batch.bounds[row], batch.bounds[row + 1]
        return batch.ids[lo:hi].tolist(), batch.labels[lo:hi].tolist()

    pairs, rejects, seen = [], [], {}
    n = len(finals)
    for k, (conv, final) in enumerate(zip(conversations, finals)):
        where = (conv.source, conv.file, conv.row)
        failed = next((r for r in (results[k], results[n + k]) if isinstance(r, TemplateError)), None)
        if failed is not None:
            rejects.append(Reject(*where, failed.reason, str(failed)))
            continue
        checked = check_pair(tokens(k), tokens(n + k), max_length)
        if isinstance(checked[0], str):
            rejects.append(Reject(*where, *checked))
            continue
        digest = pair_digest(conv)
        if digest in seen:
            rejects.append(Reject(*where, "duplicate", f"the same pair as row {seen[digest]}"))
            continue
        seen[digest] = conv.row
        start, (c_ids, c_labels), (r_ids, r_labels) = checked
        pairs.append(Pair(conv.source, conv.file, conv.row, final.messages[:-1], final.messages[-1].content,
                          conv.rejected, start, c_ids, c_labels, r_ids, r_labels, digest))
    return pairs, rejects


def split_pairs(pairs: list[Pair], eval_fraction: float, eval_size: int | None) -> tuple[list[Pair], list[Pair]]:
    """(train, held out): by each pair's own hash, so adding a pair moves no other pair across.
    eval_size takes the pairs with the smallest hashes; else those below eval_fraction."""
    prefixes = hash_prefixes([p.digest for p in pairs]).tolist()
    if eval_size is not None:
        held = set(sorted(range(len(pairs)), key=lambda i: (prefixes[i], i))[:eval_size])
    else:
        held = {i for i, prefix in enumerate(prefixes) if prefix / 2**64 < eval_fraction}
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def cap_pairs(pairs: list[Pair], caps: dict[str, int | None]) -> list[Pair]:
    """sources[].max_examples: the source's pairs with the smallest hashes (a stable pick), in input order."""
    keep = set(range(len(pairs)))
    for source, cap in caps.items():
        mine = [i for i, p in enumerate(pairs) if p.source == source]
        if cap is not None and len(mine) > cap:
            prefixes = hash_prefixes([pairs[i].digest for i in mine]).tolist()
            keep -= {i for _, i in sorted(zip(prefixes, mine))[cap:]}
    return [p for i, p in enumerate(pairs) if i in keep]


def as_side(pair: Pair, side: str) -> tuple[list[int], list[int]]:
    return (pair.chosen_ids, pair.chosen_labels) if side == "chosen" else (pair.rejected_ids, pair.rejected_labels)


PAIR_COLUMNS = ("source", "file", "row", "prompt", "chosen", "rejected", "prompt_tokens", "chosen_ids",
                "chosen_labels", "rejected_ids", "rejected_labels")


def write_pairs(path, pairs: list[Pair]) -> None:
    """A split of pairs as parquet (PAIR_COLUMNS; prompt as a list of {role, content})."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("source", pa.string()), ("file", pa.string()), ("row", pa.int64()),
                        ("prompt", pa.list_(message)), ("chosen", pa.string()), ("rejected", pa.string()),
                        ("prompt_tokens", pa.int32()), *((c, pa.list_(pa.int32())) for c in PAIR_COLUMNS[7:])])
    rows = [{**{c: getattr(p, c) for c in PAIR_COLUMNS}, "prompt": [m.__dict__ for m in p.prompt]} for p in pairs]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")


def read_pairs(path) -> list[Pair]:
    import pyarrow.parquet as pq

    pairs = []
    for row in pq.read_table(path).to_pylist():
        prompt = tuple(Message(m["role"], m["content"]) for m in row.pop("prompt"))
        pairs.append(Pair(prompt=prompt, digest="", **row))
    return pairs

