"""render_chat: the text transformers' apply_chat_template renders, and the character spans that carry loss.

How the spans are found, for any template, in two renders (both linear in the conversation):
1. The conversation is rendered as is: that is the text.
2. It is rendered again with each message's content replaced by a sentinel (`\\ue000<i>\\ue001`:
   private-use characters and digits, unchanged by trim, upper or lower). This skeleton shows
   where the template put each message and which characters are the template's own. Walking it
   against the text gives each content's exact position, also when the template trims content,
   moves the system prompt into the first user turn, adds BOS, or writes a message twice. Where
   the walk does not line up (the template branches on the content itself), each content is
   searched for, in the order the skeleton shows them. The skeleton depends only on the
   conversation's shape (roles and other non-content fields), so same-shaped conversations share
   one: a dataset pays about one render per conversation.
3. The end-of-turn marker is learnt once per template from a probe conversation: the text that
   follows an assistant message both mid-conversation and at the end, trailing whitespace
   dropped (`<|im_end|>`, `<|eot_id|>`, ` </s>`, `<end_of_turn>`, `<|end|>` ...).
   A template that writes no end-of-turn token at all (older instruct formats that separate turns
   with a blank line or the next role's header: `### Assistant: ...\n\n### User: ...`) has only
   a whitespace separator there: `EndOfTurn.has_token` is False, and the dataset stage's policy
   (`no_end_of_turn`) decides whether EOS is appended after each answer (`append_eos`).
A trained span is an assistant message's content plus the marker (or separator) right after it.
An assistant message the text does not contain, a system or user message the template silently
leaves out, or a trained answer with no marker after it is a TemplateError with a countable `reason`.
"""
from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass

from builder.templates.errors import TemplateError
from builder.templates.sandbox import render_template
from builder.templates.substitute import VERIFY_PER_SHAPE, shape_of, substituted, variables_key

TRAIN_ON = ("all_assistant", "last_assistant", "all")
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000([0-9]+)\ue001")
_PROBES = (("user", "assistant", "user", "assistant"),
           ("system", "user", "assistant", "user", "assistant"))
_MAX_WHITESPACE_TRIES = 64  # leading/trailing whitespace lengths tried when a template trims content
_MARKERS: dict[tuple[str, str], EndOfTurn] = {}
_SKELETONS: dict[tuple[str, str, tuple], str | None] = {}


@dataclass(frozen=True)
class RenderedChat:
    text: str
    trained_spans: list[tuple[int, int]]
    # Where the template writes no end-of-turn token: the end of each trained answer's content,
    # where `append_eos` puts the EOS token. Empty for templates that close turns themselves.
    turn_ends: tuple[int, ...] = ()
    appended: tuple[tuple[int, int], ...] = ()  # spans of text tunefile added (the appended EOS)


def template_variables(bos_token: str | None, eos_token: str | None, add_generation_prompt: bool,
                       extra: dict) -> dict:
    """What apply_chat_template passes besides messages: tools and documents (None unless given),
    add_generation_prompt, the special tokens, and any extra variables (which win). A special token
    that is None is left undefined, as transformers leaves out a token the tokenizer lacks (a
    template that needs it then fails as it would there, instead of rendering a made-up `<s>`)."""
    tokens = {k: v for k, v in {"bos_token": bos_token, "eos_token": eos_token, **extra}.items()
              if not (k.endswith("_token") and v is None)}
    return {"tools": None, "documents": None, "add_generation_prompt": add_generation_prompt, **tokens}


REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def plain_messages(messages: list[dict]) -> list[dict]:
    """A copy as transformers passes it to the template: keys whose value is None are dropped, and
    a message's reasoning (the first of reasoning_content, thinking, reasoning) is offered under
    both `thinking` and `reasoning_content`, whichever name the template reads."""
    plain = []
    for m in messages:
        m = {k: v if type(v) is str else _plain(v) for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if k in m), None)
        plain.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return plain


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _with_sentinels(messages: list[dict]) -> list[dict]:
    return [{**m, "content": _SENTINEL.format(i)} if isinstance(m.get("content"), str) else m
            for i, m in enumerate(messages)]


def _render(source: str, messages: list[dict], variables: dict) -> str:
    return render_template(source, {**variables, "messages": messages})[0]


@dataclass(frozen=True)
class EndOfTurn:
    """What closes an assistant turn: `middle` before another turn, `final` at the end of the
    conversation. Equal for most templates; gpt-oss-like ones close history answers with one
    token (`<|end|>`) and the final answer with another (`<|return|>`). A template with no
    end-of-turn token has only whitespace (or nothing) there: has_token is False, and `opener`
    is the text that opens the next turn (`### User:`), the only sign that an answer ended."""
    middle: str
    final: str
    has_token: bool = True
    opener: str = ""


