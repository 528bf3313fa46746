"""The one error type of export and registration."""
from __future__ import annotations


class ExportError(ValueError):
    """A user error while exporting or registering an adapter: one line that names the input and the fix."""
