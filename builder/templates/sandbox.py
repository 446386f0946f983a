"""The sandboxed Jinja environment chat templates render in: transformers' environment, plus limits.

A template from a model repository is untrusted code. Rendering uses the same environment as
transformers' `apply_chat_template` (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
loopcontrols, `{% generation %}`, `raise_exception`, `tojson`, `strftime_now`, the restricted
`dict` and `namespace`), so the text is the same, and adds what transformers lacks: a budget on
loop iterations, on the size of strings and lists the template builds, on output size and on
time, so a hostile template fails with a TemplateError instead of running unbounded.

    text, generation_spans = render_template(source, {"messages": [...], ...})
"""
from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from builder.templates.errors import TemplateError

RENDER_SECONDS = 10.0  # one render; real templates take milliseconds
MAX_LOOP_STEPS = 1_000_000  # loop iterations in one render, nested loops counted in full
MAX_VALUE_LENGTH = 10_000_000  # characters (or items) of one string/list built with + * %
MAX_OUTPUT_CHARS = 20_000_000
MAX_EXPONENT = 1024  # `**` with a larger exponent could run for hours on big integers
_LOOP_GUARD = "tf_loop_guard"
_SIZE_GUARD = "tf_size_guard"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as transformers detects it


@dataclass
class _RenderState:
    deadline: float
    steps: int = 0
    length: int = 0  # characters emitted so far (where a {% generation %} block starts)
    generation: list[tuple[int, int]] | None = None

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(f"the chat template ran longer than {RENDER_SECONDS:g} s; refusing it")

    def count(self, steps: int) -> None:
        self.steps += steps
        if self.steps > MAX_LOOP_STEPS:
            raise TemplateError(f"the chat template loops more than {MAX_LOOP_STEPS} times; refusing it")
        self.check_time()


_STATE: contextvars.ContextVar[_RenderState | None] = contextvars.ContextVar("tunefile_render", default=None)


def _state() -> _RenderState:
    state = _STATE.get()
    if state is None:  # rendered outside render_template (e.g. someone calls .render()): no budget
        state = _RenderState(deadline=float("inf"))
    return state


def _loop_guard(iterable):
    """Wrapped around every `{% for %}` iterable: counts iterations against the render's budget."""
    state = _state()
    try:
        size = len(iterable)
    except TypeError:
        return _counted(iterable, state)
    state.count(size)
    return iterable  # sized: returned as is, so `loop.length` and friends behave exactly as before


def _counted(iterable, state: _RenderState):
    for item in iterable:
        state.count(1)
        yield item


_SIZED = (str, list, tuple, dict)


def _checked(value):
    """`value`, unless it is a string/list/dict past the size budget."""
    if type(value) in _SIZED and len(value) > MAX_VALUE_LENGTH:
        raise TemplateError(f"the chat template builds a value of more than {MAX_VALUE_LENGTH} characters "
                            "or items; refusing it")
    return value


def _check_arguments(args: tuple, kwargs: dict) -> None:
    # Widths and counts (center(10**9), zfill, ...) are refused before the call allocates.
    for value in (*args, *kwargs.values()):
        if type(value) is int and value > MAX_VALUE_LENGTH:
            raise TemplateError(f"the chat template passes {value} to a function; refusing it")


def _guarded_filter(function):
    @functools.wraps(function)  # keeps jinja's pass_context/pass_environment marks
    def guarded(*args, **kwargs):
        _check_arguments(args[1:], kwargs)
        return _checked(function(*args, **kwargs))

    return guarded


class _GenerationTracker(jinja2.ext.Extension):
    """HF's `{% generation %}...{% endgeneration %}`: the body renders unchanged; when the render
    asks for it, the character span of each block is recorded."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
        text = caller()
        state = _STATE.get()
        if state is not None and state.generation is not None:
            state.generation.append((state.length, state.length + len(text)))
        return text


class ChatSandbox(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment with budgets on loops, sizes, output and time."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def call_binop(self, context, op: str, left, right):
        if op == "+":  # the hot path: templates concatenate all the time
            return _checked(left + right)
        if op == "**" and type(right) is int and abs(right) > MAX_EXPONENT:
            raise TemplateError(f"the chat template raises a number to the power {right}; refusing it")
        if op == "*":
            for seq, times in ((left, right), (right, left)):
                if type(times) is int and type(seq) in _SIZED and len(seq) * times > MAX_VALUE_LENGTH:
                    raise TemplateError("the chat template builds a string or list of more than "
                                        f"{MAX_VALUE_LENGTH} items; refusing it")
        return _checked(self.binop_table[op](left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's call signature)
        _check_arguments(args, kwargs)
        _state().check_time()
        return _checked(super().call(__context, __obj, *args, **kwargs))

    def _parse(self, source, name, filename):
        # Every for-loop iterates through the guard, so nested loops are counted in full.
        # `a ~ b` joins strings without an operator hook: its result goes through a size check.
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(jinja2.nodes.For):
            loop.iter = jinja2.nodes.Filter(loop.iter, _LOOP_GUARD, [], [], None, None, lineno=loop.lineno)
        for parent in list(tree.find_all(jinja2.nodes.Node)):
            for field_name, value in parent.iter_fields():
                if isinstance(value, jinja2.nodes.Concat):
                    setattr(parent, field_name, _size_guard(value))
                elif isinstance(value, list):
                    value[:] = [_size_guard(v) if isinstance(v, jinja2.nodes.Concat) else v for v in value]
        return tree


def _size_guard(node: jinja2.nodes.Concat) -> jinja2.nodes.Filter:
    return jinja2.nodes.Filter(node, _SIZE_GUARD, [], [], None, None, lineno=node.lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' `tojson`: no HTML escaping, unlike jinja's own.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """transformers' `dict` global: builds dicts, exposes nothing else."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """transformers' `namespace`: no underscore-prefixed attributes (no reach into internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")


@functools.lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per template source; raise TemplateError with the line when it does not parse."""
    env = ChatSandbox(trim_blocks=True, lstrip_blocks=True,
                      extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters.update({name: _guarded_filter(f) for name, f in env.filters.items()})
    env.filters[_LOOP_GUARD] = _loop_guard
    env.filters[_SIZE_GUARD] = _checked
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template does not parse (line {exc.lineno}): {exc.message}") from None


def has_generation_markers(source: str) -> bool:
    """Whether the template marks what the assistant generates with `{% generation %}`."""
    return _GENERATION_TAG.search(source) is not None


def render_template(source: str, variables: dict, track_generation: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """Render under the budgets; return the text and (when asked) the `{% generation %}` spans."""
    template = compile_template(source)
    state = _RenderState(deadline=time.monotonic() + RENDER_SECONDS,
                         generation=[] if track_generation else None)
    token = _STATE.set(state)
    chunks: list[str] = []
    try:
        for chunk in template.generate(**variables):
            chunks.append(chunk)
            state.length += len(chunk)
            if state.length > MAX_OUTPUT_CHARS:
                raise TemplateError(f"the chat template wrote more than {MAX_OUTPUT_CHARS} characters; refusing it")
        state.check_time()
    except TemplateError:
        raise
    except jinja2.exceptions.TemplateError as exc:
        raise TemplateError(f"chat template refused the conversation: {exc}") from None
    except RecursionError:
        raise TemplateError("the chat template recurses without end; refusing it") from None
    except Exception as exc:  # noqa: BLE001 (a template's own bug, e.g. 'a' + none: a reject, not a crash)
        raise TemplateError(f"chat template failed on the conversation: {type(exc).__name__}: {exc}") from None
    finally:
        _STATE.reset(token)
    return "".join(chunks), state.generation or []