def end_of_turn_markers(source: str, **variables) -> EndOfTurn:
    """The end-of-turn markers, learnt once per template and variables from probe conversations."""
    variables = {**template_variables(variables.pop("bos_token", None), variables.pop("eos_token", None), False,
                                      variables), "add_generation_prompt": False}
    key = (source, variables_key(variables))
    if key not in _MARKERS:
        if len(_MARKERS) > 256:
            _MARKERS.clear()
        _MARKERS[key] = _learn_markers(source, variables)
    return _MARKERS[key]


NO_END_OF_TURN = ("append_eos", "keep")


def stop_texts(source: str, policy: str = "append_eos", **variables) -> list[str]:
    """What generation should stop on for a model trained with this template: its end-of-turn
    marker; for a template without one, EOS under `append_eos`, else the next turn's opener."""
    markers = end_of_turn_markers(source, **variables)
    if markers.has_token:
        return list(dict.fromkeys([markers.middle.strip(), markers.final.strip()]))
    closer = [markers.final.strip()] if markers.final.strip() else []
    if policy == "append_eos" and variables.get("eos_token"):
        return list(dict.fromkeys([variables["eos_token"], *closer]))
    return closer or ([markers.opener] if markers.opener else [])


def end_of_turn_marker(source: str, **variables) -> str:
    """What the template writes right after the final assistant message, trailing whitespace
    dropped (`<|im_end|>`, `<|eot_id|>`, ...): the token generation stops on."""
    return end_of_turn_markers(source, **variables).final


def _learn_markers(source: str, variables: dict) -> EndOfTurn:
    refusals = []
    for roles in _PROBES:
        probe = [{"role": role, "content": _SENTINEL.format(i)} for i, role in enumerate(roles)]
        try:
            skeleton = _render(source, probe, variables)
        except TemplateError as exc:
            refusals.append(str(exc))
            continue
        first, last = len(roles) - 3, len(roles) - 1  # the two assistant messages
        after_first, after_last = _text_after(skeleton, first), _text_after(skeleton, last)
        if after_first is None or after_last is None:
            refusals.append("the template leaves out assistant messages")
            continue
        # Mid-conversation, the text after an answer runs on into the next turn's opener: drop the
        # part that also opens the conversation's first turn. Otherwise a template that writes a
        # turn opener after the last answer too (Llama-3's first release, Command-R7B) would have
        # the opener learnt as part of the marker.
        middle = _without_opener(after_first, skeleton[:skeleton.find(_SENTINEL.format(0))])
        common = _common_marker(middle or after_first, after_last)
        if common:
            return EndOfTurn(*[_through_eos(common, after_first, after_last, variables.get("eos_token"))] * 2)
        if middle.strip() and after_last.strip():  # different markers by position: <|end|>, <|return|>
            return EndOfTurn(middle.rstrip(), after_last.rstrip())
        # No end-of-turn token: the answer is followed by a separator (whitespace) and, mid-
        # conversation, by the next turn's opener. Some such templates still close the whole
        # conversation with EOS: the final answer keeps that as its marker.
        final = after_last.rstrip() if after_last.strip() else _leading_space(after_last)
        return EndOfTurn(_leading_space(after_first), final, has_token=False,
                         opener=after_first.strip().splitlines()[0].strip() if after_first.strip() else "")
    raise TemplateError("the template refuses a plain user/assistant conversation: " + "; ".join(refusals))


def _leading_space(text: str) -> str:
    return text[:len(text) - len(text.lstrip())]


def _through_eos(marker: str, after_first: str, after_last: str, eos: str | None) -> str:
    """The marker, extended through the EOS token where the template writes it next after every
    answer. Cutting the next turn's opener can cut a closing EOS shared with the system turn too
    (Command-R7B closes answers with `<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`); EOS is the stop token."""
    if not eos:
        return marker
    both = _common_marker(after_first, after_last)
    rest = both[len(marker):] if both.startswith(marker) else ""
    at = rest.find(eos)
    return marker + rest[:at + len(eos)] if at >= 0 and not rest[:at].strip() else marker


