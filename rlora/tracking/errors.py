"""The one error type of the diagnostics."""


class DiagnosticsError(ValueError):
    """Bad input to a diagnostic (one line, names the argument and the fix)."""
