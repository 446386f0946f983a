"""`tunefile preview RECIPE`: a recipe's first examples rendered by its chat template, trained
characters highlighted, so a person sees what the model will learn before anything is built.

    print(preview(project, "default", n=3))                          # terminal (ANSI colour)
    preview(project, "default", n=20, html_path=Path("p.html"))      # a page to scroll (returns "wrote p.html ...")
    preview(project, "default", show_tokens=True)                    # token boundaries and labels

Rows are taken round-robin from the sources in recipe order (every source shows up), each source's
in file order; a malformed row (bad_json, missing_field, empty_response, ...) shows as REJECTED
with its reason in its place. The others are built by the dataset stage's own function
(builder.data.shards.examples_of): quality filters, system prompt, template, no_end_of_turn policy,
tokens and token filters, so a row the build would drop shows as REJECTED with its reason too.
The base tokenizer comes from the built base stage (or a local model folder, or the builtin model
made in-process). With show_tokens each token is shown with whether it carries loss, exactly as
the dataset stage labels it.
"""
from __future__ import annotations

import html
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from builder.data.records import Conversation
from builder.data.shards import examples_of, shard_settings
from builder.data.sources import Reject, read_source_rows
from builder.data.tokenizer import load_tokenizer as load_built_tokenizer
from builder.errors import TunefileError
from builder.files import write_atomic
from builder.models import BUILTIN_MODELS
from builder.models.tiny_llama import train_tokenizer
from builder.recipe.project import Project
from builder.recipe.schema import Recipe
from builder.templates import TemplateError, end_of_turn_markers, read_template
from builder.templates.tokens import IGNORE_INDEX, template_tokens, tokenize_chat

GREEN, DIM, RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"
TOKEN_SHADES = ("\x1b[48;5;236m", "\x1b[48;5;238m")  # alternate backgrounds mark token boundaries
OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ mark trained text where there is no colour


@dataclass(frozen=True)
class Shown:
    row: Conversation | Reject  # where it comes from (source, file, row), and what was read
    text: str
    trained_spans: list[tuple[int, int]]
    tokens: list[tuple[int, int, int, bool]] | None  # (start, end, id, trained) with show_tokens
    error: str | None  # the reject reason and message when the template refuses the example
    appended: tuple[tuple[int, int], ...] = ()  # text tunefile added (EOS after answers, no_end_of_turn)


def pick_rows(project: Project, recipe: Recipe, n: int) -> list[Conversation | Reject]:
    """The first n rows, round-robin over the sources, as read: a conversation (the build adds the
    system prompt) or a malformed row's Reject."""
    pools = [read_source_rows(spec, project.root) for spec in project.readable_sources(recipe)]
    picked: list[Conversation | Reject] = []
    for i in range(max((len(p) for p in pools), default=0)):
        for pool in pools:
            if i < len(pool) and len(picked) < n:
                picked.append(pool[i])
    return picked


def load_tokenizer(project: Project, recipe: Recipe):
    """The base tokenizer: the built base stage's (as the dataset stage loads it), a local model
    folder's, or the builtin's."""
    base_dir = project.stage_dir(recipe.name, "base")
    if (base_dir / "tokenizer_config.json").is_file():
        return load_built_tokenizer(base_dir, project.cache_dir)
    ref = recipe.base.ref
    if ref.builtin is not None:
        return train_tokenizer(BUILTIN_MODELS[ref.builtin])
    if ref.folder is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(project.root / ref.folder)
    raise TunefileError(f"preview needs the tokenizer of {recipe.base.model}; build the base stage first: "
                        f"tunefile build {recipe.name} --until base")