def _without_opener(after: str, opening: str) -> str:
    """`after` without its longest ending, starting at a natural break, that `opening` (the
    template's text before the first message) also ends with; "" if nothing but whitespace is left.
    Where that ending swallows everything (a default system turn before the first user message
    closes with the same token as answers do: gpt-oss, Llama-3.1), a shorter ending that still
    names the user role is taken as the opener."""
    n = 0
    while n < min(len(after), len(opening)) and after[-1 - n] == opening[-1 - n]:
        n += 1
    longest = True
    while n > 0:
        if _is_break(after, len(after) - n) and _is_break(opening, len(opening) - n):
            rest = after[:len(after) - n]
            if rest.strip():
                return rest
            longest = False
        n -= 1
        if not longest and "user" not in after[len(after) - n:].lower():
            break
    return ""


def common_start(a: str, b: str) -> int:
    """Length of the longest common start of a and b that ends where both break naturally: at an
    end, at whitespace, or between `>` and `<`. Phi-3 writes `<|end|>\\n<|user|>` mid-conversation and
    `<|end|>\\n<|endoftext|>` at the end: they share `<|end|>\\n`, not `<|end|>\\n<|`."""
    n = len(os.path.commonprefix([a, b]))
    while n > 0 and not (_is_break(a, n) and _is_break(b, n)):
        n -= 1
    return n


def _common_marker(a: str, b: str) -> str:
    return a[:common_start(a, b)].rstrip()


def _is_break(text: str, n: int) -> bool:
    return (n == 0 or n == len(text) or text[n - 1].isspace() or text[n].isspace()
            or text[n - 1] in ">]" or text[n] in "<[")


def _text_after(skeleton: str, index: int) -> str | None:
    """The template's text between message `index`'s content and the next content (or the end)."""
    sentinel = _SENTINEL.format(index)
    at = skeleton.find(sentinel)
    if at < 0:
        return None
    rest = skeleton[at + len(sentinel):]
    following = _SENTINEL_RE.search(rest)
    return rest[: following.start()] if following else rest


def _match_content(text: str, pos: int, content: str, after: str, final: bool) -> int | None:
    """Where the template's rendering of `content` starting at `pos` ends, if it is the content
    with some of its leading/trailing whitespace trimmed and `after` follows it."""
    end = pos + len(content)
    if (text.startswith(content, pos) and text.startswith(after, end)
            and (not final or end + len(after) == len(text))):
        return end  # the template wrote the content as is: the common case
    core = content.strip()
    lead = content[: len(content) - len(content.lstrip())] if core else content
    trail = content[len(content.rstrip()):] if core else ""
    cuts_lead = _cuts(len(lead))
    for a in cuts_lead:
        head = lead[a:] + core
        if not text.startswith(head, pos):
            continue
        for b in reversed(_cuts(len(trail))):
            end = pos + len(head) + b
            if (text.startswith(trail[:b], pos + len(head)) and text.startswith(after, end)
                    and (not final or end + len(after) == len(text))):
                return end
    return None


def _cuts(n: int) -> list[int]:
    return list(range(n + 1)) if n <= _MAX_WHITESPACE_TRIES else [0, n]


def _walk(skeleton: str, messages: list[dict], text: str) -> list[list[tuple[int, int]]] | None:
    """Each message's content positions in `text`, by walking the skeleton; None if it does not fit."""
    pieces = _SENTINEL_RE.split(skeleton)
    literals, indices = pieces[0::2], [int(i) for i in pieces[1::2]]
    found: list[list[tuple[int, int]]] = [[] for _ in messages]
    if not text.startswith(literals[0]):
        return None
    pos = len(literals[0])
    for j, index in enumerate(indices):
        after = literals[j + 1]
        end = _match_content(text, pos, messages[index]["content"], after, final=j == len(indices) - 1)
        if end is None:
            return None
        found[index].append((pos, end))
        pos = end + len(after)
    return found if pos == len(text) else None


def _search(skeleton: str | None, messages: list[dict], text: str) -> list[list[tuple[int, int]]]:
    """Fallback: find each content (as is, else stripped) in the order the skeleton shows them,
    preferring a match right after the template text the skeleton puts before it."""
    found: list[list[tuple[int, int]]] = [[] for _ in messages]
    if skeleton is not None:
        order = [(int(m.group(1)), skeleton[max(0, m.start() - 16):m.start()])
                 for m in _SENTINEL_RE.finditer(skeleton)]
        order = [(i, anchor.rsplit("\ue001", 1)[-1]) for i, anchor in order]
    else:
        order = [(i, "") for i, m in enumerate(messages) if isinstance(m.get("content"), str)]
    cursor = 0
    for index, anchor in order:
        content = messages[index]["content"]
        if not content.strip():
            continue  # whitespace may be trimmed away entirely: nothing to find, nothing to train
        candidates = list(dict.fromkeys((content, content.strip())))
        # Right after the template text the skeleton puts before it (which may lie just before the
        # cursor) first, as is or stripped; anywhere after the cursor only if that fails.
        tries = [(anchor + c, len(anchor), max(0, cursor - len(anchor))) for c in candidates if anchor]
        for needle, skip, begin in tries + [(c, 0, cursor) for c in candidates]:
            at = text.find(needle, begin)
            if at >= 0:
                found[index].append((at + skip, at + len(needle)))
                cursor = at + len(needle)
                break
    return found


