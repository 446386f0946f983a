"""The one canonical form every source becomes: a Conversation of role/content Messages."""
from __future__ import annotations

from dataclasses import dataclass, replace

ROLES = ("system", "user", "assistant")
REJECTED = "rejected"  # a last pseudo-message carrying a preference pair's rejected answer


class RowError(ValueError):
    """A row cannot become a conversation; the message is the reject reason."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason  # short, countable: "missing_field", "bad_json", ...
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    source: str
    row: int  # 1-based row (line for .jsonl) in the source file, for rejects and provenance
    file: str = ""  # the file (relative to the project root) the row came from
    rejected: str | None = None  # a preference pair's rejected answer (the messages end with the chosen)

    def to_dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


def make_conversation(messages: list[tuple[str, object]], source: str, row: int, file: str = "") -> Conversation:
    """Check roles and contents and build a Conversation; raise RowError with the reason."""
    rejected = None
    if messages and messages[-1][0] == REJECTED:
        rejected, messages = messages[-1][1], messages[:-1]
    checked = []
    for i, (role, content) in enumerate(messages):
        if role not in ROLES:
            raise RowError("bad_role", f"message {i} has role {role!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError("bad_type", f"message {i} content is {type(content).__name__}, not text")
        if not content.isascii():
            try:
                content.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a JSON "\udc80" escape
                raise RowError("bad_encoding", f"message {i} has a character that is not valid text "
                                               f"({content[exc.start]!r} at {exc.start})") from None
        checked.append(Message(role, content))
    body = checked[1:] if checked and checked[0].role == "system" else checked
    if not body:
        raise RowError("empty", "no user/assistant messages")
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise RowError("roles_not_alternating", f"turn {i} is {message.role}, expected {expected}")
    if body[-1].role != "assistant":
        raise RowError("no_final_answer", "the conversation ends with a user turn")
    if any(not m.content.strip() for m in body if m.role == "assistant"):
        raise RowError("empty_response", "an assistant message is empty")
    return Conversation(tuple(checked), source, row, file, rejected)


def with_system_prompt(conversation: Conversation, prompt: str | None) -> Conversation:
    """The conversation with `prompt` as its first message, unless it has a system message already."""
    if prompt is None or conversation.messages[0].role == "system":
        return conversation
    return replace(conversation, messages=(Message("system", prompt),) + conversation.messages)
