"""Row -> conversations adapters, one per `format:` name. Each returns a list of message lists
(`self_instruct` rows give one conversation per instance) and raises RowError on a bad row."""
from __future__ import annotations

from typing import Callable

from builder.records import RowError

Turns = list[tuple[str, object]]
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def _field(row: dict, name: str, required: bool = True) -> object:
    if name not in row or row[name] is None:
        if required:
            raise RowError("missing_field", f"no '{name}' field (row has: {', '.join(sorted(row))})")
        return ""
    return row[name]


def _text(row: dict, name: str, required: bool = True) -> str:
    value = _field(row, name, required)
    if not isinstance(value, str):
        raise RowError("bad_type", f"'{name}' is {type(value).__name__}, expected text")
    return value


def _user_turn(instruction: str, extra_input: str) -> str:
    return f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction


def from_alpaca(row: dict) -> list[Turns]:
    prompt = _user_turn(_text(row, "instruction"), _text(row, "input", required=False))
    return [[("user", prompt), ("assistant", _text(row, "output"))]]


def from_sharegpt(row: dict) -> list[Turns]:
    turns = _field(row, "conversations")
    if not isinstance(turns, list):
        raise RowError("bad_type", "'conversations' is not a list")
    out: Turns = [("system", _text(row, "system"))] if row.get("system") else []
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
    return [[("user", _text(row, "prompt")), ("assistant", _text(row, "completion"))]]


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
}
