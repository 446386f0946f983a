"""YAML loading that remembers where every key sits, so errors can say file:line.

The file is named as the user knows it: relative to the project root when it lies inside the
project (`recipes/default.yaml:29`), else by its absolute path.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from builder.errors import RecipeError

Loc = tuple  # a path into the document: ("train", "lora", "r") or ("sources", 0, "path")


@dataclass(frozen=True)
class YamlDoc:
    path: Path
    data: object
    lines: dict[Loc, int]  # loc -> 1-based line of the key (or list item)
    shown: str = ""  # how errors name the file (shown_path); the path as given when empty

    def line_of(self, loc: Loc) -> int:
        """The line of the deepest known prefix of loc (a missing key points at its parent)."""
        loc = tuple(loc)
        while loc and loc not in self.lines:
            loc = loc[:-1]
        return self.lines.get(loc, 1)

    def where(self, loc: Loc) -> str:
        return f"{self.shown or self.path}:{self.line_of(loc)}"


def shown_path(path: Path, root: Path | None) -> str:
    """How an error names a file: relative to the project root when it lies inside it (as the
    docs show, `recipes/default.yaml`), else absolute; the path as given without a root."""
    if root is None:
        return str(path)
    for base, target in ((Path(root).absolute(), Path(path).absolute()), (Path(root).resolve(), Path(path).resolve())):
        if target.is_relative_to(base):  # as written first: a link inside the project stays inside
            return target.relative_to(base).as_posix()
    return str(Path(path).resolve())


def _index_lines(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = loc + (key_node.value,)
            lines[child] = key_node.start_mark.line + 1
            _index_lines(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = loc + (i,)
            lines[child] = item.start_mark.line + 1
            _index_lines(item, child, lines)


def load_yaml(path: Path, root: Path | None = None) -> YamlDoc:
    """Parse one YAML file; syntax errors and duplicate keys become RecipeError with file:line
    (the file named relative to root when it lies inside it)."""
    path = Path(path)
    shown = shown_path(path, root)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([f"{shown}: file not found"]) from None
    except IsADirectoryError:
        raise RecipeError([f"{shown}: is a folder, not a YAML file"]) from None
    except UnicodeDecodeError as exc:
        line = text_line(path.read_bytes(), exc.start)
        raise RecipeError([f"{shown}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x})"]) from None
    except OSError as exc:
        raise RecipeError([f"{shown}: cannot be read ({exc.strerror or exc})"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise RecipeError([f"{shown}:{line}: invalid YAML: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([f"{shown}:1: invalid YAML: {exc}"]) from None
    lines: dict[Loc, int] = {}
    if node is not None:
        _check_duplicate_keys(shown, node)
        _index_lines(node, (), lines)
    return YamlDoc(path=path, data=data, lines=lines, shown=shown)


def text_line(data: bytes, offset: int) -> int:
    """The 1-based line of a byte offset."""
    return data.count(b"\n", 0, offset) + 1


def _check_duplicate_keys(shown: str, node: yaml.Node) -> None:
    # PyYAML silently keeps the last of two equal keys; a recipe with `lr` twice is a mistake.
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                raise RecipeError([f"{shown}:{line}: key '{key_node.value}' repeated "
                                   f"(first at line {seen[key_node.value]})"])
            seen[key_node.value] = line
            _check_duplicate_keys(shown, value_node)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(shown, item)
