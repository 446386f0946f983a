"""llama.cpp helpers (builder/llm/llama.py) on the tiny random Llama GGUF `tunefile doctor` writes
(a 1-layer model, 266 tokens, in a fraction of a second): token texts, the chat prompt, batched
scoring against one sequence at a time, and batched greedy generation against create_completion."""
from __future__ import annotations

import math

import numpy as np
import pytest

from builder.export.doctor import write_tiny_gguf
from builder.llm.llama import BatchGenerator, BatchScorer, format_chat, log_softmax_rows, token_text

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    import llama_cpp

    path = tmp_path_factory.mktemp("tiny") / "tiny-f16.gguf"
    write_tiny_gguf(path)
    model = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, seed=0, verbose=False)
    yield model
    model.close()


def test_log_softmax_rows_normalises_each_row():
    rows = log_softmax_rows([[0.0, 0.0], [0.0, math.log(3.0)], [1000.0, 0.0]])
    assert rows.dtype == np.float64
    expected = [math.log(0.5), math.log(0.5), math.log(0.25), math.log(0.75), 0.0, -1000.0]
    assert rows.ravel().tolist() == pytest.approx(expected, rel=1e-12)


def test_token_text_of_special_tokens_and_of_no_token(llm):
    assert (llm.token_bos(), llm.token_eos()) == (1, 2)
    assert [token_text(llm, 1), token_text(llm, 2), token_text(llm, -1)] == ["<s>", "</s>", ""]


def test_format_chat_renders_the_template_and_leaves_bos_to_it(llm):
    messages = [{"role": "user", "content": "hello world"}]
    prompt, tokens = format_chat(llm, TEMPLATE, messages, add_generation_prompt=True)
    assert prompt == "<s>user: hello world\nassistant:"
    assert tokens == llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    assert tokens[:2].count(1) == 1  # the template's BOS, not a second one
    assert format_chat(llm, TEMPLATE, messages, add_generation_prompt=False)[0] == "<s>user: hello world\n"
    edited, _ = format_chat(llm, TEMPLATE, messages, add_generation_prompt=False, edit=lambda text: text + "</s>")
    assert edited == "<s>user: hello world\n</s>"


def _one_at_a_time(llm, tokens: list[int], first: int) -> tuple[float, bool]:
    llm.reset()
    llm.eval(tokens)
    rows = log_softmax_rows(llm.scores[first - 1:len(tokens) - 1])
    targets = np.asarray(tokens[first:])
    return float(rows[np.arange(len(targets)), targets].sum()), bool((rows.argmax(axis=1) == targets).all())


def test_batch_scores_are_the_scores_one_sequence_at_a_time(llm):
    requests = [(llm.tokenize(b"hello world the sun", add_bos=True), 2), (llm.tokenize(b"a rain is", add_bos=True), 1),
                (llm.tokenize(b"hello", add_bos=True), 1)]
    scorer = BatchScorer(llm)
    try:
        batched = scorer.score(requests)
    finally:
        scorer.close()
    for (logprob, greedy), (tokens, first) in zip(batched, requests):
        alone, alone_greedy = _one_at_a_time(llm, tokens, first)
        assert logprob == pytest.approx(alone, rel=1e-4) and greedy == alone_greedy


def test_batch_generation_is_greedy_completion_and_cuts_at_a_stop_text(llm):
    prompts = [llm.tokenize(b"hello world", add_bos=True), llm.tokenize(b"the sun is", add_bos=True)]
    generator = BatchGenerator(llm)
    try:
        made = generator.generate(prompts, [[], []], max_tokens=4)
        too_long = generator.generate([[1] * (generator.capacity + 1)], [[]], max_tokens=4)
        first_text = made[1]["text"][:3]
        stopped = generator.generate([prompts[1]], [[first_text]], max_tokens=4)
    finally:
        generator.close()
    for prompt, result in zip(prompts, made):
        llm.reset()
        out = llm.create_completion(prompt, max_tokens=4, temperature=0.0, seed=0)
        stopped_on = result.pop("stopped_on")  # what create_completion does not say
        assert result == {"text": out["choices"][0]["text"], "tokens": out["usage"]["completion_tokens"],
                          "stopped": out["choices"][0]["finish_reason"] == "stop"}
        assert stopped_on == (token_text(llm, llm.token_eos()) if result["stopped"] else None)
    assert too_long == [{"text": "", "tokens": 0, "stopped": False, "stopped_on": None}]  # longer than the context
    assert stopped[0]["stopped"] and stopped[0]["text"] == "" and stopped[0]["tokens"] < 4
    assert stopped[0]["stopped_on"] == first_text  # the stop text it was cut at
