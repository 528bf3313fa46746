"""The one exception type for bad task data."""
from __future__ import annotations


class DataError(ValueError):
    """Bad task data. The message is one line: where (file, line, field), what is wrong, and the fix."""


def short(value: object, limit: int = 60) -> str:
    """``repr`` of a value, cut to ``limit`` characters so messages stay on one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
