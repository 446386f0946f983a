"""builder/recipe/yamlfile.py: YAML loaded with the line of every key and list item, so that an
error can say file:line; syntax errors, repeated keys and unreadable files are RecipeErrors."""
from __future__ import annotations

import pytest

from builder.errors import RecipeError
from builder.recipe.yamlfile import load_yaml, text_line

TEXT = """name: r
train:
  lr: 2.0e-4
  lora: {r: 8}
sources:
  - name: a
    path: data/a.jsonl
  -
    name: b
"""


def test_every_key_and_item_knows_its_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(TEXT)
    doc = load_yaml(path)
    assert doc.data == {"name": "r", "train": {"lr": 2.0e-4, "lora": {"r": 8}},
                        "sources": [{"name": "a", "path": "data/a.jsonl"}, {"name": "b"}]}
    assert doc.lines == {("name",): 1, ("train",): 2, ("train", "lr"): 3, ("train", "lora"): 4,
                         ("train", "lora", "r"): 4, ("sources",): 5, ("sources", 0): 6, ("sources", 0, "name"): 6,
                         ("sources", 0, "path"): 7, ("sources", 1): 9, ("sources", 1, "name"): 9}
    assert doc.where(("train", "lr")) == f"{path}:3"
    assert doc.line_of(("train", "lora", "alpha")) == 4  # a missing key points at its parent
    assert doc.line_of(("eval", "tasks", 0)) == 1         # nothing known: the top of the file


def test_an_empty_file_is_no_data(tmp_path):
    (tmp_path / "e.yaml").write_text("# nothing\n")
    doc = load_yaml(tmp_path / "e.yaml")
    assert (doc.data, doc.lines) == (None, {})


@pytest.mark.parametrize("data,expected", [
    (b"name: r\ntrain:\n  lr: 1\n  lr: 2\n", "r.yaml:4: key 'lr' repeated (first at line 3)"),
    (b"name: r\nbase: [unclosed\n", "r.yaml:3: invalid YAML: expected ',' or ']', but got '<stream end>'"),
    (b"name: r\n# caf\xe9\n", "r.yaml:2: not UTF-8 text (byte 0xe9)"),
])
def test_bad_files_are_one_recipe_error_with_file_and_line(tmp_path, data, expected):
    (tmp_path / "r.yaml").write_bytes(data)
    with pytest.raises(RecipeError) as caught:
        load_yaml(tmp_path / "r.yaml")
    assert caught.value.problems == [f"{tmp_path}/{expected}"]


def test_missing_and_folder_paths(tmp_path):
    for path, expected in ((tmp_path / "none.yaml", "file not found"), (tmp_path, "is a folder, not a YAML file")):
        with pytest.raises(RecipeError) as caught:
            load_yaml(path)
        assert caught.value.problems == [f"{path}: {expected}"]


def test_text_line_counts_newlines_before_the_offset():
    assert [text_line(b"ab\ncd\n\nx", k) for k in (0, 2, 3, 6, 7)] == [1, 1, 2, 3, 4]


def test_errors_name_a_file_inside_the_root_relative_to_it_and_one_outside_absolutely(tmp_path):
    (tmp_path / "project" / "recipes").mkdir(parents=True)
    inside = tmp_path / "project" / "recipes" / "r.yaml"
    inside.write_text("name: r\nname: s\n")
    with pytest.raises(RecipeError) as caught:
        load_yaml(inside, root=tmp_path / "project")
    assert caught.value.problems == ["recipes/r.yaml:2: key 'name' repeated (first at line 1)"]
    inside.write_text(TEXT)
    assert load_yaml(inside, root=tmp_path / "project").where(("train", "lr")) == "recipes/r.yaml:3"
    outside = tmp_path / "r.yaml"
    outside.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError) as caught:
        load_yaml(outside, root=tmp_path / "project")
    assert caught.value.problems[0].startswith(f"{outside.resolve()}:2: invalid YAML")