def _skeleton(source: str, messages: list[dict], variables: dict) -> str | None:
    """The render with sentinel contents. It depends on the template, the variables and each
    message's fields other than content (roles, mostly), never on the contents themselves, so
    conversations of the same shape share one render."""
    key = (source, variables_key(variables), shape_of(messages))
    if key not in _SKELETONS:
        if len(_SKELETONS) > 1024:
            _SKELETONS.clear()
        try:
            _SKELETONS[key] = _render(source, _with_sentinels(messages), variables)
        except TemplateError:
            _SKELETONS[key] = None  # the template branches on content so that sentinels break it
    return _SKELETONS[key]


def content_positions(source: str, messages: list[dict], text: str, variables: dict) -> list[list[tuple[int, int]]]:
    """Where each message's content lies in `text` (a list per message: empty if left out, two
    entries if the template writes it twice)."""
    skeleton = _skeleton(source, messages, variables)
    if skeleton is not None:
        walked = _walk(skeleton, messages, text)
        if walked is not None:
            return walked
    return _search(skeleton, messages, text)


def _after_marker(text: str, end: int, marker: str, limit: int) -> int | None:
    """End of the marker that follows a content ending at `end` (whitespace between allowed)."""
    core = marker.lstrip()
    i = end
    while i < limit and text[i].isspace() and not text.startswith(core, i):
        i += 1
    stop = i + len(core)
    return stop if stop <= limit and text.startswith(core, i) else None


def _check_nothing_dropped(messages: list[dict], positions: list[list[tuple[int, int]]]) -> None:
    for i, message in enumerate(messages):
        content = message.get("content")
        if message.get("role") != "assistant" and isinstance(content, str) and content.strip() and not positions[i]:
            raise TemplateError(f"message {i} ({message.get('role')}) does not appear in the rendered text: the "
                                "template leaves it out or rewrites it, so the model would be trained without "
                                "it; use a template that renders this role as given, or drop the message "
                                "(e.g. system_prompt)", reason="dropped_message")


def render_chat(template_source: str, messages: list[dict], bos_token: str | None = "<s>",
                eos_token: str | None = "</s>", add_generation_prompt: bool = False,
                train_on: str = "all_assistant", **extra) -> RenderedChat:
    """Render like HF's apply_chat_template and return the character spans that carry loss."""
    if train_on not in TRAIN_ON:
        raise TemplateError(f"train_on '{train_on}' unknown; allowed: {', '.join(TRAIN_ON)}")
    messages = plain_messages(messages)
    variables = template_variables(bos_token, eos_token, add_generation_prompt, extra)
    fast = substituted(template_source, messages, variables)  # Jinja once per shape, where proven exact
    text = fast[0] if fast is not None else _render(template_source, messages, variables)
    if train_on == "all":
        return RenderedChat(text, [(0, len(text))] if text else [])
    trained = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if train_on == "last_assistant":
        trained = trained[-1:]
    positions = fast[1] if fast is not None else content_positions(template_source, messages, text, variables)
    if fast is not None:  # the spans too follow from the shape: a plan learnt once, checked twice
        plan_key = (template_source, variables_key(variables), train_on, shape_of(messages),
                    tuple(not isinstance(m.get("content"), str) or not m["content"].strip() for m in messages))
        plan = _PLANS.get(plan_key)
        if plan is not None and plan.checked >= VERIFY_PER_SHAPE:
            return _from_plan(plan, text, positions)
    _check_nothing_dropped(messages, positions)
    if not trained:
        return RenderedChat(text, [])
    pieces = _answer_pieces(template_source, variables, messages, positions, text, trained)
    result = RenderedChat(text, _merge([(start, stop) for _, _, start, _, stop, _ in pieces]),
                          turn_ends=tuple(sorted({end for *_, end, _, turn_end in pieces if turn_end})))
    if fast is not None:
        _learn_plan(plan_key, pieces, result, text, positions)
    return result


