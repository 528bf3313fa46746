"""The data sets of a comparison: named sets, the derived ``mtl_gpu12_rest``, and the validation carve.

Folders in the interchange format (:mod:`rlora.data.jsonl`: one sub-folder per task with ``train.jsonl``,
``dev.jsonl`` and maybe a labels file). Nothing here changes a source folder: derived folders are written
under the comparison's results folder, and their bytes are a pure function of the source rows and the
seed, so a re-run writes the same files and the cells keyed on their contents resume.

* :func:`resolve_sets`: ``--sets`` names -> folders. A name that is an existing folder is used as is; a
  name of :data:`DERIVED` is built (below); any other name is a folder of the data root (the folder
  that holds the config's ``data.path``, e.g. ``../shared/data`` for ``compare_cpu.yaml``).
* ``mtl_gpu12_rest`` (:func:`build_subset`): the tasks of ``mtl_gpu12`` that are not in ``mtl_cpu6``
  (arc_challenge, clinc150, fever, tweet_hate, tweet_irony, winogrande_ni), each subsampled to the
  per-task size of ``mtl_cpu6`` (at most 1,000 train and 200 dev rows): rows drawn without replacement
  with ``numpy.random.default_rng([0, crc32(task), split])``, kept in file order.
* :func:`carve_validation`: per task, ``rows`` training rows drawn with ``default_rng([seed, crc32(task)])``
  become ``val.jsonl``; ``train.jsonl`` keeps the others (file order), ``dev.jsonl`` and labels files are
  copied unchanged. So the validation rows are disjoint from the dev rows (ids are unique across a task's
  files, and the loader checks it) and from the rows any run on the carved folder trains on.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from ..config import ConfigError

# name -> (source set, set whose tasks are left out and whose per-task size is matched)
DERIVED: Mapping[str, tuple[str, str]] = {"mtl_gpu12_rest": ("mtl_gpu12", "mtl_cpu6")}
SPLITS = ("train", "dev")


def _lines(path: Path) -> list[bytes]:
    """The non-blank lines of a JSONL file, bytes as written (a final newline added where missing)."""
    return [ln if ln.endswith(b"\n") else ln + b"\n" for ln in path.read_bytes().splitlines(keepends=True)
            if ln.strip()]


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` unless the file already holds exactly it (atomic replace)."""
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def task_folders(root: Path) -> list[Path]:
    """Task sub-folders of a set, sorted by name (hidden and ``_`` folders left out, as the loader does)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _copy_extras(src: Path, dst: Path) -> None:
    for f in sorted(src.glob("*.json")):
        _write(dst / f.name, f.read_bytes())


def _draw(n: int, k: int, seed: list[int]) -> np.ndarray:
    """``k`` of ``range(n)`` without replacement, sorted (all of them when ``k >= n``)."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def build_subset(source: Path, like: Path, out: Path, seed: int = 0) -> Path:
    """The tasks of ``source`` not in ``like``, each capped at ``like``'s largest per-task train / dev row
    counts (rows drawn as in the module docstring). Returns ``out``."""
    for p in (source, like):
        if not p.is_dir():
            raise ConfigError(f"data set folder {p} does not exist: check the data root (the folder holding "
                              "data.path) or give --sets a folder")
    known = {p.name for p in task_folders(like)}
    caps = {split: max(len(_lines(p / f"{split}.jsonl")) for p in task_folders(like)) for split in SPLITS}
    tasks = [p for p in task_folders(source) if p.name not in known]
    if not tasks:
        raise ConfigError(f"{source} has no task that {like} lacks: nothing to build")
    for task in tasks:
        for k, split in enumerate(SPLITS):
            rows = _lines(task / f"{split}.jsonl")
            keep = _draw(len(rows), caps[split], [seed, zlib.crc32(task.name.encode()), k])
            _write(out / task.name / f"{split}.jsonl", b"".join(rows[i] for i in keep))
        _copy_extras(task, out / task.name)
    stale = {p.name for p in task_folders(out)} - {t.name for t in tasks} if out.is_dir() else set()
    if stale:
        raise ConfigError(f"{out} holds task folders {sorted(stale)} that {source} does not give: remove {out}")
    return out


def _check_val_rows(source: Path, train_rows: Mapping[str, int], rows: int) -> None:
    """One-line error unless every task keeps at least half its training rows after ``rows`` are carved out."""
    if rows < 1:
        raise ConfigError(f"--val-rows must be >= 1, got {rows}")
    for task, n in train_rows.items():
        if n < 2 * rows:
            raise ConfigError(f"task {task} of {source} has {n} training rows: --val-rows {rows} would "
                              f"leave fewer than half to train on; lower --val-rows")


