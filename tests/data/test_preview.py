"""`preview`: a recipe's first examples rendered by its template, trained text marked, in the
terminal (plain and ANSI), as token boundaries with labels, and as an HTML page."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import ASSETS, make_project

from builder.data.preview import GREEN, RESET, preview
from builder.errors import TunefileError
from builder.recipe.project import load_project

RECIPE = """name: default
base: {model: "builtin:tiny-llama"}
template: chatml
sources:
  - {name: tips, path: data/tips.jsonl, format: alpaca}
  - {name: chats, path: data/chats.jsonl, format: messages}
"""
TIPS = [{"instruction": "Name a colour.", "output": "Red."}, {"instruction": "Another?", "output": "Blue <b>."}]
CHATS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                       {"role": "assistant", "content": "Bye!"}]}]


def project_with(tmp_path: Path, recipe: str = RECIPE):
    root = make_project(tmp_path / "project", recipe)
    (root / "data" / "tips.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TIPS))
    (root / "data" / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    return load_project(root)


def test_preview_marks_trained_text_round_robin_over_sources(tmp_path):
    text = preview(project_with(tmp_path), "default", n=3, color=False)
    assert text == (
        "recipe default · template chatml · train_on all_assistant · end of turn '<|im_end|>' · ⟦...⟧ = trained\n"
        "── example 1/3 · tips row 1 (data/tips.jsonl) · 14/79 characters trained\n"
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n⟦Red.<|im_end|>⟧\n\n"
        "── example 2/3 · chats row 1 (data/chats.jsonl) · 30/176 characters trained\n"
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "⟦Hello.<|im_end|>⟧\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n⟦Bye!<|im_end|>⟧\n\n"
        "── example 3/3 · tips row 2 (data/tips.jsonl) · 19/78 characters trained\n"
        "<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\n⟦Blue <b>.<|im_end|>⟧\n\n")


def test_preview_in_colour(tmp_path):
    text = preview(project_with(tmp_path), "default", n=1, color=True)
    assert f"<|im_start|>assistant\n{GREEN}Red.<|im_end|>{RESET}\n" in text
    assert "⟦" not in text


def test_preview_shows_tokens_and_their_labels(tmp_path):
    text = preview(project_with(tmp_path), "default", n=1, color=False, show_tokens=True)
    lines = text.splitlines()
    assert lines[0].endswith("⟦...⟧ = trained; tokens separated by |")
    # Token boundaries are the tiny tokenizer's; only the answer and <|im_end|> carry loss.
    assert lines[1:] == ["── example 1/1 · tips row 1 (data/tips.jsonl) · 4/21 tokens trained",
                         "<|im_start|>|us|er|↵|",
                         "N|ame| a| colour|.|<|im_end|>|↵|",
                         "<|im_start|>|ass|ist|ant|↵|",
                         "⟦R|ed|.|<|im_end|>⟧|↵", ""]


def test_preview_writes_an_html_page(tmp_path):
    page = tmp_path / "preview.html"
    text = preview(project_with(tmp_path), "default", n=3, html_path=page, color=False)
    assert text == f"wrote {page}: 3 examples, 0 rejected\n"  # the page, not the terminal text too
    html = page.read_text()
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    assert "<title>tunefile preview: default</title>" in html
    assert "<mark>Blue &lt;b&gt;.&lt;|im_end|&gt;</mark>" in html  # escaped, highlighted
    assert html.count("<mark>") == 4 and html.count("<h2>") == 3
    tokens = tmp_path / "tokens.html"
    preview(project_with(tmp_path / "again"), "default", n=1, html_path=tokens, show_tokens=True)
    assert 'class="t on"' in tokens.read_text() or 'class="t t1 on"' in tokens.read_text()


def test_preview_shows_rejected_examples_with_the_reason(tmp_path):
    recipe = RECIPE.replace("template: chatml", "template: templates/no_system.jinja")
    project = project_with(tmp_path, recipe + "system_prompt: Be kind.\n")
    (project.root / "templates").mkdir()
    (project.root / "templates" / "no_system.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] + eos_token }}{% endfor %}")
    text = preview(project, "default", n=2, color=False)
    assert ("── example 1/2 · tips row 1 (data/tips.jsonl) · REJECTED template_error: chat template refused the "
            "conversation: no system role\n") in text


def test_preview_shows_malformed_rows_in_their_place_with_the_reason(tmp_path):
    project = project_with(tmp_path)
    (project.root / "data" / "tips.jsonl").write_text(
        json.dumps(TIPS[0]) + "\n{not json\n" + json.dumps({"instruction": "No answer."}) + "\n"
        + json.dumps({"instruction": "Blank?", "output": " "}) + "\n")
    text = preview(project, "default", n=5, color=False)
    assert [line for line in text.splitlines() if line.startswith("──")] == [
        "── example 1/5 · tips row 1 (data/tips.jsonl) · 14/79 characters trained",
        "── example 2/5 · chats row 1 (data/chats.jsonl) · 30/176 characters trained",
        "── example 3/5 · tips row 2 (data/tips.jsonl) · REJECTED bad_json: not JSON: Expecting property name "
        "enclosed in double quotes at column 2",
        "── example 4/5 · tips row 3 (data/tips.jsonl) · REJECTED missing_field: no 'output' field "
        "(row has: instruction)",
        "── example 5/5 · tips row 4 (data/tips.jsonl) · REJECTED empty_response: an assistant message is empty"]
    page = tmp_path / "rejects.html"
    assert preview(project, "default", n=5, html_path=page) == f"wrote {page}: 5 examples, 3 rejected\n"
    assert page.read_text().count('<h2 class="rejected">') == 3


def test_preview_with_a_custom_template_file(tmp_path):
    project = project_with(tmp_path, RECIPE.replace("template: chatml", "template: user_turns.jinja"))
    shutil.copy(ASSETS / "user_turns.jinja", project.root / "user_turns.jinja")
    text = preview(project, "default", n=1, color=False)
    assert text.splitlines()[0].startswith("recipe default · template user_turns.jinja · train_on all_assistant · "
                                           "end of turn '<|end|>'")
    assert "User: Name a colour.\nAssistant: ⟦Red.<|end|>⟧\n" in text


def test_preview_says_what_is_missing(tmp_path):
    project = project_with(tmp_path)
    with pytest.raises(TunefileError, match="show at least one example"):
        preview(project, "default", n=0)
    based = project_with(tmp_path / "base", RECIPE.replace("template: chatml", "template: base"))
    with pytest.raises(TunefileError, match="tunefile build default --until base"):
        preview(based, "default", n=1)
