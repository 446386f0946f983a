"""Where a base model or a dataset comes from, parsed once from the recipe's string.

    builtin:tiny-llama          a builtin model, generated on the spot
    hf:org/name@revision        a hub repository, pinned by revision (a commit hash, a tag)
    path/to/folder              a local model folder (relative to the project root)

Recipes keep the string (it is what keys and lineage record); code asks the parsed value.
"""
from __future__ import annotations

from dataclasses import dataclass

BUILTIN_PREFIX, HUB_PREFIX = "builtin:", "hf:"


@dataclass(frozen=True)
class HubRef:
    repo: str      # org/name
    revision: str  # pins the exact files

    def __str__(self) -> str:
        return f"{HUB_PREFIX}{self.repo}@{self.revision}"


def is_hub(text: str) -> bool:
    return text.startswith(HUB_PREFIX)


def parse_hub(text: str, pinned: str = "files") -> HubRef:
    """hf:org/name@revision -> HubRef; ValueError naming the form otherwise."""
    repo, _, revision = text.removeprefix(HUB_PREFIX).partition("@")
    if not is_hub(text) or not repo or "/" not in repo or not revision:
        raise ValueError(f"'{text}' must be hf:org/name@revision (the revision pins the exact "
                         f"{pinned}, e.g. a commit hash)")
    return HubRef(repo=repo, revision=revision)


@dataclass(frozen=True)
class ModelRef:
    """Exactly one of the three is set."""
    builtin: str | None = None  # the builtin's name (tiny-llama)
    hub: HubRef | None = None
    folder: str | None = None   # relative to the project root, as written

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        if text.startswith(BUILTIN_PREFIX):
            return cls(builtin=text.removeprefix(BUILTIN_PREFIX))
        if is_hub(text):
            return cls(hub=parse_hub(text))
        return cls(folder=text)

    def __str__(self) -> str:
        if self.builtin is not None:
            return f"{BUILTIN_PREFIX}{self.builtin}"
        return str(self.hub) if self.hub is not None else str(self.folder)
