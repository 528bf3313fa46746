"""Read one task folder in the JSONL interchange format.

A task folder holds ``train.jsonl``, ``dev.jsonl`` (maybe ``test.jsonl``), one UTF-8 JSON object per
line: ``{"task", "id", "input", "options", "target"}``. ``options`` is a list of strings, the name of a
JSON list beside the file (``"labels.json"``), or ``null`` for free-form answers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import DataError, short
from .example import Example, OptionsInterner, check_options_list, check_unique_ids, make_example


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for every non-blank line; bad bytes or JSON raise :class:`DataError`."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                                f"{err.start + 1}): re-save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno}): "
                                "write one JSON object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: a row must be a JSON object, got {type(row).__name__}: "
                                "write one {\"id\", \"input\", \"options\", \"target\"} object per line")
            yield lineno, row


def read_labels_file(path: Path, where: str) -> list[str]:
    """A labels file is a JSON list of distinct non-empty strings."""
    if not path.is_file():
        raise DataError(f"{where}: field 'options' names {path.name}, but {path} does not exist: add the labels "
                        "file beside the data file or list the options inline")
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable JSON file ({_reason(err)}): write a JSON list of label strings") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise DataError(f"{path}: must be a non-empty JSON list of non-empty strings: fix the labels file")
    if len(set(labels)) != len(labels):
        dup = next(x for x in labels if labels.count(x) > 1)
        raise DataError(f"{path}: label {short(dup)} occurs twice: make the labels distinct")
    return labels


def _reason(err: Exception) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at line {err.lineno} column {err.colno}"
    return "not UTF-8"


class _OptionsResolver:
    """Turns the raw ``options`` value of a row into a list, loading label files once per folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.labels: dict[str, list[str]] = {}
        self.intern = OptionsInterner()
        self.where = ""

    def __call__(self, value: Any) -> Optional[list[str]]:
        if value is None:
            return None
        if isinstance(value, str):
            if value not in self.labels:
                if Path(value).name != value or not value.endswith(".json"):
                    raise DataError(f"{self.where}: field 'options' is the string {short(value)}: use a list, "
                                    "null, or the name of a .json labels file in the task folder")
                self.labels[value] = read_labels_file(self.folder / value, self.where)
            return self.labels[value]
        return self.intern(check_options_list(value, self.where))


def split_file(folder: Path, split: str) -> Path:
    return folder / f"{split}.jsonl"


def read_task_dir(folder: str | Path, split: str = "train", task: str | None = None,
                  check_ids_across_files: bool = True) -> list[Example]:
    """Read and validate ``<folder>/<split>.jsonl``.

    ``task`` names the examples (default: the folder name). With ``check_ids_across_files`` the ids
    of the other ``*.jsonl`` files in the folder are read too, and an id that occurs twice in the task
    is an error. Every problem raises :class:`DataError` with a one-line message.
    """
    return list(iter_task_dir(folder, split, task, check_ids_across_files))


def task_file(folder: str | Path, split: str = "train") -> Path:
    """``<folder>/<split>.jsonl``, checked to exist (one-line :class:`DataError` otherwise)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"task folder {folder} does not exist: check data.path and the task name")
    path = split_file(folder, split)
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.jsonl"))
        raise DataError(f"{path} does not exist (splits here: {', '.join(have) or 'none'}): add {path.name} "
                        "or choose another split")
    return path


def iter_task_dir(folder: str | Path, split: str = "train", task: str | None = None,
                  check_ids_across_files: bool = True) -> Iterator[Example]:
    """:func:`read_task_dir` as a stream: the rows are yielded as they are read (memory: the ids seen so
    far, not the rows), and the checks that need the whole file (empty file, ids across files) raise
    after the last row."""
    folder = Path(folder)
    path = task_file(folder, split)
    name = task or folder.name
    resolve = _OptionsResolver(folder)
    seen: dict[str, str] = {}
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        resolve.where = where
        ex = make_example(row, where, name, resolve)
        check_unique_ids(((ex.id, where),), seen)
        yield ex
    if not seen:
        raise DataError(f"{path}: no rows, so task {name} is empty: add rows or remove the task")
    if check_ids_across_files:
        for other in sorted(folder.glob("*.jsonl")):
            if other == path:
                continue
            check_unique_ids(((str(row.get("id")), f"{other}:{lineno}")
                              for lineno, row in iter_jsonl(other) if "id" in row), seen)
