"""builder/data/tokenizer.py: the base tokenizer is loaded with `tokenizers` alone once that is
proven to give what transformers gives; the verdict is cached, and a damaged verdict is redone."""
from __future__ import annotations

import json

from builder.data import tokenizer as base_tokenizer
from builder.data.tokenizer import FastTokenizer, load_tokenizer, verify_fast_load


def verdicts(cache_dir) -> list[str]:
    return [p.read_text() for p in sorted((cache_dir / "tokenizers").glob("*.json"))]


def test_a_proven_tokenizer_loads_as_tokenizers_alone_and_encodes_the_same(tokenizer_project, tiny_tokenizer):
    base, cache = tokenizer_project / "models" / "tok", tokenizer_project / ".tunefile"
    fast = load_tokenizer(base, cache)
    assert isinstance(fast, FastTokenizer)
    assert verdicts(cache) == ['{"equal": true}\n']
    text = "<|im_start|>user\nName a colour.<|im_end|>\n"
    assert fast.backend_tokenizer.encode(text, add_special_tokens=False).ids == tiny_tokenizer(
        text, add_special_tokens=False)["input_ids"]
    assert (fast.bos_token_id, fast.eos_token_id, fast.eos_token) == (
        tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.eos_token)


def test_the_verdict_is_read_back_and_a_damaged_one_is_redone(tokenizer_project, monkeypatch):
    base, cache = tokenizer_project / "models" / "tok", tokenizer_project / ".tunefile"
    assert verify_fast_load(base, cache) is True
    (verdict,) = (cache / "tokenizers").glob("*.json")
    verdict.write_text(json.dumps({"equal": False}))  # a cached verdict is trusted as it is
    assert verify_fast_load(base, cache) is False
    assert not isinstance(load_tokenizer(base, cache), FastTokenizer)
    for damaged in ('{"equal": tru', "[]", '{"equal": "yes"}'):
        verdict.write_text(damaged)
        assert verify_fast_load(base, cache) is True
        assert verdict.read_text() == '{"equal": true}\n'


def test_the_verdict_key_covers_the_tokenizer_files(tokenizer_project):
    base = tokenizer_project / "models" / "tok"
    before = base_tokenizer._digest(base)
    config = base / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"model_max_length"', '"model_max_length_"'))
    edited = base_tokenizer._digest(base)
    assert edited != before
    (base / "config.json").write_text('{"model_type": "llama", "unrelated": 1}\n')  # not a tokenizer file
    assert base_tokenizer._digest(base) == edited


def test_no_tokenizer_json_means_transformers_loads_it(tmp_path):
    assert verify_fast_load(tmp_path, tmp_path / "cache") is False
    assert not (tmp_path / "cache").exists()
