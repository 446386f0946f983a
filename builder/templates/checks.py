"""Checks that catch a wrong template before slow work starts, and per example where it matters.

    report = check_template(source, bos_token="<s>", eos_token="</s>", train_on="all_assistant",
                            with_system=True)       # once per dataset build: raises TemplateError
    check_prefix_stable(source, messages, ...)      # per example: the inference prompt of every
                                                    # trained answer is the text it was trained after
"""
from __future__ import annotations

from dataclasses import dataclass

from builder.templates.errors import TemplateError
from builder.templates.sandbox import has_generation_markers, render_template
from builder.templates.spans import (
    TRAIN_ON,
    common_start,
    content_positions,
    end_of_turn_marker,
    plain_messages,
    render_chat,
    template_variables,
)

PROBE = [
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green."},
]
PROBE_SYSTEM = {"role": "system", "content": "Answer in one word."}


@dataclass(frozen=True)
class TemplateReport:
    end_of_turn: str          # what closes an assistant turn, e.g. "<|im_end|>" (the stop token)
    generation_prompt: str    # what add_generation_prompt writes after a user turn instead of the
                              # end of a conversation ("" if nothing)
    writes_bos: bool          # the text starts with bos_token (the tokenizer must not add another)
    generation_markers: bool  # the template has {% generation %} blocks


def _render(source: str, messages: list[dict], variables: dict, add_generation_prompt: bool) -> str:
    return render_template(source, {**variables, "messages": messages,
                                    "add_generation_prompt": add_generation_prompt})[0]


def check_prefix_stable(template_source: str, messages: list[dict], bos_token: str | None = "<s>",
                        eos_token: str | None = "</s>", train_on: str = "all_assistant", **extra) -> None:
    """Raise TemplateError (reason not_prefix_stable) unless, for every trained assistant message,
    rendering the conversation before it with add_generation_prompt gives exactly the text that
    precedes it in the training render: what the model sees at inference is what it learnt after.
    Costs one render per trained answer."""
    if train_on not in TRAIN_ON:
        raise TemplateError(f"train_on '{train_on}' unknown; allowed: {', '.join(TRAIN_ON)}")
    messages = plain_messages(messages)
    variables = template_variables(bos_token, eos_token, False, extra)
    text = _render(template_source, messages, variables, False)
    positions = content_positions(template_source, messages, text, variables)
    trained = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if train_on == "last_assistant":
        trained = trained[-1:]
    for i in trained:
        if not positions[i]:
            continue  # render_chat reports the missing answer itself
        prompt = _render(template_source, messages[:i], variables, True)
        start = positions[i][0][0]
        if not (len(prompt) <= start and text.startswith(prompt)):
            at = next((k for k, (a, b) in enumerate(zip(prompt, text)) if a != b), min(len(prompt), len(text)))
            raise TemplateError(
                f"the template is not prefix-stable at message {i}: the inference prompt for it differs from "
                f"the text it is trained after, from character {at} (prompt {prompt[at:at + 40]!r}, training "
                f"text {text[at:at + 40]!r}); train on the last answer only (train_on: last_assistant) or use "
                "another template", reason="not_prefix_stable")


def check_template(template_source: str, bos_token: str | None = "<s>", eos_token: str | None = "</s>",
                   train_on: str = "all_assistant", with_system: bool = False, **extra) -> TemplateReport:
    """Run the template on a probe conversation and raise TemplateError with what is wrong: it does
    not parse, refuses a plain conversation (or a system message, when with_system), leaves a
    message out, writes no end-of-turn marker, trains nothing, or (for multi-turn training) is not
    prefix-stable."""
    probe = ([PROBE_SYSTEM] if with_system else []) + PROBE
    variables = dict(bos_token=bos_token, eos_token=eos_token, **extra)
    result = render_chat(template_source, probe, train_on=train_on, **variables)
    if not result.trained_spans:
        raise TemplateError("the template marks nothing of a plain conversation for training",
                            reason="no_trained_tokens")
    check_prefix_stable(template_source, probe, train_on="last_assistant" if train_on == "last_assistant"
                        else "all_assistant", **variables)
    plain = template_variables(bos_token, eos_token, False, extra)
    prompt = probe[:-1]
    closed = _render(template_source, prompt, plain, False)
    opened = _render(template_source, prompt, plain, True)
    return TemplateReport(
        end_of_turn=end_of_turn_marker(template_source, **plain).strip(),  # "": the template has none
        generation_prompt=opened[common_start(closed, opened):],
        writes_bos=bool(bos_token) and result.text.startswith(bos_token),
        generation_markers=has_generation_markers(template_source),
    )
