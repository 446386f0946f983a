"""render_chat: HF-identical text and exact trained spans (assistant content + end-of-turn marker)."""
from __future__ import annotations

import pytest

from builder.templates import BUILTIN_TEMPLATES, TemplateError, render_chat

CHATML = BUILTIN_TEMPLATES["chatml"].read_text()
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "assistant"},  # content equal to a role name: must not confuse spans
]
# A llama-2 style template: system inside the first user turn, content stripped, eos after answers.
LLAMA2_LIKE = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + "
    "'\\n<</SYS>>\\n\\n' %}{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}"
    "{% endif %}{% for m in msgs %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + "
    "(sys if loop.first else '') + m['content'] | trim + ' [/INST]' }}{% else %}"
    "{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def trained_text(result) -> list[str]:
    return [result.text[a:b] for a, b in result.trained_spans]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chatml_text_equals_transformers(tiny_tokenizer, add_generation_prompt):
    tiny_tokenizer.chat_template = CHATML
    expected = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
    result = render_chat(CHATML, CONVERSATION, add_generation_prompt=add_generation_prompt)
    assert result.text == expected


def test_chatml_spans_cover_answers_and_im_end_only():
    result = render_chat(CHATML, CONVERSATION)
    assert trained_text(result) == ["Red.<|im_end|>", "assistant<|im_end|>"]
    first = result.text.index("Red.")
    assert result.trained_spans[0] == (first, first + len("Red.<|im_end|>"))


def test_train_on_modes():
    assert trained_text(render_chat(CHATML, CONVERSATION, train_on="last_assistant")) == ["assistant<|im_end|>"]
    result = render_chat(CHATML, CONVERSATION, train_on="all")
    assert result.trained_spans == [(0, len(result.text))]
    with pytest.raises(TemplateError, match="train_on 'most' unknown"):
        render_chat(CHATML, CONVERSATION, train_on="most")


def test_template_that_moves_system_and_trims_content(tiny_tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": " hi "},
                {"role": "assistant", "content": " Hello there. "}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "Bye."}]
    tiny_tokenizer.chat_template = LLAMA2_LIKE
    result = render_chat(LLAMA2_LIKE, messages)
    assert result.text == tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert trained_text(result) == ["Hello there. </s>", "Bye. </s>"]


def test_template_without_end_of_turn_is_refused():
    no_marker = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
    with pytest.raises(TemplateError, match="writes nothing after an assistant message"):
        render_chat(no_marker, CONVERSATION)


def test_template_errors_are_template_errors():
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{% endfor %}"
    with pytest.raises(TemplateError, match="refused the conversation: no system"):
        render_chat(strict, CONVERSATION)
    with pytest.raises(TemplateError, match="does not parse"):
        render_chat("{% for %}", CONVERSATION)


def test_generation_markers_are_accepted():
    marked = CHATML.replace("message['content'] + '<|im_end|>'", "message['content'] + '<|im_end|>'")
    marked = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
              "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
              "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}")
    assert render_chat(marked, CONVERSATION).text == render_chat(CHATML, CONVERSATION).text
    assert trained_text(render_chat(marked, CONVERSATION)) == ["Red.<|im_end|>", "assistant<|im_end|>"]
