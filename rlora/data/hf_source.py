"""Read a task from a local Hugging Face ``datasets`` source: a parquet/json/jsonl/csv file or a folder
written by ``save_to_disk``, with a column mapping.

``columns`` maps the row fields to column names: ``input``, ``target``, ``options``, ``id``, ``task``
(defaults: the field names themselves; ``options`` and ``id`` may be absent). A ``task`` column keeps
only the rows whose value equals the task name. An integer ``ClassLabel`` target is mapped to its
label name, and the label names become the options when there is no options column.

Splits: ``{split}`` in the path is replaced by the split name (``data/sst2_{split}.parquet``); a saved
``DatasetDict`` is indexed by split (``dev`` also finds ``validation``/``valid``/``val``). A single file
without ``{split}`` is the ``train`` split only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import DataError
from .example import Example, OptionsInterner, check_options_list, check_unique_ids, make_example

COLUMN_KEYS = ("input", "target", "options", "id", "task")
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
SPLIT_ALIASES = {"dev": ("dev", "validation", "valid", "val"), "test": ("test",), "train": ("train",)}


def _load_dataset(path: Path, split: str, name: str):
    import datasets

    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"{path}: not a folder written by save_to_disk ({str(err).splitlines()[0]}): "
                            f"fix data.tasks[{name}].hf_source") from None
        if isinstance(ds, datasets.DatasetDict):
            for cand in SPLIT_ALIASES.get(split, (split,)):
                if cand in ds:
                    return ds[cand]
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(ds.keys())}): add the split or "
                            f"point data.tasks[{name}].hf_source at another source")
        return ds
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}: use .parquet, .json, .jsonl, .csv or a "
                        "save_to_disk folder")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # the builders raise many types for unreadable files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: could not be read as {builder} ({first}): fix the file") from None


def _source_path(hf_source: str, split: str, name: str) -> Path:
    if "{split}" in hf_source:
        return Path(hf_source.replace("{split}", split)).expanduser()
    path = Path(hf_source).expanduser()
    if path.is_file() and split != "train":
        raise DataError(f"{path} is one file, used as the train split only, so there is no {split!r} split: put "
                        f"{{split}} in data.tasks[{name}].hf_source or use a save_to_disk DatasetDict")
    return path


def read_hf_source(name: str, hf_source: str, columns: dict[str, str] | None = None,
                   split: str = "train") -> list[Example]:
    """Read task ``name`` from a local datasets source; see the module docstring for the conventions."""
    return list(iter_hf_source(name, hf_source, columns, split))


def source_path(hf_source: str, split: str, name: str) -> Path:
    """The file or folder ``hf_source`` names for ``split`` (one-line :class:`DataError` if it is missing)."""
    path = _source_path(hf_source, split, name)
    if not path.exists():
        raise DataError(f"{path} does not exist: fix data.tasks[{name}].hf_source")
    return path


def iter_hf_source(name: str, hf_source: str, columns: dict[str, str] | None = None,
                   split: str = "train") -> Iterator[Example]:
    """:func:`read_hf_source` as a stream (the source is read row by row from its Arrow map; the checks
    that need every row raise after the last one)."""
    columns = dict(columns or {})
    for key in columns:
        if key not in COLUMN_KEYS:
            raise DataError(f"data.tasks[{name}].columns: unknown key {key!r}: use {', '.join(COLUMN_KEYS)}")
    path = source_path(hf_source, split, name)
    ds = _load_dataset(path, split, name)
    names = list(ds.column_names)

    def column(key: str, required: bool) -> Optional[str]:
        col = columns.get(key, key if key not in ("task",) else None)
        if col is None:
            return None
        if col not in names:
            if key in columns or required:
                raise DataError(f"{path}: column {col!r} (for {key}) not found; columns are {names}: set "
                                f"data.tasks[{name}].columns.{key}")
            return None
        return col

    c_input, c_target = column("input", True), column("target", True)
    c_options, c_id, c_task = column("options", False), column("id", False), column("task", False)
    class_names = _class_label_names(ds.features.get(c_target))
    intern = OptionsInterner()
    seen: dict[str, str] = {}
    for index, rec in enumerate(ds):
        if c_task is not None and rec[c_task] != name:
            continue
        where = f"{path}: row {index}"
        target = rec[c_target]
        if class_names is not None and isinstance(target, int) and not isinstance(target, bool):
            if not 0 <= target < len(class_names):
                raise DataError(f"{where}: label {target} is outside the {len(class_names)} class names: fix the row")
            target = class_names[target]
        if c_options is not None:
            options: Any = rec[c_options]
        else:
            options = class_names
        row = {"id": rec[c_id] if c_id is not None else f"{name}-{index}", "input": rec[c_input],
               "options": options, "target": target}

        def resolve(value: Any, where: str = where) -> Optional[list[str]]:
            return None if value is None else intern(check_options_list(list(value) if isinstance(value, tuple)
                                                                        else value, where))

        ex = make_example(row, where, name, resolve)
        check_unique_ids(((ex.id, where),), seen)
        yield ex
    if not seen:
        which = f" with {c_task} == {name!r}" if c_task else ""
        raise DataError(f"{path}: no rows{which}, so task {name} is empty: add rows or fix the column mapping")


def _class_label_names(feature: Any) -> Optional[list[str]]:
    names = getattr(feature, "names", None)
    return list(names) if names else None
