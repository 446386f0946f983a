"""builder/data/filters.py: each filter rejects with its recipe key as the reason and an exact
detail; the cheapest rejecting filter names the reason; system messages never count."""
from __future__ import annotations

from builder.data.filters import check_conversation, check_tokens
from builder.data.records import Conversation, Message
from builder.recipe.schema import FiltersSpec


def conversation(*turns: tuple[str, str]) -> Conversation:
    return Conversation(tuple(Message(role, content) for role, content in turns), "s", 1)


CHAT = conversation(("system", "You are terse and careful."), ("user", "Name a colour."), ("assistant", "Blue."))


def test_no_filters_keep_everything():
    assert check_conversation(CHAT, FiltersSpec()) is None
    assert check_tokens(1, FiltersSpec()) is None


def test_each_filter_names_itself_and_says_by_how_much():
    # user + assistant: 14 + 5 = 19 characters; the system message counts for no filter but deny_patterns.
    cases = {
        "min_chars": ({"min_chars": 20}, "19 characters < 20"),
        "max_chars": ({"max_chars": 18}, "19 characters > 18"),
        "min_turn_chars": ({"min_turn_chars": 6}, "message 2 (assistant) has 5 characters < 6"),
        "max_turn_chars": ({"max_turn_chars": 13}, "message 1 (user) has 14 characters > 13"),
        "min_response_chars": ({"min_response_chars": 6}, "message 2 (assistant) has 5 characters < 6"),
        "max_turns": ({"max_turns": 1}, "2 user/assistant messages > 1"),
        "deny_patterns": ({"deny_patterns": ["[Tt]erse"]}, "message 0 (system) matches '[Tt]erse': 'terse'"),
    }
    for reason, (settings, detail) in cases.items():
        assert check_conversation(CHAT, FiltersSpec(**settings)) == (reason, detail)
    assert check_conversation(CHAT, FiltersSpec(min_chars=19, max_chars=19, min_turn_chars=5, max_turn_chars=14,
                                                min_response_chars=5, max_turns=2, deny_patterns=["green"])) is None


def test_the_cheapest_rejecting_filter_names_the_reason():
    spec = FiltersSpec(max_turns=1, min_chars=100, deny_patterns=["Blue"])
    assert check_conversation(CHAT, spec)[0] == "max_turns"
    assert check_conversation(CHAT, spec.model_copy(update={"max_turns": None}))[0] == "min_chars"


def test_a_deny_pattern_match_is_shown_cut_to_60_characters():
    long = conversation(("user", "Say it."), ("assistant", "secret " + "x" * 80))
    reason, detail = check_conversation(long, FiltersSpec(deny_patterns=["secret x+"]))
    assert (reason, detail) == ("deny_patterns", f"message 1 (assistant) matches 'secret x+': '{'secret ' + 'x' * 53}'")


def test_min_tokens_counts_the_rendered_example():
    assert check_tokens(7, FiltersSpec(min_tokens=8)) == ("min_tokens", "7 tokens < 8")
    assert check_tokens(8, FiltersSpec(min_tokens=8)) is None
