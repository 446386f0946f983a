"""Chat templates: HF-identical text, exact trained spans for any template, refusals, the sandbox,
tokens + labels, template checks and the Ollama Modelfile.

Texts are compared with transformers' apply_chat_template on the in-process tiny tokenizer; spans
with exact strings; a hypothesis property checks random conversations on every built-in template.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from helpers import ASSETS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.templates import (
    BUILTIN_TEMPLATES,
    TemplateError,
    append_eos,
    builtin_name,
    end_of_turn_marker,
    end_of_turn_markers,
    read_template,
    render_chat,
    saved_chat_template,
    special_tokens,
    stop_texts,
)
from builder.templates.checks import check_prefix_stable, check_template
from builder.templates.sandbox import render_template
from builder.templates.tokens import IGNORE_INDEX, label_tokens, tokenize_chat, tokenize_chats

CHATML = BUILTIN_TEMPLATES["chatml"].read_text()
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Blue."},
]
# Each built-in renders CONVERSATION (bos <s>, eos </s>) as exactly this, and trains exactly these.
GOLDEN = {
    "alpaca": ("Be brief.\n\n### Instruction:\nName a colour.\n\n### Response:\nRed.</s>\n\n### Instruction:\n"
               "Another?\n\n### Response:\nBlue.</s>", ["Red.</s>", "Blue.</s>"]),
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
               "<|im_start|>assistant\nRed.<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n"
               "<|im_start|>assistant\nBlue.<|im_end|>\n", ["Red.<|im_end|>", "Blue.<|im_end|>"]),
    "gemma": ("<s><start_of_turn>user\nBe brief.\n\nName a colour.<end_of_turn>\n<start_of_turn>model\nRed."
              "<end_of_turn>\n<start_of_turn>user\nAnother?<end_of_turn>\n<start_of_turn>model\nBlue.<end_of_turn>\n",
              ["Red.<end_of_turn>", "Blue.<end_of_turn>"]),
    "llama-2": ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a colour. [/INST] Red. </s><s>[INST] Another? "
                "[/INST] Blue. </s>", ["Red. </s>", "Blue. </s>"]),
    "llama-3": ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
                "<|end_header_id|>\n\nName a colour.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                "Red.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnother?<|eot_id|><|start_header_id|>"
                "assistant<|end_header_id|>\n\nBlue.<|eot_id|>", ["Red.<|eot_id|>", "Blue.<|eot_id|>"]),
    "mistral": ("<s>[INST] Be brief.\n\nName a colour. [/INST]Red.</s>[INST] Another? [/INST]Blue.</s>",
                ["Red.</s>", "Blue.</s>"]),
    "phi-3": ("<|system|>\nBe brief.<|end|>\n<|user|>\nName a colour.<|end|>\n<|assistant|>\nRed.<|end|>\n"
              "<|user|>\nAnother?<|end|>\n<|assistant|>\nBlue.<|end|>\n</s>", ["Red.<|end|>", "Blue.<|end|>"]),
    "qwen2.5": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
                "<|im_start|>assistant\nRed.<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n"
                "<|im_start|>assistant\nBlue.<|im_end|>\n", ["Red.<|im_end|>", "Blue.<|im_end|>"]),
    "vicuna": ("Be brief. USER: Name a colour. ASSISTANT: Red.</s>USER: Another? ASSISTANT: Blue.</s>",
               ["Red.</s>", "Blue.</s>"]),
    "zephyr": ("<|system|>\nBe brief.</s>\n<|user|>\nName a colour.</s>\n<|assistant|>\nRed.</s>\n<|user|>\n"
               "Another?</s>\n<|assistant|>\nBlue.</s>\n", ["Red.</s>", "Blue.</s>"]),
}
MARKERS = {"alpaca": "</s>", "chatml": "<|im_end|>", "gemma": "<end_of_turn>", "llama-2": " </s>",
           "llama-3": "<|eot_id|>", "mistral": "</s>", "phi-3": "<|end|>", "qwen2.5": "<|im_end|>",
           "vicuna": "</s>", "zephyr": "</s>"}
# Conversations that differ in shape: one turn without system, contents with edge whitespace, and
# contents that look like markup (a role name, an end-of-turn marker, a sentinel character).
SHAPES = {
    "one_turn": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    "system_two_turns": CONVERSATION,
    "whitespace": [{"role": "user", "content": "  padded  "}, {"role": "assistant", "content": "\n answer \n"},
                   {"role": "user", "content": "again"}, {"role": "assistant", "content": " x"}],
    "markup": [{"role": "system", "content": "user"}, {"role": "user", "content": "assistant"},
               {"role": "assistant", "content": "<|im_end|></s>\ue0001\ue001"}],
}
# A llama-2 style template written for these tests: system inside the first user turn, contents
# stripped, eos after answers.
LLAMA2_LIKE = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + "
    "'\\n<</SYS>>\\n\\n' %}{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}"
    "{% endif %}{% for m in msgs %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + "
    "(sys if loop.first else '') + m['content'] | trim + ' [/INST]' }}{% else %}"
    "{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def trained_text(result) -> list[str]:
    return [result.text[a:b] for a, b in result.trained_spans]


def hf_render(tokenizer, template: str, messages: list[dict], **kwargs) -> str:
    tokenizer.chat_template = template
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


# --- built-in templates -------------------------------------------------------------------------

def test_builtin_library_is_complete():
    assert sorted(BUILTIN_TEMPLATES) == sorted(GOLDEN)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_builtin_golden_text_and_spans(name):
    result = render_chat(BUILTIN_TEMPLATES[name].read_text(), CONVERSATION)
    assert (result.text, trained_text(result)) == GOLDEN[name]
    assert end_of_turn_marker(BUILTIN_TEMPLATES[name].read_text(), bos_token="<s>", eos_token="</s>") == MARKERS[name]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_render_chat_takes_a_builtin_name_for_its_source(name):
    source = BUILTIN_TEMPLATES[name].read_text()
    for train_on in ("all_assistant", "last_assistant"):
        by_name = render_chat(name, CONVERSATION, train_on=train_on)
        assert by_name == render_chat(source, CONVERSATION, train_on=train_on)
    by_keyword = render_chat(template_source=name, messages=CONVERSATION)  # the DESIGN's signature still holds
    assert (by_keyword.text, trained_text(by_keyword)) == GOLDEN[name]


def test_render_chat_refuses_a_name_that_is_no_builtin():
    with pytest.raises(TemplateError) as refused:
        render_chat("chatmlx", CONVERSATION)
    assert str(refused.value) == ("no built-in template 'chatmlx'; render_chat takes Jinja source or one of "
                                  + ", ".join(sorted(BUILTIN_TEMPLATES)))


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_builtin_text_equals_transformers(tiny_tokenizer, name, shape, add_generation_prompt):
    template, messages = BUILTIN_TEMPLATES[name].read_text(), SHAPES[shape]
    expected = hf_render(tiny_tokenizer, template, messages, add_generation_prompt=add_generation_prompt)
    result = render_chat(template, messages, add_generation_prompt=add_generation_prompt)
    assert result.text == expected
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(result.trained_spans) == len(answers)
    for (start, end), answer in zip(result.trained_spans, answers):
        assert result.text[start:end].endswith(MARKERS[name].lstrip())
        assert result.text[start:end - len(MARKERS[name])] in (answer, answer.strip())


@pytest.mark.parametrize("name", ["chatml", "llama-3", "gemma", "phi-3", "zephyr", "qwen2.5", "vicuna"])
def test_generation_prompt_is_what_inference_appends(name):
    template = BUILTIN_TEMPLATES[name].read_text()
    prompt = render_chat(template, CONVERSATION[:4], add_generation_prompt=True).text
    full = render_chat(template, CONVERSATION).text
    # What follows the prompt is the answer (vicuna's model writes the space after "ASSISTANT:").
    assert full.startswith(prompt) and full[len(prompt):].removeprefix(" ").startswith("Blue.")


def test_qwen25_default_system_and_tools(tiny_tokenizer):
    template = BUILTIN_TEMPLATES["qwen2.5"].read_text()
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Time?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}]},
                {"role": "tool", "content": "12:00"}, {"role": "tool", "content": "noon"},
                {"role": "assistant", "content": "It is noon."}]
    result = render_chat(template, messages, train_on="last_assistant", tools=tools)
    assert result.text == hf_render(tiny_tokenizer, template, messages, tools=tools)
    assert result.text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                                  "assistant.\n\n# Tools\n\n")
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
            '<|im_end|>\n<|im_start|>user\n<tool_response>\n12:00\n</tool_response>\n<tool_response>\nnoon\n'
            '</tool_response><|im_end|>\n') in result.text
    assert trained_text(result) == ["It is noon.<|im_end|>"]
    with pytest.raises(TemplateError, match="no text content") as err:
        render_chat(template, messages, tools=tools)  # all_assistant would train a tool call
    assert err.value.reason == "dropped_message"


def test_read_template_builtin_file_and_base(tmp_path):
    assert read_template("llama-3", tmp_path, tmp_path) == BUILTIN_TEMPLATES["llama-3"].read_text()
    (tmp_path / "mine.jinja").write_text("{{ messages }}")
    assert read_template("mine.jinja", tmp_path, tmp_path) == "{{ messages }}"
    with pytest.raises(TemplateError, match="base tokenizer has no chat_template"):
        read_template("base", tmp_path, tmp_path)
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named, "bos_token": "<s>",
                                                                 "eos_token": {"content": "</s>"}}))
    assert read_template("base", tmp_path, tmp_path) == "D" == saved_chat_template(tmp_path)
    assert special_tokens(tmp_path) == {"bos_token": "<s>", "eos_token": "</s>"}
    assert builtin_name(CHATML) == "chatml" and builtin_name("{{ x }}") is None


# --- spans on templates that move, trim or rewrite content -----------------------------------------

def test_chatml_spans_cover_answers_and_im_end_only():
    result = render_chat(CHATML, CONVERSATION[:4] + [{"role": "assistant", "content": "assistant"}])
    assert trained_text(result) == ["Red.<|im_end|>", "assistant<|im_end|>"]
    first = result.text.index("Red.")
    assert result.trained_spans[0] == (first, first + len("Red.<|im_end|>"))


def test_train_on_modes():
    assert trained_text(render_chat(CHATML, CONVERSATION, train_on="last_assistant")) == ["Blue.<|im_end|>"]
    result = render_chat(CHATML, CONVERSATION, train_on="all")
    assert result.trained_spans == [(0, len(result.text))]
    assert render_chat(CHATML, CONVERSATION[:2]).trained_spans == []  # nothing to train: no answer
    with pytest.raises(TemplateError, match="train_on 'most' unknown"):
        render_chat(CHATML, CONVERSATION, train_on="most")


def test_template_that_moves_system_and_trims_content(tiny_tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": " hi "},
                {"role": "assistant", "content": " Hello there. "}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "Bye."}]
    result = render_chat(LLAMA2_LIKE, messages)
    assert result.text == hf_render(tiny_tokenizer, LLAMA2_LIKE, messages)
    assert trained_text(result) == ["Hello there. </s>", "Bye. </s>"]


def test_template_with_end_of_conversation_token_trains_the_turn_marker_only():
    # Phi-3 style: <|end|> closes every turn and eos ends the conversation: the marker is <|end|>.
    template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
    assert trained_text(render_chat(template, CONVERSATION)) == ["Red.<|end|>", "Blue.<|end|>"]


def test_template_that_branches_on_content_falls_back_to_search(tiny_tokenizer):
    # History answers lose their <think> part: contents are found by search, in skeleton order.
    template = ("{% for m in messages %}{% set c = m['content'] %}{% if m['role'] == 'assistant' and not loop.last "
                "and '</think>' in c %}{% set c = c.split('</think>')[-1] | trim %}{% endif %}"
                "{{ '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}{% endfor %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>x</think> b"},
                {"role": "user", "content": "assistant"}, {"role": "assistant", "content": "<think>y</think>d"}]
    result = render_chat(template, messages, train_on="last_assistant")
    assert result.text == hf_render(tiny_tokenizer, template, messages)
    assert trained_text(result) == ["<think>y</think>d<|im_end|>"]
    with pytest.raises(TemplateError, match="message 1 \\(assistant\\) does not appear") as err:
        render_chat(template, messages)  # the rewritten history answer cannot be trained as given
    assert err.value.reason == "dropped_message"


def test_template_that_writes_bos_and_generation_markers(tiny_tokenizer):
    template = (ASSETS / "chatml_generation.jinja").read_text()
    result = render_chat(template, CONVERSATION, bos_token="<s>")
    assert result.text == hf_render(tiny_tokenizer, template, CONVERSATION)
    assert result.text.startswith("<s><|im_start|>system")
    assert trained_text(result) == ["Red.<|im_end|>", "Blue.<|im_end|>"]


def test_generation_markers_give_the_same_token_mask_as_transformers(tiny_tokenizer):
    """On a template whose {% generation %} blocks hold content + <|im_end|>, our labels and HF's
    return_assistant_tokens_mask agree token for token."""
    template = (ASSETS / "chatml_generation.jinja").read_text()
    tiny_tokenizer.chat_template = template
    hf = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ours = tokenize_chat(template, CONVERSATION, tiny_tokenizer)
    assert ours.input_ids == list(hf["input_ids"])
    assert [int(label != IGNORE_INDEX) for label in ours.labels] == list(hf["assistant_masks"])


def test_template_that_opens_the_next_turn_after_the_last_answer_does_not_train_the_opener(tiny_tokenizer):
    # Like Llama-3's first release: the assistant header is written after every conversation,
    # whatever add_generation_prompt says. The opener must not become part of the marker.
    template = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
                " + m['content'] + '<|eot_id|>' }}{% endfor %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")
    result = render_chat(template, CONVERSATION)
    assert result.text == hf_render(tiny_tokenizer, template, CONVERSATION)
    assert trained_text(result) == ["Red.<|eot_id|>", "Blue.<|eot_id|>"]
    assert end_of_turn_marker(template, bos_token="<s>") == "<|eot_id|>"


def test_closer_shared_with_a_default_system_turn_is_kept_through_eos():
    # Like Command-R7B: a default preamble turn closes with the same token (EOS) as answers, which
    # close with <|END_RESPONSE|><|END_OF_TURN|>; the opener of the next turn is always written.
    template = ("{{ '<|START|><|SYSTEM|>Default preamble.<|END_OF_TURN|>' }}{% for m in messages %}"
                "{% if m['role'] == 'user' %}{{ '<|START|><|USER|>' + m['content'] + '<|END_OF_TURN|>' }}"
                "{% elif m['role'] == 'assistant' %}{{ '<|START|><|BOT|><|RESPONSE|>' + m['content'] + "
                "'<|END_RESPONSE|><|END_OF_TURN|>' }}{% endif %}{% endfor %}{{ '<|START|><|BOT|>' }}")
    result = render_chat(template, CONVERSATION[1:], eos_token="<|END_OF_TURN|>")
    assert trained_text(result) == ["Red.<|END_RESPONSE|><|END_OF_TURN|>", "Blue.<|END_RESPONSE|><|END_OF_TURN|>"]


def test_answers_closed_differently_in_history_and_at_the_end():
    # Like gpt-oss: history answers end with <|end|>, the final answer with <|return|>, unless a
    # generation prompt follows it (then it is history too).
    template = ("{{ '<|start|>system<|message|>Default.<|end|>' }}{% for m in messages %}{{ '<|start|>' + m['role'] + "
                "'<|message|>' + m['content'] }}{% if m['role'] == 'assistant' and loop.last and not "
                "add_generation_prompt %}{{ '<|return|>' }}{% else %}{{ '<|end|>' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}")
    messages = CONVERSATION[1:]
    assert trained_text(render_chat(template, messages)) == ["Red.<|end|>", "Blue.<|return|>"]
    assert trained_text(render_chat(template, messages, add_generation_prompt=True)) == ["Red.<|end|>", "Blue.<|end|>"]
    assert end_of_turn_marker(template) == "<|return|>"


def test_reasoning_is_offered_under_both_names_as_transformers_does(tiny_tokenizer):
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m.thinking is defined %}"
                "{{ '<think>' + m.thinking + '</think>' }}{% endif %}{{ m['content'] + '<|im_end|>\n' }}{% endfor %}")
    for field in ("reasoning_content", "thinking", "reasoning"):
        messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4.", field: "add"}]
        result = render_chat(template, messages)
        assert result.text == hf_render(tiny_tokenizer, template, messages)
        assert "<think>add</think>" in result.text and trained_text(result) == ["4.<|im_end|>"]


def test_a_tokenizer_without_bos_gets_no_made_up_bos(tiny_tokenizer):
    from transformers import PreTrainedTokenizerFast

    no_bos = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="</s>")
    assert no_bos.bos_token is None
    template, messages = BUILTIN_TEMPLATES["llama-3"].read_text(), CONVERSATION[1:3]
    chat = tokenize_chat(template, messages, no_bos)
    assert chat.text == hf_render(no_bos, template, messages) and not chat.text.startswith("<s>")
    with pytest.raises(TemplateError):  # as transformers: a template that needs bos_token fails without one
        tokenize_chat(BUILTIN_TEMPLATES["llama-2"].read_text(), messages, no_bos)


def test_tool_call_answers_without_text_are_refused_with_the_reason():
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "w", "arguments": {}}}]}]
    with pytest.raises(TemplateError, match="tool calls alone cannot be trained yet") as err:
        render_chat(CHATML, messages)
    assert err.value.reason == "dropped_message"


# Older instruct formats write no end-of-turn token: turns are separated by a blank line and the
# next role's header, and (the second) maybe an EOS at the very end of the conversation.
NO_EOT = {
    "headers": ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
                "{% elif m['role'] == 'user' %}{{ '### User: ' + m['content'] + '\\n\\n' }}"
                "{% else %}{{ '### Assistant: ' + m['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '### Assistant: ' }}{% endif %}"),
    "eos_at_end": "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}{{ eos_token }}",
}


@pytest.mark.parametrize("name", sorted(NO_EOT))
def test_template_without_end_of_turn_renders_hf_text_and_trains_content_and_separator(tiny_tokenizer, name):
    template = NO_EOT[name]
    eos = tiny_tokenizer.eos_token
    result = render_chat(template, CONVERSATION, bos_token=None, eos_token=eos)
    assert result.text == hf_render(tiny_tokenizer, template, CONVERSATION)
    markers = end_of_turn_markers(template, bos_token=None, eos_token=eos)
    assert not markers.has_token
    if name == "headers":
        assert (markers.middle, markers.final, markers.opener) == ("\n\n", "\n\n", "### User:")
        assert trained_text(result) == ["Red.\n\n", "Blue.\n\n"]
        assert [result.text[:e][-5:] for e in result.turn_ends] == [" Red.", "Blue."]
        assert stop_texts(template, "append_eos", eos_token=eos) == [eos]
        assert stop_texts(template, "keep", eos_token=eos) == ["### User:"]
    else:  # the last answer keeps the template's own closing EOS; only the earlier one needs one
        assert trained_text(result) == ["Red.\n", f"Blue.\n{eos}"]
        assert len(result.turn_ends) == 1
    appended = append_eos(result, eos)
    assert appended.text.count(eos) == 2  # every answer now ends with exactly one EOS
    assert all(appended.text[a:b] == eos for a, b in appended.appended)
    assert all(text.rstrip().endswith(eos) for text in trained_text(appended))
    assert appended.text.replace(eos, "", len(appended.appended)) == result.text


def test_append_eos_moves_later_spans_and_leaves_closed_templates_alone():
    template = NO_EOT["headers"]
    result = render_chat(template, CONVERSATION, eos_token="</s>")
    appended = append_eos(result, "</s>")
    assert trained_text(appended) == ["Red.</s>\n\n", "Blue.</s>\n\n"]
    chatml = render_chat(CHATML, CONVERSATION)
    assert chatml.turn_ends == () and append_eos(chatml, "</s>") == chatml


def test_tokenized_no_end_of_turn_policy_trains_the_eos_token(tiny_tokenizer):
    template = NO_EOT["headers"]
    eos_id = tiny_tokenizer.eos_token_id
    chat = tokenize_chat(template, CONVERSATION, tiny_tokenizer)
    trained = [t for t in chat.labels if t != IGNORE_INDEX]
    assert trained.count(eos_id) == 2
    kept = tokenize_chat(template, CONVERSATION, tiny_tokenizer, no_end_of_turn="keep")
    assert eos_id not in kept.input_ids and kept.text == hf_render(tiny_tokenizer, template, CONVERSATION)


def test_template_that_drops_a_role_is_refused():
    ignores_system = ("{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'] + ': ' + m['content'] + "
                      "eos_token }}{% endif %}{% endfor %}")
    assert trained_text(render_chat(ignores_system, CONVERSATION[1:])) == ["Red.</s>", "Blue.</s>"]
    with pytest.raises(TemplateError, match="message 0 \\(system\\) does not appear") as err:
        render_chat(ignores_system, CONVERSATION)
    assert err.value.reason == "dropped_message"


def test_template_errors_are_template_errors():
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
              "{% endfor %}")
    with pytest.raises(TemplateError, match="refused the conversation: no system"):
        render_chat(strict, CONVERSATION)
    with pytest.raises(TemplateError, match="does not parse"):
        render_chat("{% for %}", CONVERSATION)
    with pytest.raises(TemplateError, match="TypeError"):
        render_chat("{{ 'a' + 1 }}", CONVERSATION)


# --- hypothesis: spans never touch user/system content and always cover the answers ----------------

PIECES = ["a", "b", " ", "  ", "\n", "\t", "<", ">", "|", "/", "[INST]", "</s>", "<|im_end|>", "<end_of_turn>",
          "user", "assistant", "\ue0001\ue001", "§"]
text_pieces = st.lists(st.sampled_from(PIECES), max_size=6).map("".join)


@st.composite
def conversations(draw) -> list[dict]:
    messages = [{"role": "system", "content": draw(text_pieces)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(text_pieces)})
        messages.append({"role": "assistant", "content": draw(text_pieces.filter(lambda t: t.strip()))})
    return messages


def _masked(messages: list[dict], which, char: str) -> list[dict]:
    # Same length and whitespace, so trimming templates trim the same characters.
    return [{**m, "content": re.sub(r"\S", char, m["content"])} if which(i, m) else m for i, m in enumerate(messages)]


@pytest.mark.parametrize("name", sorted(GOLDEN))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations(), last_only=st.booleans())
def test_spans_never_cover_user_or_system_and_always_cover_answers(tiny_tokenizer, name, messages, last_only):
    template = BUILTIN_TEMPLATES[name].read_text()
    result = render_chat(template, messages, train_on="last_assistant" if last_only else "all_assistant")
    assert result.text == hf_render(tiny_tokenizer, template, messages)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained_answers = answers[-1:] if last_only else answers
    others = render_chat(template, _masked(messages, lambda i, m: m["role"] != "assistant", "\u2400"),
                         train_on="all").text
    covered = render_chat(template, _masked(messages, lambda i, m: i in trained_answers, "\u2401"),
                          train_on="all").text
    assert len(others) == len(covered) == len(result.text)
    trained = {i for start, end in result.trained_spans for i in range(start, end)}
    assert not any(others[i] == "\u2400" for i in trained)  # no user or system character
    assert {i for i, ch in enumerate(covered) if ch == "\u2401"} <= trained  # every trained answer character
    assert len(result.trained_spans) == len(trained_answers)
    assert all(result.text[:end].endswith(MARKERS[name].lstrip()) for _, end in result.trained_spans)


# --- sandbox --------------------------------------------------------------------------------------

@pytest.mark.parametrize("template,message", [
    ("{% for a in range(1000) %}{% for b in range(1000) %}{% for c in range(1000) %}{% endfor %}{% endfor %}"
     "{% endfor %}", "loops more than"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "more than"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "more than"),
    ("{{ 'x' * 100000000 }}", "more than"),
    ("{{ 'x' | center(1000000000) }}", "passes 1000000000"),
    ("{{ 2 ** 100000000 }}", "power"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "refused the conversation"),
    ("{% set ns = namespace(_private=1) %}", "underscore"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses"),
])
def test_sandbox_refuses_hostile_templates(template, message):
    with pytest.raises(TemplateError, match=message):
        render_template(template, {"messages": []})


def test_sandbox_keeps_loop_semantics():
    template = ("{% for m in messages if m != 'b' %}{{ loop.index }}/{{ loop.length }}{{ m }}"
                "{% if not loop.last %},{% endif %}{% endfor %}")
    assert render_template(template, {"messages": ["a", "b", "c"]})[0] == "1/2a,2/2c"
    assert render_template("{% for x in range(3) %}{% if x == 1 %}{% break %}{% endif %}{{ x }}{% endfor %}",
                           {})[0] == "0"


# --- tokens and labels ----------------------------------------------------------------------------

def test_label_tokens_trains_only_tokens_inside_spans():
    ids, offsets = [10, 11, 12, 13, 14], [(0, 2), (2, 4), (4, 6), (6, 8), (8, 8)]
    assert label_tokens(ids, offsets, [(2, 6)]) == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, IGNORE_INDEX]
    assert label_tokens(ids, offsets, [(3, 8)]) == [IGNORE_INDEX, IGNORE_INDEX, 12, 13, IGNORE_INDEX]


def test_tokenize_chat_builds_ids_and_labels_together(tiny_tokenizer):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello world."}]
    chat = tokenize_chat(CHATML, messages, tiny_tokenizer)
    assert chat.input_ids == tiny_tokenizer(chat.text, add_special_tokens=False)["input_ids"]
    trained = [t for t, label in zip(chat.input_ids, chat.labels) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(trained) == "Hello world.<|im_end|>"
    assert trained[-1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") and chat.trained_tokens == len(trained)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(chat.input_ids, chat.labels))


def test_tokenize_chat_refuses_double_bos_and_untrained_examples(tiny_tokenizer):
    doubled = "{{ bos_token }}" + (ASSETS / "chatml_generation.jinja").read_text()
    with pytest.raises(TemplateError, match="two BOS tokens") as err:
        tokenize_chat(doubled, CONVERSATION, tiny_tokenizer)
    assert err.value.reason == "double_bos"
    with pytest.raises(TemplateError, match="no assistant message") as err:
        tokenize_chat(CHATML, CONVERSATION[:2], tiny_tokenizer)
    assert err.value.reason == "no_trained_tokens"
    prompt = tokenize_chat(CHATML, CONVERSATION[:2], tiny_tokenizer, add_generation_prompt=True)
    assert prompt.text.endswith("<|im_start|>assistant\n") and prompt.trained_tokens == 0


def test_tokenize_chats_batches_and_returns_refusals_in_place(tiny_tokenizer):
    no_system = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
                 "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}")
    batch = [CONVERSATION[1:], CONVERSATION, CONVERSATION[1:2]]
    first, refused, untrained = tokenize_chats(no_system, batch, tiny_tokenizer)
    assert first == tokenize_chat(no_system, CONVERSATION[1:], tiny_tokenizer)
    assert tiny_tokenizer.decode([t for t, label in zip(first.input_ids, first.labels) if label != IGNORE_INDEX]) == \
        "Red.<|im_end|>Blue.<|im_end|>"
    assert (refused.reason, untrained.reason) == ("template_error", "no_trained_tokens")
    assert tokenize_chats(CHATML, [], tiny_tokenizer) == []


# --- template checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_every_builtin_passes_the_template_checks(name):
    report = check_template(BUILTIN_TEMPLATES[name].read_text(), with_system=True)
    assert report.end_of_turn == MARKERS[name].strip()


def test_check_template_reports_what_inference_needs():
    chatml = check_template(CHATML)
    assert (chatml.end_of_turn, chatml.generation_prompt, chatml.writes_bos) == (
        "<|im_end|>", "<|im_start|>assistant\n", False)
    llama2 = check_template(BUILTIN_TEMPLATES["llama-2"].read_text())
    assert (llama2.end_of_turn, llama2.generation_prompt, llama2.writes_bos) == ("</s>", "", True)
    phi3 = check_template(BUILTIN_TEMPLATES["phi-3"].read_text())
    assert phi3.generation_prompt == "<|assistant|>\n"
    assert check_template((ASSETS / "chatml_generation.jinja").read_text()).generation_markers


def test_not_prefix_stable_template_is_refused_for_multi_turn_training():
    # The generation prompt has an extra newline the training text does not have after the header.
    unstable = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n\\n' }}{% endif %}")
    with pytest.raises(TemplateError, match="not prefix-stable at message 2") as err:
        check_prefix_stable(unstable, CONVERSATION)
    assert err.value.reason == "not_prefix_stable"
    with pytest.raises(TemplateError, match="not prefix-stable at message 1"):
        check_template(unstable)
    check_prefix_stable(CHATML, CONVERSATION)
    check_prefix_stable(LLAMA2_LIKE, CONVERSATION)  # the answer's leading space is generated, not prompted


def test_check_template_refuses_a_template_that_rejects_the_system_role():
    no_system = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                 "supported') }}{% endif %}{{ m['content'] + eos_token }}{% endfor %}")
    assert check_template(no_system).end_of_turn == "</s>"
    with pytest.raises(TemplateError, match="System role not supported"):
        check_template(no_system, with_system=True)


# --- Ollama Modelfile ------------------------------------------------------------------------------

def test_modelfile_for_chatml_is_exact():
    from builder.export.modelfile import render_modelfile

    assert render_modelfile("model-q8_0.gguf", CHATML, "<s>", "</s>", add_bos=False) == (
        "# Ollama Modelfile written by tunefile; use it with `ollama create NAME -f Modelfile`.\n"
        "FROM ./model-q8_0.gguf\n"
        "# TEMPLATE: the built-in `chatml` chat template, as trained, in Ollama's syntax.\n"
        'TEMPLATE """{{- range $i, $_ := .Messages }}\n'
        "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
        "<|im_start|>{{ .Role }}\n"
        '{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>\n'
        "{{ end }}\n"
        '{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant\n'
        "{{ end }}\n"
        '{{- end }}"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'PARAMETER stop "<|im_start|>"\n'
        'PARAMETER stop "</s>"\n')


