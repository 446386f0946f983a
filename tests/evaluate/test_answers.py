"""Where an eval answer ended (builder/evaluate/answers.py): only a stop at the template's end-of-turn
marker counts as stopped; EOS and other stops are counted apart. The generator and the model are
stand-ins here (a real GGUF's answers are the end-to-end test's)."""
from __future__ import annotations

import pytest

import builder.evaluate.answers as answers
from builder.evaluate.answers import STOPPED_AT, cached_answers, classified, stop_metrics, stopped_at
from builder.llm.items import ItemCache
from builder.templates import BUILTIN_TEMPLATES

CHATML = BUILTIN_TEMPLATES["chatml"].read_text(encoding="utf-8")
ALPACA = BUILTIN_TEMPLATES["alpaca"].read_text(encoding="utf-8")  # closes each answer with EOS
# No end-of-turn token: a blank line, then the next turn's header.
PLAIN = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
         "{% if add_generation_prompt %}### assistant:\n{% endif %}")


@pytest.mark.parametrize(("stopped_on", "end_of_turn", "at"), [
    ("<|im_end|>", ["<|im_end|>"], "end_of_turn"),
    ("</s>", ["<|im_end|>"], "eos"),              # llama.cpp stops at EOS too: not the trained stop
    ("<|endoftext|>", ["<|im_end|>"], "other"),   # another end-of-generation token
    (None, ["<|im_end|>"], "max_tokens"),
    ("</s>", ["</s>"], "end_of_turn"),            # a template that ends answers with EOS
    (" </s>", ["</s>"], "end_of_turn"),
    ("### Instruction:", ["### Instruction:"], "end_of_turn"),  # a stop text: the next turn's opener
])
def test_where_an_answer_ended(stopped_on, end_of_turn, at):
    assert stopped_at(stopped_on, end_of_turn, "</s>") == at
    result = {"text": "x", "tokens": 3, "stopped": stopped_on is not None, "stopped_on": stopped_on}
    assert classified(result, end_of_turn, "</s>") == {**result, "stopped": at == "end_of_turn", "stopped_at": at}


def test_stop_metrics_count_only_end_of_turn_stops_as_the_stop_rate():
    held = [{"tokens": n, "stopped_at": at} for n, at in
            [(5, "end_of_turn"), (7, "eos"), (9, "eos"), (64, "max_tokens"), (3, "other")]]
    assert stop_metrics(held) == {
        "stop_rate": 0.2, "eos_stop_rate": 0.4, "stopped_at": {"end_of_turn": 1, "eos": 2, "other": 1, "max_tokens": 1},
        "stop_prompts": 5, "answer_tokens_mean": 17.6, "answer_tokens_median": 7, "answer_tokens_max": 64}
    assert list(stop_metrics(held)["stopped_at"]) == list(STOPPED_AT)


class FakeLlama:
    """What cached_answers asks of a llama_cpp.Llama: special tokens, tokenize, the GGUF template."""

    TOKENS = {0: "<s>", 1: "</s>", 4: "<|im_end|>"}

    def __init__(self, template: str):
        self.metadata = {"tokenizer.chat_template": template}

    def token_bos(self) -> int:
        return 0

    def token_eos(self) -> int:
        return 1

    def detokenize(self, ids: list[int], special: bool = False) -> bytes:
        return "".join(self.TOKENS[i] for i in ids).encode()

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return list(text)


def _generator(made: list[dict], seen: list):
    class FakeGenerator:
        def __init__(self, llm):
            pass

        def generate(self, prompts, stops, max_tokens):
            seen.append(stops)
            return made[:len(prompts)]

        def close(self):
            pass

    return FakeGenerator


@pytest.mark.parametrize(("template", "policy", "eos_at"), [
    (CHATML, "append_eos", "eos"),          # ChatML ends turns with <|im_end|>: EOS is not a stop
    (ALPACA, "keep", "end_of_turn"),        # alpaca's template itself ends each answer with EOS
    (PLAIN, "append_eos", "end_of_turn"),   # no end-of-turn token: training appended EOS
    (PLAIN, "keep", "eos"),                 # ... or kept the answers as they were: the opener ends them
])
def test_cached_answers_are_classified_and_cached_raw(tmp_path, monkeypatch, template, policy, eos_at):
    made = [{"text": "a", "tokens": 2, "stopped": True, "stopped_on": "<|im_end|>"},
            {"text": "b", "tokens": 3, "stopped": True, "stopped_on": "</s>"},
            {"text": "c", "tokens": 8, "stopped": False, "stopped_on": None}]
    seen: list = []
    monkeypatch.setattr(answers, "BatchGenerator", _generator(made, seen))
    conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    cache = ItemCache(tmp_path / "items.sqlite", "model")
    try:
        first = cached_answers(cache, FakeLlama(template), False, template, policy, conversations, 8)
        again = cached_answers(cache, FakeLlama(template), False, template, policy, conversations, 8)
        old_request = {"messages": conversations[0], "max_tokens": 8, "policy": policy}  # before stopped_on
        assert cache.get("answer", old_request) is None
    finally:
        cache.close()
    assert seen == [[["</s>"]] * 3]  # a tuned file stops at EOS text as the chat handler does; generated once
    assert first == again
    chatml_end = "end_of_turn" if template == CHATML else "other"
    assert [(a["stopped"], a["stopped_at"]) for a in first] == [
        (chatml_end == "end_of_turn", chatml_end), (eos_at == "end_of_turn", eos_at), (False, "max_tokens")]
