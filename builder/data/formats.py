"""Row -> conversations adapters, one per `format:` name. Each returns a list of message lists
(`self_instruct` rows give one conversation per instance) and raises RowError on a bad row.

`preference` rows (prompt, chosen, rejected) become the conversation prompt + chosen answer, for
supervised training, with the rejected answer carried along as a last ("rejected", text) entry
that make_conversation keeps beside the messages (for a preference-tuning target)."""
from __future__ import annotations

from collections.abc import Callable

from builder.data.records import REJECTED, RowError

Turns = list[tuple[str, object]]
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def _field(row: dict, name: str, required: bool = True) -> object:
    if name not in row or row[name] is None:
        if required:
            detail = (f"'{name}' is null" if name in row
                      else f"no '{name}' field (row has: {', '.join(sorted(map(str, row))) or 'no fields'})")
            raise RowError("missing_field", detail)
        return ""
    return row[name]


def _text(row: dict, name: str, required: bool = True) -> str:
    value = _field(row, name, required)
    if not isinstance(value, str):
        raise RowError("bad_type", f"'{name}' is {type(value).__name__}, expected text")
    return value


def _user_turn(instruction: str, extra_input: str) -> str:
    return f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction


def _system(row: dict) -> Turns:
    return [("system", _text(row, "system"))] if row.get("system") else []


def from_alpaca(row: dict) -> list[Turns]:
    prompt = _user_turn(_text(row, "instruction"), _text(row, "input", required=False))
    return [_system(row) + [("user", prompt), ("assistant", _text(row, "output"))]]


def from_sharegpt(row: dict) -> list[Turns]:
    turns = _field(row, "conversations")
    if not isinstance(turns, list):
        raise RowError("bad_type", "'conversations' is not a list")
    out: Turns = _system(row)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError("bad_turn", f"turn {i} is not an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise RowError("bad_role", f"turn {i} is from {turn['from']!r}; allowed: {', '.join(SHAREGPT_ROLES)}")
        out.append((role, turn["value"]))
    return [out]


def from_messages(row: dict) -> list[Turns]:
    messages = _field(row, "messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RowError("bad_type", "'messages' is not a list of objects")
    try:
        return [[(m["role"], m["content"]) for m in messages]]
    except KeyError as exc:
        raise RowError("bad_turn", f"a message has no {exc.args[0]!r}") from None


def from_prompt_completion(row: dict) -> list[Turns]:
    return [_system(row) + [("user", _text(row, "prompt")), ("assistant", _text(row, "completion"))]]


def _answer(row: dict, name: str) -> str:
    """A preference answer: text, a {role, content} message, or a list of messages whose last is
    the assistant's (the TRL conversational form)."""
    value = _field(row, name)
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            raise RowError("bad_role", f"'{name}' ends with a {value.get('role')!r} message, expected assistant")
        value = value.get("content")
    if not isinstance(value, str):
        raise RowError("bad_type", f"'{name}' is {type(value).__name__}, expected text or an assistant message")
    if not value.strip():
        raise RowError("empty_response", f"'{name}' is empty")
    return value


def from_preference(row: dict) -> list[Turns]:
    prompt = _field(row, "prompt")
    if isinstance(prompt, str):
        turns: Turns = _system(row) + [("user", prompt)]
    elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        turns = _system(row) + [(m["role"], m["content"]) for m in prompt]
    else:
        raise RowError("bad_type", "'prompt' is neither text nor a list of {role, content} messages")
    chosen, rejected = _answer(row, "chosen"), _answer(row, "rejected")
    if chosen.strip() == rejected.strip():
        raise RowError("same_answers", "'chosen' and 'rejected' are the same answer")
    return [turns + [("assistant", chosen), (REJECTED, rejected)]]


def from_self_instruct(row: dict) -> list[Turns]:
    instruction = _text(row, "instruction")
    instances = _field(row, "instances")
    if not isinstance(instances, list) or not instances:
        raise RowError("bad_type", "'instances' is not a non-empty list")
    out = []
    for instance in instances:
        if not isinstance(instance, dict):
            raise RowError("bad_type", "an instance is not an object")
        prompt = _user_turn(instruction, _text(instance, "input", required=False))
        out.append([("user", prompt), ("assistant", _text(instance, "output"))])
    return out


FORMATS: dict[str, Callable[[dict], list[Turns]]] = {
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "messages": from_messages,
    "prompt_completion": from_prompt_completion,
    "self_instruct": from_self_instruct,
    "preference": from_preference,
}


def apply_fields(row: dict, fields: dict[str, str]) -> dict:
    """The row with its columns renamed to the canonical names (`fields: {output: answer}` reads
    `answer` as `output`)."""
    if not fields:
        return row
    renamed = {k: v for k, v in row.items() if k not in fields.values()}
    renamed.update({canonical: row[column] for canonical, column in fields.items() if column in row})
    return renamed
