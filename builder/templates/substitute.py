"""Rendering by substitution: a conversation's text without running Jinja, where that is proven exact.

A chat template usually writes each message's content verbatim between text of its own that
depends only on the conversation's shape (roles, which fields are set). For such a template the
text of any conversation is its shape's skeleton (the render with sentinel contents) with the
real contents put in place of the sentinels, and each content's position is known for free.
Jinja then runs once per shape instead of once per conversation.

Proof, once per (template, variables, shape), that the template treats contents opaquely:
1. Contents are rendered as `Traced` strings. Any use that could make the output depend on a
   content's value (comparing, measuring, searching, slicing, trimming, casing, hashing,
   iterating, calling any string method) marks the shape as not substitutable. Writing it out and
   concatenating it with `+` or `%` (whose results stay traced) are the only transparent uses.
2. Each sentinel holds characters any transformation would alter (edge whitespace, a quote, a
   backslash, a newline, `<&>`, both cases): the skeleton must contain every one verbatim, in
   order, so escaping (`tojson`, `e`) or trimming on an untraced path is caught too.
3. The first conversations of each shape are rendered with Jinja as well and must give the same
   text; one mismatch turns substitution off for the template, for good.
Anything unproven falls back to Jinja, so the text is always what apply_chat_template renders.
"""
from __future__ import annotations

import json
import re

from builder.templates.errors import TemplateError
from builder.templates.sandbox import render_template

_SENTINEL = "\ue000 \"\\\n<&>Aa{}\ue001 "
_SENTINEL_RE = re.compile("\ue000 \"\\\\\n<&>Aa([0-9]+)\ue001 ")
VERIFY_PER_SHAPE = 2  # conversations per shape also rendered by Jinja and compared
_SHAPES: dict[tuple, Skeleton | None] = {}
_DISPROVEN: set[tuple[str, str]] = set()


class Traced(str):
    """A content that reports any use beyond being written out or concatenated."""

    __slots__ = ()
    touched: list[bool] = [False]  # shared flag, reset per proof (renders are single-threaded)

    def __add__(self, other):
        return Traced(str.__add__(self, other)) if isinstance(other, str) else str.__add__(self, other)

    def __radd__(self, other):
        return Traced(other + str(self)) if isinstance(other, str) else NotImplemented

    def __mod__(self, other):
        Traced.touched[0] = True  # the content used as a format string
        return str.__mod__(self, other)

    def __rmod__(self, other):
        return Traced(str.__mod__(other, str(self))) if isinstance(other, str) else NotImplemented

    def __str__(self) -> str:
        return str.__str__(self)


def _trap(name: str):
    def method(self, *args, **kwargs):
        Traced.touched[0] = True
        return getattr(str, name)(str(self), *args, **kwargs)
    method.__name__ = name
    return method


_TRANSPARENT = {"__add__", "__radd__", "__mod__", "__rmod__", "__str__", "__new__", "__init__", "__getattribute__",
                "__class__", "__init_subclass__", "__subclasshook__", "__getnewargs__", "__reduce__",
                "__reduce_ex__", "__sizeof__", "__dir__", "__setattr__", "__delattr__", "__doc__", "__repr__",
                "__format__"}
for _name in dir(str):
    if _name not in _TRANSPARENT and callable(getattr(str, _name)):
        setattr(Traced, _name, _trap(_name))
Traced.__hash__ = _trap("__hash__")


class Skeleton:
    """A shape's template text around its contents: literals[0] c0 literals[1] c1 ... literals[n]."""

    __slots__ = ("literals", "indices", "verified")

    def __init__(self, literals: list[str], indices: list[int]):
        self.literals, self.indices, self.verified = literals, indices, 0


def variables_key(variables: dict) -> object:
    """A cache key for template variables: the sorted items where they are plain values (special
    tokens, flags: the common case, cheap), else their JSON."""
    try:
        key = tuple(sorted(variables.items()))
        hash(key)
        return key
    except TypeError:
        return json.dumps(variables, sort_keys=True, default=repr)


def shape_of(messages: list[dict]) -> tuple:
    """What a skeleton depends on besides the template and variables: each message's fields other
    than a string content (roles, mostly)."""
    return tuple(m.get("role") if len(m) == 2 and type(m.get("content")) is str and "role" in m
                 else json.dumps({k: v for k, v in m.items() if k != "content" or not isinstance(v, str)},
                                 sort_keys=True, default=repr)
                 for m in messages)


def _prove(source: str, messages: list[dict], variables: dict) -> Skeleton | None:
    traced = [{**m, "content": Traced(_SENTINEL.format(i))} if isinstance(m.get("content"), str) else m
              for i, m in enumerate(messages)]
    Traced.touched[0] = False
    try:
        skeleton = render_template(source, {**variables, "messages": traced})[0]
    except TemplateError:
        return None
    finally:
        touched, Traced.touched[0] = Traced.touched[0], False
    if touched:
        return None
    pieces = _SENTINEL_RE.split(skeleton)
    indices = [int(i) for i in pieces[1::2]]
    if not indices and any(isinstance(m.get("content"), str) for m in messages):
        return None  # contents left out entirely: nothing to substitute into, let Jinja say so
    return Skeleton(pieces[0::2], indices)


def substituted(source: str, messages: list[dict], variables: dict
                ) -> tuple[str, list[list[tuple[int, int]]]] | None:
    """(text, each message's content positions) by substitution, or None where that is not proven
    exact for this template and shape (the caller renders with Jinja)."""
    key_vars = variables_key(variables)
    if (source, key_vars) in _DISPROVEN:
        return None
    key = (source, key_vars, shape_of(messages))
    if key not in _SHAPES:
        if len(_SHAPES) > 4096:
            _SHAPES.clear()
        _SHAPES[key] = _prove(source, messages, variables)
    skeleton = _SHAPES[key]
    if skeleton is None:
        return None
    parts, positions, at = [skeleton.literals[0]], [[] for _ in messages], len(skeleton.literals[0])
    for index, literal in zip(skeleton.indices, skeleton.literals[1:]):
        content = messages[index]["content"]
        positions[index].append((at, at + len(content)))
        parts += [content, literal]
        at += len(content) + len(literal)
    text = "".join(parts)
    if skeleton.verified < VERIFY_PER_SHAPE:
        skeleton.verified += 1
        try:
            exact = render_template(source, {**variables, "messages": messages})[0] == text
        except TemplateError:
            exact = False
        if not exact:
            _DISPROVEN.add((source, key_vars))
            return None
    return text, positions
