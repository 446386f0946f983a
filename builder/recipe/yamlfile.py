"""YAML loading that remembers where every key sits, so errors can say file:line."""
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

    def line_of(self, loc: Loc) -> int:
        """The line of the deepest known prefix of loc (a missing key points at its parent)."""
        loc = tuple(loc)
        while loc and loc not in self.lines:
            loc = loc[:-1]
        return self.lines.get(loc, 1)

    def where(self, loc: Loc) -> str:
        return f"{self.path}:{self.line_of(loc)}"


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


def load_yaml(path: Path) -> YamlDoc:
    """Parse one YAML file; syntax errors and duplicate keys become RecipeError with file:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([f"{path}: file not found"]) from None
    except IsADirectoryError:
        raise RecipeError([f"{path}: is a folder, not a YAML file"]) from None
    except UnicodeDecodeError as exc:
        line = text_line(path.read_bytes(), exc.start)
        raise RecipeError([f"{path}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x})"]) from None
    except OSError as exc:
        raise RecipeError([f"{path}: cannot be read ({exc.strerror or exc})"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise RecipeError([f"{path}:{line}: invalid YAML: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([f"{path}:1: invalid YAML: {exc}"]) from None
    lines: dict[Loc, int] = {}
    if node is not None:
        _check_duplicate_keys(path, node)
        _index_lines(node, (), lines)
    return YamlDoc(path=path, data=data, lines=lines)


def text_line(data: bytes, offset: int) -> int:
    """The 1-based line of a byte offset."""
    return data.count(b"\n", 0, offset) + 1


def _check_duplicate_keys(path: Path, node: yaml.Node) -> None:
    # PyYAML silently keeps the last of two equal keys; a recipe with `lr` twice is a mistake.
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                raise RecipeError([f"{path}:{line}: key '{key_node.value}' repeated "
                                   f"(first at line {seen[key_node.value]})"])
            seen[key_node.value] = line
            _check_duplicate_keys(path, value_node)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(path, item)
