"""Errors tunefile shows to users: one class per kind, each message says what, where and what is allowed."""


class TunefileError(Exception):
    """Base class: the CLI prints these as one clean message (no traceback) and exits 1."""


class RecipeError(TunefileError):
    """A recipe (or params.yaml) is malformed; the message carries file:line and the allowed values."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class DataError(TunefileError):
    """A data source cannot be read or has too many malformed rows."""


class FileFormatError(DataError):
    """A JSON or JSONL file the user gave cannot be read; the message is `FILE:LINE: what was wrong`."""


class StageError(TunefileError):
    """A stage cannot run: a missing upstream output, a tool that refuses the input, ..."""
