"""TemplateError: a chat template cannot render a conversation, or would train the wrong tokens.

`reason` is short and countable, so the dataset stage can put it in rejects.jsonl as is.
"""
from __future__ import annotations

from builder.errors import TunefileError

REASONS = (
    "template_error",      # the template does not parse, raises, or breaks a sandbox limit
    "dropped_message",     # a system/user message (or a trained answer) is missing from the text
    "no_end_of_turn",      # nothing after a trained answer that the model could learn to stop on
    "double_bos",          # the tokens start with two BOS tokens
    "not_prefix_stable",   # the prompt at inference is not the prefix the answer was trained after
    "no_trained_tokens",   # the example has no token that carries loss
)


class TemplateError(TunefileError):
    """A template cannot render a conversation, or would train nothing / the wrong characters."""

    def __init__(self, message: str, reason: str = "template_error"):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