def _stale_carve(source: Path, out: Path) -> list[str]:
    """What a folder carved earlier at ``out`` holds that a carve of ``source`` would not write: task folders
    (``"task/"``) and ``.jsonl`` / ``.json`` files (``"task/file"``), sorted."""
    stale, tasks = [], {t.name for t in task_folders(source)}
    for task in task_folders(out) if out.is_dir() else []:
        if task.name not in tasks:
            stale.append(f"{task.name}/")
            continue
        src = source / task.name
        want = {"train.jsonl", "val.jsonl", *(f.name for f in [*src.glob("*.jsonl"), *src.glob("*.json")])}
        stale += [f"{task.name}/{f.name}" for f in [*task.glob("*.jsonl"), *task.glob("*.json")] if f.name not in want]
    return sorted(stale)


def carve_validation(source: Path, out: Path, rows: int, seed: int) -> Path:
    """``out``: ``source`` with ``rows`` training rows per task moved to ``val.jsonl`` (module docstring).
    Every task is checked before anything is written."""
    trains = {task.name: _lines(task / "train.jsonl") for task in task_folders(source)}
    _check_val_rows(source, {t: len(rows_) for t, rows_ in trains.items()}, rows)
    stale = _stale_carve(source, out)
    if stale:
        raise ConfigError(f"{out} holds {stale} that a carve of {source} does not write (an older carve of "
                          f"other data): remove {out}")
    for task in task_folders(source):
        train = trains[task.name]
        val = set(_draw(len(train), rows, [seed, zlib.crc32(task.name.encode())]).tolist())
        _write(out / task.name / "val.jsonl", b"".join(r for i, r in enumerate(train) if i in val))
        _write(out / task.name / "train.jsonl", b"".join(r for i, r in enumerate(train) if i not in val))
        for f in sorted(task.glob("*.jsonl")):
            if f.name not in ("train.jsonl", "val.jsonl"):
                _write(out / task.name / f.name, f.read_bytes())
        _copy_extras(task, out / task.name)
    return out


def check_sets(names: list[str], data_root: Optional[Path], val_rows: Optional[int] = None) -> dict[str, str]:
    """Check every ``--sets`` name, writing nothing: each resolves to a folder (or a derived set whose sources
    exist and give a task), no set name (a folder's basename) twice, and, with ``val_rows``, every task of
    every set (a derived set: as it will be built) keeps at least half its training rows after the carve.
    Returns ``{set name: the name as given}``; one-line :class:`~rlora.config.ConfigError` otherwise."""
    keys: dict[str, str] = {}
    for name in names:
        if Path(name).is_dir():
            key, folder = Path(name).resolve().name, Path(name).resolve()
            train = {t.name: len(_lines(t / "train.jsonl")) for t in task_folders(folder)} if val_rows else {}
        elif data_root is None:
            raise ConfigError(f"--sets {name}: no data root to find it in (data.path is not set): give a folder")
        elif name in DERIVED:
            source, like = (data_root / x for x in DERIVED[name])
            for p in (source, like):
                if not p.is_dir():
                    raise ConfigError(f"--sets {name}: data set folder {p} does not exist: check the data root (the "
                                      "folder holding data.path) or give --sets a folder")
            known = {p.name for p in task_folders(like)}
            tasks = [t for t in task_folders(source) if t.name not in known]
            if not tasks:
                raise ConfigError(f"--sets {name}: {source} has no task that {like} lacks: nothing to build")
            key, folder = name, source
            if val_rows:
                cap = max(len(_lines(p / "train.jsonl")) for p in task_folders(like))
                train = {t.name: min(cap, len(_lines(t / "train.jsonl"))) for t in tasks}
        else:
            folder = data_root / name
            if not folder.is_dir():
                have = sorted(p.name for p in data_root.iterdir() if p.is_dir()) if data_root.is_dir() else []
                raise ConfigError(f"--sets {name}: {folder} does not exist: use a folder, one of {have} in "
                                  f"{data_root}, or a derived set {sorted(DERIVED)}")
            key = name
            train = {t.name: len(_lines(t / "train.jsonl")) for t in task_folders(folder)} if val_rows else {}
        if key in keys:
            raise ConfigError(f"--sets {','.join(names)} names the set {key} twice ({keys[key]} and {name}): every "
                              "set needs its own name; rename or drop one")
        keys[key] = name
        if val_rows:
            _check_val_rows(folder if name not in DERIVED else Path(name), train, val_rows)
    return keys


def resolve_sets(names: list[str], data_root: Optional[Path], work: Path,
                 val_rows: Optional[int] = None) -> dict[str, Path]:
    """``{set name: folder}`` for the ``--sets`` names (module docstring); derived sets built under ``work``.
    Every name is checked (:func:`check_sets`, with ``val_rows`` when given) before anything is built."""
    out: dict[str, Path] = {}
    for key, name in check_sets(names, data_root, val_rows).items():
        if Path(name).is_dir():  # the order of check_sets: an existing folder first, then a derived set
            out[key] = Path(name).resolve()
        elif name in DERIVED:
            source, like = DERIVED[name]
            out[key] = build_subset(data_root / source, data_root / like, work / name)
        else:
            out[key] = (data_root / name).resolve()
    return out
