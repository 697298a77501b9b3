"""Errors chatmask raises on bad input.

Every message says what is wrong, where (file:line or row, message index), what was found, and what to
do. They subclass ValueError so callers that already catch bad input keep working.
"""


FIX_ROW = "Fix the row, or pass --skip-invalid to drop such rows and count them."


class ChatmaskError(ValueError):
    """Base class: bad input or configuration that the user can fix."""

    #: short machine-readable reason used when rows are dropped and counted (e.g. "no assistant turn")
    reason: str = "invalid"

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConversationError(ChatmaskError):
    """A row of data cannot become a training example (bad shape, no trained token, too long)."""


class TemplateError(ChatmaskError):
    """A chat template raised, is missing, or renders something chatmask cannot label exactly."""


class ConfigError(ChatmaskError):
    """Options that do not fit together or name something that does not exist."""


class ChatmaskWarning(UserWarning):
    """Something about the data or template that makes labels less than exact (said once, not per row)."""


def short(text: object, width: int = 60) -> str:
    """A short repr of user data for error messages: `'Hello wor…'`."""
    r = repr(text)
    return r if len(r) <= width else r[: width - 1] + "…"
