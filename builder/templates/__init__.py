"""Chat templates: the built-in .jinja files, HF-identical rendering, and the trained character spans.

    r = render_chat(source, messages, train_on="all_assistant")
    r.text            # what transformers' apply_chat_template renders
    r.trained_spans   # [(start, end), ...] characters that carry loss

Spans come from a second render in which every message's content is a unique sentinel: where
the sentinels land is where the template put each message, whatever markup surrounds it. The
end-of-turn marker is what the template writes right after an assistant message (learnt from a
two-message probe), e.g. `<|im_end|>` for chatml.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from builder.errors import TunefileError

TEMPLATE_DIR = Path(__file__).parent
BUILTIN_TEMPLATES = {p.stem: p for p in sorted(TEMPLATE_DIR.glob("*.jinja"))}
TRAIN_ON = ("all_assistant", "last_assistant", "all")
_SENTINEL = "\ue000TF{}\ue001"  # private-use characters: not whitespace (survive trim), not in real text


class TemplateError(TunefileError):
    """A template cannot render a conversation, or would train nothing / the wrong characters."""


@dataclass(frozen=True)
class RenderedChat:
    text: str
    trained_spans: list[tuple[int, int]]


class _GenerationTags(Extension):
    """Accept HF's `{% generation %}...{% endgeneration %}` markers; the body renders unchanged."""

    tags = {"generation"}

    def parse(self, parser):  # noqa: ANN001, ANN201 (jinja's extension protocol)
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # noqa: ANN001, ANN201
    # Same defaults as transformers' chat-template `tojson` (no HTML escaping, unlike jinja's).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile in the same sandboxed environment transformers uses for chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTags, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template does not parse (line {exc.lineno}): {exc.message}") from None


def saved_chat_template(model_dir: Path) -> str | None:
    """The chat template saved with an HF tokenizer (chat_template.jinja or tokenizer_config.json)."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = model_dir / "tokenizer_config.json"
    if config_file.is_file():
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def read_template(name: str, root: Path, base_dir: Path) -> str:
    """The template source a recipe's `template:` names: built-in, a .jinja path, or `base`
    (the chat template of the base model in base_dir)."""
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name].read_text(encoding="utf-8")
    if name == "base":
        template = saved_chat_template(base_dir)
        if not template:
            raise TemplateError("template: base, but the base tokenizer has no chat_template; "
                                f"name one of {', '.join(BUILTIN_TEMPLATES)} or a .jinja file")
        return template
    return (root / name).read_text(encoding="utf-8")


def _render(source: str, messages: list[dict], **variables) -> str:
    try:
        return compile_template(source).render(messages=messages, **variables)
    except jinja2.exceptions.TemplateError as exc:
        raise TemplateError(f"chat template refused the conversation: {exc}") from None


def _with_sentinels(messages: list[dict], offset: int = 0) -> list[dict]:
    return [{**m, "content": _SENTINEL.format(i + offset)} for i, m in enumerate(messages)]


def end_of_turn_marker(source: str, **variables) -> str:
    """What the template writes after an assistant message, trailing whitespace dropped."""
    probe = _with_sentinels([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}])
    text = _render(source, probe, **{**variables, "add_generation_prompt": False})
    tail = text.split(_SENTINEL.format(1), 1)[-1].rstrip()
    if not tail:
        raise TemplateError("the template writes nothing after an assistant message, so the "
                            "model would never learn to stop; add an end-of-turn token (eos)")
    return tail


def _content_positions(source: str, messages: list[dict], text: str, variables: dict) -> list[tuple[int, int] | None]:
    """(start, end) of each message's content in `text`, None where the template dropped it."""
    skeleton = _render(source, _with_sentinels(messages), **variables)
    positions: list[tuple[int, int] | None] = []
    pieces, cursor, rebuilt = skeleton, 0, []
    for i, message in enumerate(messages):
        sentinel = _SENTINEL.format(i)
        head, found, pieces = pieces.partition(sentinel)
        if not found:  # the template left this message out (e.g. a system prompt it ignores)
            positions.append(None)
            pieces = head
            continue
        rebuilt.append(head)
        cursor += len(head)
        positions.append((cursor, cursor + len(message["content"])))
        rebuilt.append(message["content"])
        cursor += len(message["content"])
    rebuilt.append(pieces)
    if "".join(rebuilt) == text:
        return positions
    return _find_contents(messages, text)


def _find_contents(messages: list[dict], text: str) -> list[tuple[int, int] | None]:
    # The template rewrites content (trims it, say): find each stripped content in order.
    positions: list[tuple[int, int] | None] = []
    cursor = 0
    for message in messages:
        content = message["content"].strip()
        start = text.find(content, cursor) if content else -1
        if start < 0:
            positions.append(None)
            continue
        positions.append((start, start + len(content)))
        cursor = start + len(content)
    return positions


def render_chat(template_source: str, messages: list[dict], bos_token: str = "<s>",
                eos_token: str = "</s>", add_generation_prompt: bool = False,
                train_on: str = "all_assistant", **extra) -> RenderedChat:
    """Render like HF's apply_chat_template and return the character spans that carry loss."""
    if train_on not in TRAIN_ON:
        raise TemplateError(f"train_on '{train_on}' unknown; allowed: {', '.join(TRAIN_ON)}")
    variables = dict(bos_token=bos_token, eos_token=eos_token,
                     add_generation_prompt=add_generation_prompt, **extra)
    text = _render(template_source, messages, **variables)
    if train_on == "all":
        return RenderedChat(text, [(0, len(text))] if text else [])
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        assistant = assistant[-1:]
    if not assistant:
        return RenderedChat(text, [])
    marker = end_of_turn_marker(template_source, **variables)
    positions = _content_positions(template_source, messages, text, variables)
    spans = []
    for i in assistant:
        if positions[i] is None:
            raise TemplateError(f"message {i} (assistant) does not appear in the rendered text; "
                                "the template drops or rewrites it")
        start, end = positions[i]
        # The end-of-turn marker follows the content, possibly after whitespace the template adds.
        gap = len(text[end:]) - len(text[end:].lstrip())
        if text.startswith(marker.lstrip(), end + gap):
            end = end + gap + len(marker.lstrip())
        spans.append((start, end))
    return RenderedChat(text, spans)
