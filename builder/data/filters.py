"""Quality filters: small predicates over a Conversation, each returning None (keep) or a
(reason, detail) pair. The reason is the recipe key that rejected the example, so every count in
stats.json and every line of rejects.jsonl says which setting to change.

    rejection = check_conversation(conversation, recipe.filters)   # None or ("min_chars", "12 < 20")
    rejection = check_tokens(token_count, recipe.filters)          # after rendering: min_tokens
"""
from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from builder.data.records import Conversation
from builder.recipe.schema import FiltersSpec

Rejection = tuple[str, str] | None


def _body(conversation: Conversation) -> list:
    return [m for m in conversation.messages if m.role != "system"]


def _example_chars(conversation: Conversation, spec: FiltersSpec) -> Rejection:
    chars = sum(len(m.content) for m in _body(conversation))
    if spec.min_chars is not None and chars < spec.min_chars:
        return "min_chars", f"{chars} characters < {spec.min_chars}"
    if spec.max_chars is not None and chars > spec.max_chars:
        return "max_chars", f"{chars} characters > {spec.max_chars}"
    return None


def _turn_chars(conversation: Conversation, spec: FiltersSpec) -> Rejection:
    for i, message in enumerate(conversation.messages):
        if message.role == "system":
            continue
        n = len(message.content)
        if spec.min_turn_chars is not None and n < spec.min_turn_chars:
            return "min_turn_chars", f"message {i} ({message.role}) has {n} characters < {spec.min_turn_chars}"
        if spec.max_turn_chars is not None and n > spec.max_turn_chars:
            return "max_turn_chars", f"message {i} ({message.role}) has {n} characters > {spec.max_turn_chars}"
        if spec.min_response_chars is not None and message.role == "assistant" and n < spec.min_response_chars:
            return "min_response_chars", f"message {i} (assistant) has {n} characters < {spec.min_response_chars}"
    return None


def _turns(conversation: Conversation, spec: FiltersSpec) -> Rejection:
    turns = len(_body(conversation))
    if spec.max_turns is not None and turns > spec.max_turns:
        return "max_turns", f"{turns} user/assistant messages > {spec.max_turns}"
    return None


@lru_cache(maxsize=64)
def _compiled(patterns: tuple[str, ...]) -> list[re.Pattern]:
    return [re.compile(p) for p in patterns]


def _deny_patterns(conversation: Conversation, spec: FiltersSpec) -> Rejection:
    for pattern in _compiled(spec.deny_patterns):
        for i, message in enumerate(conversation.messages):
            found = pattern.search(message.content)
            if found:
                return ("deny_patterns",
                        f"message {i} ({message.role}) matches {pattern.pattern!r}: {found.group(0)[:60]!r}")
    return None


# Cheapest first: the first filter that rejects names the reason.
FILTERS: tuple[Callable[[Conversation, FiltersSpec], Rejection], ...] = (
    _turns, _example_chars, _turn_chars, _deny_patterns)


def check_conversation(conversation: Conversation, spec: FiltersSpec) -> Rejection:
    """The first filter that rejects the conversation, as (reason, detail); None keeps it."""
    for check in FILTERS:
        rejection = check(conversation, spec)
        if rejection is not None:
            return rejection
    return None


def check_tokens(tokens: int, spec: FiltersSpec) -> Rejection:
    """The token filter, applied after rendering (the maximum is train.max_length: `too_long`)."""
    if spec.min_tokens is not None and tokens < spec.min_tokens:
        return "min_tokens", f"{tokens} tokens < {spec.min_tokens}"
    return None
