"""Load every task of a run (``rlora.config.DataConfig``) for one split."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

from .errors import DataError
from .example import Example
from .hf_source import iter_hf_source, source_path
from .jsonl import iter_task_dir, task_file


def task_specs(data_cfg) -> list:
    """The run's tasks in order: ``data.tasks`` as written, else every task folder of ``data.path`` sorted by name."""
    from rlora.config import TaskSpec

    if data_cfg.tasks:
        names = [t.name for t in data_cfg.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DataError(f"data.tasks names {dup} more than once: give each task a distinct name")
        return list(data_cfg.tasks)
    if not data_cfg.path:
        raise DataError("data.path is not set and data.tasks is empty: set data.path to a folder with one "
                        "subfolder per task")
    root = Path(data_cfg.path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path {root} does not exist: fix data.path (a folder with one subfolder per task)")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not names:
        raise DataError(f"data.path {root} has no task folders: put one folder per task (train.jsonl, dev.jsonl) there")
    return [TaskSpec(name=n) for n in names]


def task_names(data_cfg) -> list[str]:
    """Task names in run order (task id ``i`` is ``task_names(cfg)[i]``)."""
    return [t.name for t in task_specs(data_cfg)]


def prompt_templates(data_cfg) -> dict[str, Optional[str]]:
    return {t.name: t.prompt_template for t in task_specs(data_cfg)}


def _task_folder(spec, data_cfg) -> Path:
    if spec.path:
        return Path(spec.path).expanduser()
    if not data_cfg.path:
        raise DataError(f"data.tasks[{spec.name}] has no path and data.path is not set: set one of them "
                        "(or hf_source)")
    return Path(data_cfg.path).expanduser() / spec.name


def load_task(spec, data_cfg, split: str = "train") -> list[Example]:
    """Read one task (folder or ``hf_source``) and apply its example limits."""
    return list(iter_task(spec, data_cfg, split))


def row_cap(spec, data_cfg, split: str = "train") -> Optional[int]:
    """The number of leading rows a task keeps: the smallest of ``data.tasks[].max_examples`` and (train
    only) ``data.max_train_examples_per_task``; ``None`` for every row."""
    limits = [spec.max_examples]
    if split == "train":
        limits.append(data_cfg.max_train_examples_per_task)
    for field, limit in zip(("data.tasks[%s].max_examples" % spec.name, "data.max_train_examples_per_task"), limits):
        if limit is not None and limit < 1:
            raise DataError(f"{field} must be >= 1 (or null for all rows), got {limit}")
    return min((x for x in limits if x is not None), default=None)


def iter_task(spec, data_cfg, split: str = "train") -> Iterator[Example]:
    """The rows of one task as a stream, limits applied. Rows past the cap are still read and checked
    (a bad row anywhere in the file is an error, as when the whole task is loaded)."""
    if spec.hf_source:
        rows = iter_hf_source(spec.name, spec.hf_source, spec.columns, split)
    else:
        if spec.columns:
            raise DataError(f"data.tasks[{spec.name}].columns is only used with hf_source: set hf_source or drop columns")
        rows = iter_task_dir(_task_folder(spec, data_cfg), split, task=spec.name)
    cap = row_cap(spec, data_cfg, split)
    for i, ex in enumerate(rows):
        if cap is None or i < cap:
            yield ex


def source_files(spec, data_cfg, split: str = "train") -> list[Path]:
    """The files whose content decides a task's rows for ``split``: the split's JSONL file and the ``.json``
    label files beside it, or every file of an ``hf_source`` (a folder is walked)."""
    if spec.hf_source:
        path = source_path(spec.hf_source, split, spec.name)
        return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    folder = _task_folder(spec, data_cfg)
    return [task_file(folder, split)] + sorted(folder.glob("*.json"))


def load_tasks(data_cfg, split: str = "train") -> dict[str, list[Example]]:
    """``task name -> examples`` for ``split``, in run order.

    Limits: ``data.tasks[].max_examples`` (every split) and ``data.max_train_examples_per_task`` (train
    only) keep the first rows of the file.
    """
    return {spec.name: load_task(spec, data_cfg, split) for spec in task_specs(data_cfg)}