def render_examples(project: Project, recipe: Recipe, n: int, show_tokens: bool) -> tuple[str, dict, list[Shown]]:
    """The template source, its variables (special tokens) and the first n examples, each
    rendered (or refused, with the reason)."""
    base_dir = project.stage_dir(recipe.name, "base")
    if recipe.template == "base" and not base_dir.is_dir():
        raise TunefileError(f"template: base needs the base model's tokenizer; build it first: "
                            f"tunefile build {recipe.name} --until base")
    template = read_template(recipe.template, project.root, base_dir)
    tokenizer = load_tokenizer(project, recipe)
    variables = template_tokens(tokenizer)
    picked = pick_rows(project, recipe, n)
    # The dataset stage's own path from conversations to examples: filters, system prompt,
    # template, no_end_of_turn policy, tokens and token filters (dedup and mixing aside).
    built: dict[tuple[str, str, int], object] = {}
    for spec in project.readable_sources(recipe):
        settings = shard_settings(recipe, spec, template, base_dir, project.cache_dir, "", {})
        conversations = [c for c in picked if c.source == spec.name and isinstance(c, Conversation)]
        examples, rejects = examples_of(settings, conversations, tokenizer)
        built.update(((c.source, c.file, c.row), c) for c in examples.conversations)
        built.update(((r.source, r.file, r.row), r) for r in rejects)
    shown = []
    for row in picked:
        result = row if isinstance(row, Reject) else built[(row.source, row.file, row.row)]
        if isinstance(result, Reject):
            shown.append(Shown(row, "", [], None, f"{result.reason}: {result.detail}"))
            continue
        # The accepted example as the conversation it is trained on, shown with its characters and
        # tokens (tokenize_chat: the one-conversation form of the batch path, tested equal to it).
        chat = tokenize_chat(template, result.to_dicts(), tokenizer, train_on=recipe.train.train_on,
                             no_end_of_turn=recipe.no_end_of_turn)
        tokens = ([(start, end, token, label != IGNORE_INDEX)
                   for (start, end), token, label in zip(chat.offsets, chat.input_ids, chat.labels)]
                  if show_tokens else None)
        shown.append(Shown(result, chat.text, chat.trained_spans, tokens, None, chat.appended))
    return template, variables, shown


def _pieces(item: Shown) -> list[tuple[str, bool, int | None]]:
    """(text, trained, token index) runs covering the text in order."""
    if item.tokens is not None:
        runs, at = [], 0
        for index, (start, end, _, trained) in enumerate(item.tokens):
            if start > at:  # characters no token covers (rare): shown untrained
                runs.append((item.text[at:start], False, None))
            runs.append((item.text[start:end], trained, index))
            at = max(at, end)
        return runs + ([(item.text[at:], False, None)] if at < len(item.text) else [])
    runs, at = [], 0
    for start, end in item.trained_spans:
        runs += [(item.text[at:start], False, None), (item.text[start:end], True, None)]
        at = end
    return [r for r in runs + [(item.text[at:], False, None)] if r[0]]


def _visible(text: str, tokens: bool) -> str:
    # With token boundaries on, whitespace must be seen to be counted; lines break after ↵ later.
    return text.replace("\n", "\u21b5").replace("\t", "\u2192") if tokens else text


def _header(index: int, total: int, item: Shown) -> str:
    row = item.row
    where = f"{row.source} row {row.row}" + (f" ({row.file})" if row.file else "")
    if item.error:
        return f"── example {index}/{total} · {where} · REJECTED {item.error}"
    trained = sum(end - start for start, end in item.trained_spans)
    counts = f"{trained}/{len(item.text)} characters trained"
    if item.tokens is not None:
        counts = f"{sum(t[3] for t in item.tokens)}/{len(item.tokens)} tokens trained"
    if item.appended:
        added = item.text[item.appended[0][0]:item.appended[0][1]]
        counts += f" · {added!r} appended after {len(item.appended)} answer(s) (no_end_of_turn: append_eos)"
    return f"── example {index}/{total} · {where} · {counts}"


def _terminal_body(item: Shown, color: bool) -> str:
    tokens = item.tokens is not None
    groups = []
    for trained, runs in itertools.groupby(_pieces(item), key=lambda run: run[1]):
        if color:
            styled = []
            for text, _, token in runs:
                style = (TOKEN_SHADES[token % 2] if token is not None else "") + (GREEN if trained else "")
                styled.append(f"{style}{_visible(text, tokens)}{RESET}" if style else _visible(text, tokens))
            groups.append("".join(styled))
        else:
            joined = ("|" if tokens else "").join(_visible(text, tokens) for text, _, _ in runs)
            groups.append(f"{OPEN}{joined}{CLOSE}" if trained else joined)
    body = ("|" if tokens and not color else "").join(groups)
    return re.sub("\u21b5((?:\x1b\\[0m)?\\|?)", "\u21b5\\1\n", body) if tokens else body


