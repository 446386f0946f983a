"""Chat templates: the built-in library, HF-identical rendering, and the trained character spans.

    r = render_chat(source, messages, train_on="all_assistant")   # source: Jinja text, or "chatml"
    r.text            # what transformers' apply_chat_template renders
    r.trained_spans   # [(start, end), ...] characters that carry loss

Built-ins (`template: NAME` in a recipe) are the .jinja files beside this one, written from the
public formats: alpaca, chatml, gemma, llama-2, llama-3, mistral, phi-3, qwen2.5, vicuna, zephyr.
A recipe may also name a .jinja file, or `base` for the base tokenizer's own template.

Modules: sandbox.py (the Jinja environment and its limits), spans.py (render_chat), tokens.py
(token ids and labels in one step), checks.py (template-level checks run before a dataset build).
Only jinja2 is imported here, so validating and planning stay fast.
"""
from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from builder.files import read_json
from builder.templates import spans
from builder.templates.errors import TemplateError
from builder.templates.sandbox import compile_template, has_generation_markers, render_template
from builder.templates.spans import (
    NO_END_OF_TURN,
    TRAIN_ON,
    RenderedChat,
    append_eos,
    end_of_turn_marker,
    end_of_turn_markers,
    stop_texts,
)

TEMPLATE_DIR = Path(__file__).parent
BUILTIN_TEMPLATES = {p.stem: p for p in sorted(TEMPLATE_DIR.glob("*.jinja"))}
# A string like this is a template's name, never its Jinja source (which could not render a message).
_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

__all__ = ["BUILTIN_TEMPLATES", "NO_END_OF_TURN", "TRAIN_ON", "RenderedChat", "TemplateError", "append_eos",
           "builtin_name", "compile_template", "end_of_turn_marker", "end_of_turn_markers", "has_generation_markers",
           "read_template", "render_chat", "render_template", "saved_chat_template", "special_tokens", "stop_texts",
           "template_source_of"]


@cache
def _builtin_source(name: str) -> str:
    return BUILTIN_TEMPLATES[name].read_text(encoding="utf-8")


def template_source_of(template: str) -> str:
    """Jinja source as given, or the source of the built-in template it names ("chatml")."""
    if template in BUILTIN_TEMPLATES:
        return _builtin_source(template)
    if _TEMPLATE_NAME.fullmatch(template):
        raise TemplateError(f"no built-in template '{template}'; render_chat takes Jinja source or one of "
                            f"{', '.join(BUILTIN_TEMPLATES)}")
    return template


def render_chat(template_source: str, messages: list[dict], bos_token: str | None = "<s>",
                eos_token: str | None = "</s>", add_generation_prompt: bool = False,
                train_on: str = "all_assistant", **extra) -> RenderedChat:
    """Render like HF's apply_chat_template and return the character spans that carry loss.
    template_source is Jinja source, or the name of a built-in template (`render_chat("chatml", ...)`)."""
    return spans.render_chat(template_source_of(template_source), messages, bos_token, eos_token,
                             add_generation_prompt, train_on, **extra)


def saved_chat_template(model_dir: Path) -> str | None:
    """The chat template saved with an HF tokenizer: chat_template.jinja, or tokenizer_config.json's
    `chat_template` (a string, or a list of named templates of which `default` is used)."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = model_dir / "tokenizer_config.json"
    if config_file.is_file():
        template = read_json(config_file).get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None
    return None


def special_tokens(model_dir: Path) -> dict[str, str]:
    """The tokenizer's special tokens by name (bos_token, eos_token, pad_token, ...), as the
    template sees them, read from its config files without loading the tokenizer."""
    tokens: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = model_dir / name
        if not path.is_file():
            continue
        config = read_json(path)
        for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                tokens[key] = value
    return tokens


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


def builtin_name(source: str) -> str | None:
    """The name of the built-in template whose text is exactly `source`, if any."""
    for name, path in BUILTIN_TEMPLATES.items():
        if path.read_text(encoding="utf-8") == source:
            return name
    return None
