"""Served models (builder/llm/served.py): the concurrent map the teacher and the judge send requests
through, the HTTP client against a canned OpenAI-compatible server on 127.0.0.1, and the API key."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from helpers import CannedChat

from builder.errors import StageError
from builder.llm.served import HttpModel, Reply, api_key, map_concurrent


def test_map_concurrent_keeps_the_order_of_the_items_whatever_finishes_first():
    started = []

    def ask(item: int) -> int:
        started.append(item)
        time.sleep(0.002 * (8 - item))  # later items finish first
        return item * 10

    assert map_concurrent(ask, list(range(8)), concurrency=4) == [0, 10, 20, 30, 40, 50, 60, 70]
    assert sorted(started) == list(range(8))


def test_map_concurrent_runs_up_to_concurrency_calls_at_once():
    together = threading.Barrier(3, timeout=10)  # passes only when three calls wait at once
    running, peak, lock = [0], [0], threading.Lock()

    def ask(item: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        together.wait()
        with lock:
            running[0] -= 1
        return item

    assert map_concurrent(ask, list(range(6)), concurrency=3) == list(range(6))
    assert peak[0] == 3


def test_map_concurrent_reraises_a_workers_exception():
    failure = ValueError("item 3 is bad")

    def ask(item: int) -> int:
        if item == 3:
            raise failure
        return item

    with pytest.raises(ValueError) as info:
        map_concurrent(ask, list(range(6)), concurrency=3)
    assert info.value is failure  # the worker's own exception, not a wrapper


def test_map_concurrent_one_at_a_time_stops_at_the_first_failure():
    asked = []

    def ask(item: int) -> int:
        asked.append(item)
        if item == 1:
            raise KeyError(item)
        return item

    with pytest.raises(KeyError):
        map_concurrent(ask, [0, 1, 2, 3], concurrency=1)
    assert asked == [0, 1]


def test_http_model_asks_the_chat_endpoint_and_reads_the_reply():
    server = CannedChat(lambda prompt: f"echo: {prompt}")
    try:
        model = HttpModel(server.url, "canned", "sk-test", timeout_s=5, retries=0, what="teacher")
        reply = model.chat("three word prompt", temperature=0.0, max_tokens=8, seed=1)
    finally:
        server.close()
    assert reply == Reply("echo: three word prompt", prompt_tokens=3, completion_tokens=4, finish_reason="stop")
    assert reply.to_dict() == {"text": "echo: three word prompt", "prompt_tokens": 3, "completion_tokens": 4,
                               "finish_reason": "stop"}
    [request] = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["body"] == {"model": "canned", "messages": [{"role": "user", "content": "three word prompt"}],
                               "temperature": 0.0, "max_tokens": 8, "seed": 1}
    assert request["headers"]["Authorization"] == "Bearer sk-test"


def test_http_model_without_a_key_sends_no_authorization_header():
    server = CannedChat(lambda prompt: "ok")
    try:
        assert HttpModel(server.url, "canned", None, timeout_s=5, retries=0, what="teacher").chat("hi").text == "ok"
    finally:
        server.close()
    assert "Authorization" not in server.requests[0]["headers"]


def test_http_model_falls_back_to_completions_once_after_a_404():
    server = CannedChat(lambda prompt: prompt.upper(), chat=False)
    try:
        model = HttpModel(server.url, "canned", None, timeout_s=5, retries=0, what="teacher")
        assert [model.chat(p).text for p in ("a", "b")] == ["A", "B"]
    finally:
        server.close()
    # one 404 on the chat path, then completions only
    assert [r["path"] for r in server.requests] == ["/v1/chat/completions", "/v1/completions", "/v1/completions"]
    assert server.requests[1]["body"] == {"model": "canned", "prompt": "a"}


def test_http_model_names_the_recipe_key_when_nothing_listens():
    server = CannedChat(lambda prompt: "ok")
    url = server.url
    server.close()
    with pytest.raises(StageError, match=r"^teacher: cannot reach .*/chat/completions .*fix teacher.openai.base_url$"):
        HttpModel(url, "canned", None, timeout_s=5, retries=2, what="teacher").chat("hi")


def test_the_api_key_comes_from_the_variable_params_yaml_names(monkeypatch):
    def project(name):
        return SimpleNamespace(params=SimpleNamespace(endpoints=SimpleNamespace(api_key_env=name)))

    assert api_key(project(None), "evaluate.judge") is None
    monkeypatch.setenv("TUNEFILE_TEST_KEY", "sk-123")
    assert api_key(project("TUNEFILE_TEST_KEY"), "evaluate.judge") == "sk-123"
    monkeypatch.delenv("TUNEFILE_TEST_KEY")
    with pytest.raises(StageError, match="^evaluate.judge: params.yaml endpoints.api_key_env names TUNEFILE_TEST_KEY, "
                                         "which is not set in the environment$"):
        api_key(project("TUNEFILE_TEST_KEY"), "evaluate.judge")
