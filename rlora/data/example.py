"""The in-memory form of one task row, and the checks every source (JSONL, datasets) shares."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from .errors import DataError, short

REQUIRED_FIELDS = ("id", "input", "options", "target")


@dataclass
class Example:
    """One row. ``options`` is the list of answer choices (``None`` for a free-form answer);
    ``target`` is the answer text, one of ``options`` when they are given."""

    task: str
    id: str
    input: str
    options: Optional[list[str]]
    target: str

    @property
    def is_multiple_choice(self) -> bool:
        return self.options is not None

    @property
    def label(self) -> Optional[int]:
        """Index of the target among the options (the first match), or ``None`` for free-form rows."""
        return None if self.options is None else self.options.index(self.target)


class OptionsInterner:
    """Rows of one task usually share one option list; keep a single list object per distinct list."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, ...], list[str]] = {}

    def __call__(self, options: list[str]) -> list[str]:
        key = tuple(options)
        return self._seen.setdefault(key, list(options))


def make_example(row: dict[str, Any], where: str, task: str,
                 resolve_options: Callable[[Any], Optional[list[str]]]) -> Example:
    """Validate one row and build an :class:`Example`.

    ``where`` locates the row in messages (``"path:line"``); ``resolve_options`` turns the raw
    ``options`` value into a list (or ``None``) and raises :class:`DataError` itself when it cannot.
    """
    for name in REQUIRED_FIELDS:
        if name not in row:
            raise DataError(f"{where}: missing field '{name}': every row needs id, input, options and target "
                            "(options null for free-form answers)")
    rid, text, target = row["id"], row["input"], row["target"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
        raise DataError(f"{where}: field 'id' must be a non-empty string or integer, got {short(rid)}: fix the id")
    if not isinstance(text, str):
        raise DataError(f"{where}: field 'input' must be a string, got {short(text)}: fix the input")
    if not isinstance(target, str) or not target.strip():
        raise DataError(f"{where}: field 'target' must be a non-empty string, got {short(target)}: fix the target")
    if "task" in row and row["task"] is not None and not isinstance(row["task"], str):
        raise DataError(f"{where}: field 'task' must be a string, got {short(row['task'])}: use the task folder name")
    options = resolve_options(row["options"])
    if options is not None and target not in options:
        raise DataError(f"{where}: field 'target' {short(target)} is not one of the {len(options)} options: "
                        "fix the target or add it to the options")
    return Example(task=task, id=str(rid), input=text, options=options, target=target)


def check_options_list(value: Any, where: str) -> list[str]:
    """A literal options list must be a non-empty list of non-empty strings."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field 'options' must be a non-empty list of strings, a labels file name "
                        f"or null, got {short(value)}: fix the options")
    for opt in value:
        if not isinstance(opt, str) or opt == "":
            raise DataError(f"{where}: field 'options' holds {short(opt)}, not a non-empty string: fix the options")
    return value


def check_unique_ids(located: Iterable[tuple[str, str]], seen: dict[str, str] | None = None) -> dict[str, str]:
    """Raise on the first id seen twice. ``located`` yields ``(id, where)``; returns ``id -> where``."""
    seen = {} if seen is None else seen
    for rid, where in located:
        first = seen.get(rid)
        if first is not None:
            raise DataError(f"{where}: field 'id' {short(rid)} is already used at {first}: make ids unique "
                            "within the task, across its files")
        seen[rid] = where
    return seen