@dataclass
class _SpanPlan:
    """Per trained content occurrence (message, k-th occurrence): how many characters after the
    content the span runs (its marker or separator), and whether it is a turn end (append_eos)."""
    pieces: list[tuple[int, int, int, bool]]
    checked: int = 0


_PLANS: dict[tuple, _SpanPlan | None] = {}


def _from_plan(plan: _SpanPlan, text: str, positions: list[list[tuple[int, int]]]) -> RenderedChat:
    spans, turn_ends = [], set()
    for i, k, extra, turn_end in plan.pieces:
        start, end = positions[i][k]
        spans.append((start, end + extra))
        if turn_end:
            turn_ends.add(end)
    return RenderedChat(text, _merge(spans), turn_ends=tuple(sorted(turn_ends)))


def _learn_plan(key: tuple, pieces: list, result: RenderedChat, text: str, positions: list) -> None:
    """Record the shape's span plan from a full computation, or check it against one; a mismatch
    turns plans off for the shape (the full computation is used from then on)."""
    plan = _SpanPlan([(i, k, stop - end, turn_end) for i, k, _, end, stop, turn_end in pieces])
    if key not in _PLANS:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        _PLANS[key] = plan
    known = _PLANS[key]
    if known is None:
        return
    if known.pieces != plan.pieces or _from_plan(known, text, positions) != result:
        _PLANS[key] = None
        return
    known.checked += 1


def _answer_pieces(template_source: str, variables: dict, messages: list[dict], positions: list,
                   text: str, trained: list[int]) -> list[tuple[int, int, int, int, int, bool]]:
    """(message, occurrence, start, end, stop, turn_end) for each trained answer's content: the
    span runs from start to stop, through the end-of-turn marker (or separator) after the content."""
    markers = end_of_turn_markers(template_source, **variables)
    starts = sorted(start for found in positions for start, _ in found)
    pieces = []
    for i in trained:
        content = messages[i].get("content")
        if not isinstance(content, str) or (messages[i].get("tool_calls") and not content.strip()):
            raise TemplateError(f"message {i} (assistant) has no text content: tool calls alone cannot be "
                                "trained yet (train_on: last_assistant trains only the final answer)",
                                reason="dropped_message")
        if not positions[i]:
            raise TemplateError(f"message {i} (assistant) does not appear in the rendered text: the template "
                                "drops or rewrites it, so it cannot be trained", reason="dropped_message")
        for k, (start, end) in enumerate(positions[i]):
            # The marker must lie in the template's text before the next content.
            at = bisect.bisect_left(starts, end + (start == end))
            limit = starts[at] if at < len(starts) else len(text)
            marker = markers.middle if at < len(starts) else markers.final
            if not markers.has_token and not marker.strip():  # the content and the separator after it, if any
                pieces.append((i, k, start, end, end + len(os.path.commonprefix([text[end:limit], marker])), True))
                continue
            stop = _after_marker(text, end, marker, limit)
            if stop is None and marker != markers.middle:  # a final answer closed as a middle one
                stop = _after_marker(text, end, markers.middle, limit)  # (add_generation_prompt)
            if stop is None:
                raise TemplateError(f"message {i} (assistant) is not followed by the end-of-turn marker "
                                    f"{marker!r}, so the model would not learn to stop there",
                                    reason="no_end_of_turn")
            pieces.append((i, k, start, end, stop, False))
    return pieces


def append_eos(rendered: RenderedChat, eos_token: str) -> RenderedChat:
    """The `append_eos` policy for templates without an end-of-turn token: EOS written right after
    each trained answer's content (before the separator) and trained, as FastChat and Axolotl do,
    so the model learns to stop. `appended` records where it went (for preview)."""
    if not rendered.turn_ends:
        return rendered
    pieces, appended, shift, last = [], [], 0, 0
    for end in rendered.turn_ends:
        pieces += [rendered.text[last:end], eos_token]
        appended.append((end + shift, end + shift + len(eos_token)))
        shift += len(eos_token)
        last = end
    pieces.append(rendered.text[last:])

    def moved(pos: int, inclusive: bool) -> int:  # a position after n insertions moves by n * len(eos)
        n = bisect.bisect_right(rendered.turn_ends, pos) if inclusive else bisect.bisect_left(rendered.turn_ends, pos)
        return pos + n * len(eos_token)

    spans = [(moved(a, False), moved(b, True)) for a, b in rendered.trained_spans]
    return RenderedChat("".join(pieces), spans, turn_ends=(), appended=tuple(appended))


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged
