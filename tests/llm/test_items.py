"""The per-item cache (builder/llm/items.py): a result per (model key, kind, request), counted hits
and misses, kept across reopening, and nothing written once closed."""
from __future__ import annotations

from builder.llm.items import ItemCache

REQUEST = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}


def test_a_stored_result_is_found_by_model_kind_and_request(tmp_path):
    cache = ItemCache(tmp_path / "deep" / "items.sqlite", "model-a")  # its folder is made
    assert cache.get("answer", REQUEST) is None
    cache.put("answer", REQUEST, {"text": "Hello", "tokens": 2, "stopped": True})
    assert cache.get("answer", REQUEST) == {"text": "Hello", "tokens": 2, "stopped": True}
    assert cache.get("generate", REQUEST) is None  # another kind
    assert cache.get("answer", {**REQUEST, "max_tokens": 9}) is None  # another request
    assert (cache.hits, cache.misses) == (1, 3)
    cache.close()


def test_results_outlive_the_process_and_stay_with_their_model(tmp_path):
    path = tmp_path / "items.sqlite"
    first = ItemCache(path, "model-a")
    first.put("loglikelihood", {"tokens": [1, 2, 3], "first": 1}, [-1.5, True])
    first.close()
    again, other = ItemCache(path, "model-a"), ItemCache(path, "model-b")
    assert again.get("loglikelihood", {"tokens": [1, 2, 3], "first": 1}) == [-1.5, True]
    assert other.get("loglikelihood", {"tokens": [1, 2, 3], "first": 1}) is None
    again.close()
    other.close()


def test_a_put_after_close_is_dropped(tmp_path):
    cache = ItemCache(tmp_path / "items.sqlite", "model-a")
    cache.close()
    cache.put("answer", REQUEST, "late")  # a client thread whose build already failed
    cache.close()  # twice is fine
    reopened = ItemCache(tmp_path / "items.sqlite", "model-a")
    assert reopened.get("answer", REQUEST) is None
    reopened.close()