def test_modelfile_for_a_custom_template_quotes_it_and_sets_stops(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    from builder.export.modelfile import write_modelfile

    template = (ASSETS / "user_turns.jinja").read_text()
    path = tmp_path / "model-q4_k_m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_chat_template(template)
    writer.add_token_list(["<s>", "</s>", "<|end|>", "a"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    text = write_modelfile(path).read_text()
    assert text.startswith("# Ollama Modelfile written by tunefile; use it with `ollama create NAME -f Modelfile`.\n"
                           "FROM ./model-q4_k_m.gguf\n# TEMPLATE: not converted.")
    assert "\n".join(f"#   {line}".rstrip() for line in template.splitlines()) in text
    assert text.endswith('PARAMETER stop "<|end|>"\nPARAMETER stop "</s>"\n')


@pytest.mark.e2e
# CI (.ci/run) installs Debian's golang, so there a missing `go` is a failure, not a skip.
@pytest.mark.skipif(shutil.which("go") is None and os.environ.get("CI") != "true",
                    reason="needs a Go toolchain to run Go's text/template (apt-get install golang)")
@pytest.mark.parametrize("add_bos", [False, True])
def test_ollama_templates_render_like_the_jinja_ones(tmp_path, add_bos):
    """Every built-in's Go template, run by Go's text/template as Ollama runs it, gives the Jinja
    template's inference prompt (add_generation_prompt) for conversations with and without system."""
    from builder.export.modelfile import OLLAMA_TEMPLATES, go_template

    (tmp_path / "go.mod").write_text("module render\ngo 1.19\n")
    (tmp_path / "main.go").write_text((ASSETS / "render_go_template.go").read_text())
    subprocess.run(["go", "build", "-o", "render", "."], cwd=tmp_path, check=True, capture_output=True)
    prompts = [CONVERSATION[1:2], CONVERSATION[:2], CONVERSATION[:4], SHAPES["one_turn"] + CONVERSATION[3:4]]
    assert sorted(OLLAMA_TEMPLATES) == sorted(GOLDEN)
    for name in OLLAMA_TEMPLATES:
        for messages in prompts:
            jinja = render_chat(BUILTIN_TEMPLATES[name].read_text(), messages, add_generation_prompt=True).text
            expected = jinja[len("<s>"):] if add_bos and jinja.startswith("<s>") else jinja
            system = messages[0]["content"] if messages[0]["role"] == "system" else ""
            request = {"Template": go_template(name, "<s>", "</s>", add_bos), "System": system,
                       "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
            done = subprocess.run([str(tmp_path / "render")], input=json.dumps(request), capture_output=True,
                                  text=True, check=True)
            assert done.stdout == expected, (name, messages)


# --- fast paths: substitution rendering and flat-array labels ------------------------------------

def test_substitution_is_used_only_where_proven_and_gives_jinja_text(tiny_tokenizer):
    from builder.templates.substitute import substituted

    variables = {"bos_token": "<s>", "eos_token": "</s>", "add_generation_prompt": False}
    opaque = substituted(CHATML, CONVERSATION, variables)
    assert opaque is not None and opaque[0] == hf_render(tiny_tokenizer, CHATML, CONVERSATION)
    branches = ("{% for m in messages %}{% if m['content'].startswith('N') %}[N]{% endif %}"
                "{{ m['role'] + ': ' + m['content'] + '</s>' }}{% endfor %}")
    trims = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | trim + '</s>' }}{% endfor %}"
    dumps = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | tojson + '</s>' }}{% endfor %}"
    measures = "{% for m in messages %}{% if m['content'] %}{{ m['content'] + '</s>' }}{% endif %}{% endfor %}"
    for template in (branches, trims, dumps, measures):
        assert substituted(template, CONVERSATION, variables) is None, template
        assert render_chat(template, CONVERSATION).text == hf_render(tiny_tokenizer, template, CONVERSATION)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_batch_labels_equal_the_per_row_path(tiny_tokenizer, name):
    """tokenize_batch (the dataset path: char-to-token ranges into flat arrays) gives exactly the
    ids, labels and refusals of tokenize_chats (offsets, one row at a time)."""
    from builder.templates.tokens import tokenize_batch

    template = BUILTIN_TEMPLATES[name].read_text()
    conversations = [CONVERSATION, SHAPES["one_turn"], SHAPES["whitespace"], SHAPES["markup"],
                     [{"role": "user", "content": "Ünïcödé ✓ 北京?"},
                      {"role": "assistant", "content": "Ça va 😀 中文."}],
                     [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]]
    chats = tokenize_chats(template, conversations, tiny_tokenizer)
    batch, rows = tokenize_batch(template, conversations, tiny_tokenizer)
    for chat, row in zip(chats, rows):
        if isinstance(chat, TemplateError):
            assert isinstance(row, TemplateError) and (row.reason, str(row)) == (chat.reason, str(chat))
            continue
        start, stop = batch.bounds[row], batch.bounds[row + 1]
        assert batch.ids[start:stop].tolist() == chat.input_ids
        assert batch.labels[start:stop].tolist() == chat.labels
        assert batch.texts[row] == chat.text


def test_batch_path_without_a_rust_backend_matches_the_fast_one(tiny_tokenizer):
    """A tokenizer with no backend_tokenizer (a slow one) takes the per-row fallback of
    tokenize_batch: the same ids, labels and refusals as the char-to-token path."""
    from builder.templates.tokens import tokenize_batch

    class Slow:  # what a slow HF tokenizer offers: __call__ with offsets, special tokens, BOS id
        bos_token_id = tiny_tokenizer.bos_token_id
        special_tokens_map = tiny_tokenizer.special_tokens_map

        def __call__(self, *args, **kwargs):
            return tiny_tokenizer(*args, **kwargs)

    conversations = [CONVERSATION, SHAPES["markup"],
                     [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]]
    fast, fast_rows = tokenize_batch(CHATML, conversations, tiny_tokenizer)
    slow, slow_rows = tokenize_batch(CHATML, conversations, Slow())
    assert [type(r) for r in slow_rows] == [type(r) for r in fast_rows]
    assert slow.ids.tolist() == fast.ids.tolist() and slow.labels.tolist() == fast.labels.tolist()
    assert slow.bounds.tolist() == fast.bounds.tolist() and slow.texts == fast.texts
