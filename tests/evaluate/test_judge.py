"""The pairwise judge (builder/evaluate/judge.py): verdicts, both orders, the win rate and its interval, the
OpenAI-compatible client against a canned server on 127.0.0.1, and the verdict cache."""
import time

import pytest
from helpers import CannedChat

from builder.errors import StageError
from builder.evaluate.judge import OpenAIJudge, Pair, judge_pairs, pair_score, verdict, win_rate
from builder.llm.items import ItemCache

PAIRS = [Pair(f"Question {i}?", f"good answer {i}", f"poor answer {i}") for i in range(6)]


def test_verdicts_and_pair_scores():
    assert verdict("A is better. [[A]]") == "A" and verdict("[[A]] no, final: [[C]]") == "C"
    assert verdict("I cannot decide") is None
    assert pair_score("A", "B") == 1.0 and pair_score("A", "A") == 0.5 and pair_score("C", "C") == 0.5
    assert pair_score("B", "A") == 0.0 and pair_score("A", None) is None
    # 1000 seeded bootstrap means of 4 scores: the 25th and the 975th of them, sorted
    assert win_rate([1.0, 1.0, 0.5, 0.0]) == (0.625, [0.25, 1.0])
    assert win_rate([1.0, 1.0, 0.5, 0.0], seed=0) == win_rate([1.0, 1.0, 0.5, 0.0])  # seeded: the same twice
    assert win_rate([0.5] * 3) == (0.5, [0.5, 0.5]) and win_rate([]) == (None, None)


def _judge(server: CannedChat, key: str | None = None) -> OpenAIJudge:
    return OpenAIJudge(server.url, "judge-model", key, timeout_s=5, retries=3)


def test_both_orders_cancel_a_position_biased_judge(tmp_path):
    server = CannedChat(lambda prompt: "The first one. [[A]]")  # always prefers position A
    try:
        cache = ItemCache(tmp_path / "items.sqlite", "judge")
        metrics, records = judge_pairs(_judge(server), "openai:judge-model", PAIRS, cache)
    finally:
        server.close()
    assert metrics["win_rate"] == 0.5 and metrics["ties"] == 6 and metrics["invalid"] == 0
    assert len(server.requests) == 12 and [o["order"] for o in records[0]["orders"]] == ["tuned_first", "base_first"]


def test_a_judge_that_sees_quality_gives_the_tuned_side_the_wins_and_caches_verdicts(tmp_path):
    def prefer_good(prompt: str) -> str:
        a = prompt.split("[The Start of Assistant A's Answer]")[1]
        return "[[A]]" if a.lstrip().startswith("good") else "[[B]]"

    server = CannedChat(prefer_good, fail_first=2)  # two 503s first: retried with backoff
    try:
        for _ in range(2):
            cache = ItemCache(tmp_path / "items.sqlite", "judge")
            metrics, records = judge_pairs(_judge(server, key="sk-test-123"), "openai:judge-model", PAIRS, cache,
                                           concurrency=3)
            cache.close()
            assert metrics["win_rate"] == 1.0 and metrics["wins"] == 6 and metrics["win_rate_ci95"] == [1.0, 1.0]
            assert len(server.requests) == 14  # 12 verdicts + 2 refused; the second pass sends none
    finally:
        server.close()
    assert all(r["headers"]["Authorization"] == "Bearer sk-test-123" for r in server.requests)
    assert records[0]["orders"][0]["judge_prompt"].count("good answer 0") == 1


def test_unreachable_judge_fails_within_seconds_with_a_clear_message(tmp_path):
    server = CannedChat(lambda prompt: "[[A]]")
    url = server.url
    server.close()  # nothing listens on that port now
    started = time.monotonic()
    with pytest.raises(StageError, match="cannot reach .* start the server"):
        OpenAIJudge(url, "m", None, timeout_s=5, retries=3).ask("hello")
    assert time.monotonic() - started < 5