def format_terminal(recipe: Recipe, marker: str, shown: list[Shown], color: bool) -> str:
    legend = (f"{GREEN}green{RESET} = trained" if color else f"{OPEN}...{CLOSE} = trained")
    if shown and shown[0].tokens is not None:
        legend += "; tokens alternate background" if color else "; tokens separated by |"
    lines = [f"recipe {recipe.name} · template {recipe.template} · train_on {recipe.train.train_on} · "
             f"end of turn {marker!r} · {legend}"]
    for index, item in enumerate(shown, start=1):
        lines.append(_header(index, len(shown), item))
        if not item.error:
            lines.append(_terminal_body(item, color))
    return "\n".join(lines) + "\n"


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; padding: 0 1rem; max-width: 72rem; color: #1f2328; }
h1 { font-size: 1.3rem; } h2 { font-size: 1rem; margin-top: 2rem; }
pre { white-space: pre-wrap; word-break: break-word; background: #f6f8fa; padding: 1rem;
      border-radius: 6px; font: 13px/1.6 ui-monospace, monospace; }
mark { background: #bff0c1; color: inherit; }
.t { border-right: 1px solid #8c959f; } .t1 { background: #eaeef2; }
.t.on { background: #bff0c1; } .t1.on { background: #a2e6a6; }
.nl { color: #8c959f; } .rejected { color: #cf222e; }
"""


def format_html(recipe: Recipe, marker: str, shown: list[Shown]) -> str:
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>tunefile preview: {html.escape(recipe.name)}</title><style>{HTML_STYLE}</style></head><body>",
             f"<h1>tunefile preview: recipe <code>{html.escape(recipe.name)}</code></h1>",
             f"<p>Template <code>{html.escape(recipe.template)}</code>, train_on "
             f"<code>{recipe.train.train_on}</code>, end of turn <code>{html.escape(repr(marker))}</code>. "
             "Highlighted text carries loss" + ("; each token is boxed, hover for its id" if shown and
                                                 shown[0].tokens is not None else "") + ".</p>"]
    for index, item in enumerate(shown, start=1):
        header = html.escape(_header(index, len(shown), item).lstrip("─ "))
        if item.error:
            parts.append(f'<h2 class="rejected">{header}</h2>')
            continue
        body = []  # inside <pre> every character shows, so no separators between the pieces
        for text, trained, token in _pieces(item):
            escaped = html.escape(text).replace("\n", '<span class="nl">\u21b5</span>\n')
            if token is not None:
                classes = "t" + (" t1" if token % 2 else "") + (" on" if trained else "")
                body.append(f'<span class="{classes}" title="token {item.tokens[token][2]}">{escaped}</span>')
            else:
                body.append(f"<mark>{escaped}</mark>" if trained else escaped)
        parts.append(f"<h2>{header}</h2><pre>{''.join(body)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def preview(project: Project, recipe_name: str, n: int = 3, html_path: Path | None = None,
            show_tokens: bool = False, color: bool = True) -> str:
    """The terminal text for the recipe's first n examples; with html_path, an HTML page written
    there instead, and one line saying where."""
    if n < 1:
        raise TunefileError(f"-n {n}: show at least one example")
    recipe = project.load_recipe(recipe_name)
    template, variables, shown = render_examples(project, recipe, n, show_tokens)
    try:
        markers = end_of_turn_markers(template, **variables)
        marker = markers.final if markers.has_token else (
            f"none; {variables.get('eos_token')!r} appended" if recipe.no_end_of_turn == "append_eos"
            else "none; kept as is: the model will not learn to stop")
    except TemplateError as exc:
        marker = f"(none: {exc})"
    if html_path is None:
        return format_terminal(recipe, marker, shown, color)
    write_atomic(html_path, format_html(recipe, marker, shown))
    rejected = sum(item.error is not None for item in shown)
    return f"wrote {html_path}: {len(shown)} examples, {rejected} rejected\n"
