"""The input of a comparison: evaluated cells of a (method, sampler, seed) grid, checked.

A *cell* is one trained model scored on the dev rows of every task::

    {"method": "hydra", "sampler": "proportional", "seed": 3,
     "correct": {"task_a": [1, 0, 1, ...], "task_b": [0, 1, ...]},  # one score per dev row
     "params": {...},      # optional: anything JSON-like, carried into the arm summary
     "wall_s": 812.4}      # optional: training wall time in seconds

Scores are 0/1 correctness (a partial-credit score in [0, 1] is accepted too).

**Pairing contract.** For each task every cell scores the *same* dev rows in the *same* order (row
``j`` of task ``t`` is one example in every cell), so two cells can be compared row by row. Cells
with the same seed share the initialisation and the data order, so two arms are also paired by
seed. :func:`check_cells` enforces what can be checked: the same task names and, per task, the same
number of rows in every cell.

An *arm* is the set of cells of one ``(method, sampler)``: one cell per seed.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

import numpy as np


class CompareError(ValueError):
    """Bad input to a comparison (one line: names the field or value and the fix)."""


def _cell_name(cell: Mapping, k: int) -> str:
    parts = [str(cell.get(key)) for key in ("method", "sampler", "seed") if key in cell]
    return f"cell {k} ({'/'.join(parts)})" if parts else f"cell {k}"


def _check_one(cell: Any, k: int, where: str) -> dict:
    if not isinstance(cell, Mapping):
        raise CompareError(f"{where}[{k}] is a {type(cell).__name__}: each cell must be a dict with method, sampler, "
                           "seed and correct")
    name = f"{where}: {_cell_name(cell, k)}"
    for key in ("method", "sampler", "seed", "correct"):
        if key not in cell:
            raise CompareError(f"{name} has no '{key}': every cell needs method, sampler, seed and correct")
    for key in ("method", "sampler"):
        if not isinstance(cell[key], str) or not cell[key]:
            raise CompareError(f"{name}: '{key}' must be a non-empty string, got {cell[key]!r}")
    seed = cell["seed"]
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise CompareError(f"{name}: 'seed' must be an integer, got {seed!r}")
    correct = cell["correct"]
    if not isinstance(correct, Mapping) or not correct:
        raise CompareError(f"{name}: 'correct' must be a non-empty dict {{task: [score per dev row]}}")
    scores = {}
    for task, values in correct.items():
        if not isinstance(task, str) or not task:
            raise CompareError(f"{name}: task names in 'correct' must be non-empty strings, got {task!r}")
        try:
            x = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise CompareError(f"{name}: correct[{task!r}] must be a list of numbers (0/1 per dev row)") from None
        if x.ndim != 1 or x.size == 0:
            raise CompareError(f"{name}: correct[{task!r}] must be a non-empty flat list, got shape {x.shape}")
        bad = ~(np.isfinite(x) & (x >= 0) & (x <= 1))
        if bad.any():
            j = int(np.argmax(bad))
            raise CompareError(f"{name}: correct[{task!r}][{j}] = {float(x[j])!r} is not a score in [0, 1]: use 1 for a "
                               "correct row and 0 otherwise")
        scores[task] = x
    wall = cell.get("wall_s")
    if wall is not None and (isinstance(wall, bool) or not isinstance(wall, numbers.Real) or not math.isfinite(wall)):
        raise CompareError(f"{name}: 'wall_s' must be a finite number of seconds or absent, got {wall!r}")
    params = cell.get("params")
    if params is not None and not isinstance(params, Mapping):
        raise CompareError(f"{name}: 'params' must be a dict or absent, got {type(params).__name__}")
    return {"method": cell["method"], "sampler": cell["sampler"], "seed": int(seed), "correct": scores,
            "params": dict(params) if params is not None else None,
            "wall_s": float(wall) if wall is not None else None}


def check_same_rows(reference: dict, cell: dict, where: str) -> None:
    """Raise unless ``cell`` scores the same tasks with the same number of rows as ``reference``."""
    ref, got = reference["correct"], cell["correct"]
    if set(ref) != set(got):
        missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
        raise CompareError(f"{where}: {cell['method']}/{cell['sampler']}/seed {cell['seed']} scores different tasks "
                           f"(missing {missing}, extra {extra}): every cell must score every task")
    for task, x in ref.items():
        if got[task].size != x.size:
            raise CompareError(f"{where}: {cell['method']}/{cell['sampler']}/seed {cell['seed']} has {got[task].size} "
                               f"rows for task {task!r} but {reference['method']}/{reference['sampler']}/seed "
                               f"{reference['seed']} has {x.size}: every cell must score the same dev rows")


def check_cells(cells: Sequence[Mapping], where: str = "cells") -> list[dict]:
    """Checked copies of ``cells``: scores as float64 arrays, ``params``/``wall_s`` present (maybe None).

    Raises :class:`CompareError` for a malformed cell, a task set or row count that differs from the
    first cell's, or two cells with the same (method, sampler, seed).
    """
    if isinstance(cells, (str, bytes, Mapping)) or not isinstance(cells, Sequence) or not cells:
        raise CompareError(f"{where} must be a non-empty list of cell dicts")
    out = [_check_one(cell, k, where) for k, cell in enumerate(cells)]
    seen = set()
    for cell in out:
        check_same_rows(out[0], cell, where)
        key = (cell["method"], cell["sampler"], cell["seed"])
        if key in seen:
            raise CompareError(f"{where}: two cells for method {key[0]!r}, sampler {key[1]!r}, seed {key[2]}: "
                               "keep one cell per (method, sampler, seed)")
        seen.add(key)
    return out


def task_names(cells: Sequence[dict]) -> list[str]:
    """Task names in the order of the first cell's ``correct``."""
    return list(cells[0]["correct"])


def group_arms(cells: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
    """``{(method, sampler): [cells sorted by seed]}`` in order of first appearance (checked cells)."""
    arms: dict[tuple[str, str], list[dict]] = {}
    for cell in cells:
        arms.setdefault((cell["method"], cell["sampler"]), []).append(cell)
    return {arm: sorted(group, key=lambda c: c["seed"]) for arm, group in arms.items()}
