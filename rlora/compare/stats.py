"""Accuracy of an arm, and paired differences between two arms with bootstrap intervals.

Notation: an arm has ``S`` seeds; ``x[s, t, i]`` is the score (0/1) of seed ``s`` on dev row ``i``
of task ``t`` (``n_t`` rows). Accuracies are fractions in [0, 1] here; the report prints points.

* per-task accuracy ``acc_t = 1/S sum_s mean_i x[s, t, i]`` (mean over seeds of each seed's accuracy);
* ``"mean"`` statistic: the macro mean ``1/T sum_t acc_t``;
* ``"worst"`` statistic: the worst task ``min_t acc_t`` (the task may differ between arms);
* a task name as statistic: ``acc_t`` of that task (``"mean"`` and ``"worst"`` take precedence).

A paired difference is ``stat(a) - stat(b)`` on the seeds both arms have, with a percentile
interval from the paired two-level bootstrap of :mod:`rlora.compare.bootstrap` (seeds and dev rows
resampled independently, crossed as they are: every seed scores the same rows; the same draws for both
arms). Rows are drawn once for all seeds, so a row that one arm wins in every seed counts in full. The
row noise inside each seed's mean is counted a second time at the seed level, so where dev-row noise
dominates the interval errs on the wide side (simulated: 98 % coverage at 1.3x the exact width with 3
seeds); where seed-to-seed differences dominate it errs narrow (a percentile bootstrap over S seeds sees
(S - 1)/S of their variance: 77 % coverage when their spread is about 4x a seed's row noise, 3 seeds) --
more seeds, not a wider interval, is the remedy (tests/compare/test_coverage.py has the measured grid).
With one seed nothing is resampled at the seed level: the interval covers dev-row noise only, and the
result says so (``seeds_resampled: False``). The worst task is a minimum over noisy accuracies, so
its replicates are biased low and its interval need not be centred on the observed difference.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from .bootstrap import bootstrap_accuracies
from .cells import CompareError, check_cells, check_same_rows, task_names

VERDICTS = ("better", "worse", "no detectable difference")
RESERVED = ("mean", "worst")


def verdict(lo: float, hi: float) -> str:
    """``"better"`` when the interval lies above 0, ``"worse"`` below 0, else ``"no detectable difference"``."""
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "no detectable difference"


def seeds_needed(half_width: float, n_seeds: int, resolve: float = 0.01) -> int:
    """Seeds at which the interval's half-width would fall to ``resolve`` (same units as ``half_width``).

    Assumption: seed-to-seed variance dominates the interval, so the half-width scales as
    ``h(m) = h(n) * sqrt(n / m)``; the answer is the smallest ``m`` with ``h(m) <= resolve``:
    ``m = ceil(n * (h / resolve)^2)``. Dev-row noise does not shrink with more seeds (the same rows
    are scored), so this is optimistic when the rows dominate; and the half-width of a one-seed
    interval holds no seed variance at all, so do not extrapolate from ``n_seeds = 1``. At
    ``h(m) = resolve`` an observed difference of ``resolve`` just excludes 0; to detect a true
    difference ``d`` with 80 % power at the 95 % level use ``resolve = d / 1.43``.
    """
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, numbers.Integral) or n_seeds < 1:
        raise CompareError(f"n_seeds must be a positive integer, got {n_seeds!r}")
    if not (isinstance(half_width, numbers.Real) and math.isfinite(half_width) and half_width >= 0):
        raise CompareError(f"half_width must be a finite number >= 0, got {half_width!r}")
    if not (isinstance(resolve, numbers.Real) and math.isfinite(resolve) and resolve > 0):
        raise CompareError(f"resolve must be a finite number > 0, got {resolve!r}")
    return max(1, math.ceil(n_seeds * (half_width / resolve) ** 2 - 1e-9))


# --------------------------------------------------------------------------------------------
def _per_seed_accuracy(x: Sequence[np.ndarray]) -> np.ndarray:
    """``[S, T]`` accuracy of each seed on each task from the task score arrays ``T x [S, n_t]``."""
    return np.stack([scores.mean(axis=1) for scores in x], axis=1)


def _sd(values: np.ndarray) -> Optional[float]:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def arm_summary(cells: Sequence[Mapping]) -> dict:
    """Accuracy of one arm (the cells of one method and sampler, one per seed).

    Returns ``{"method", "sampler", "seeds": [int], "n_seeds",
    "tasks": {task: {"acc", "sd_seeds", "n_rows"}}, "mean", "mean_sd_seeds", "worst", "worst_task",
    "wall_s", "params"}``; ``acc`` is ``acc_t`` above, ``sd_seeds`` the standard deviation over seeds
    of the per-seed accuracy (ddof 1; None with one seed), ``mean``/``worst`` the macro mean and the
    worst task's accuracy, ``wall_s`` the mean over the cells that report it (None if none),
    ``params`` the first cell's.
    """
    cells = sorted(check_cells(cells, "arm"), key=lambda c: c["seed"])
    arms = {(c["method"], c["sampler"]) for c in cells}
    if len(arms) > 1:
        raise CompareError(f"arm_summary got cells of {len(arms)} arms {sorted(arms)}: pass the cells of one "
                           "(method, sampler)")
    tasks = task_names(cells)
    per_seed = _per_seed_accuracy([np.stack([c["correct"][t] for c in cells]) for t in tasks])
    acc = per_seed.mean(axis=0)
    worst = int(np.argmin(acc))
    walls = [c["wall_s"] for c in cells if c["wall_s"] is not None]
    return {
        "method": cells[0]["method"], "sampler": cells[0]["sampler"],
        "seeds": [c["seed"] for c in cells], "n_seeds": len(cells),
        "tasks": {t: {"acc": float(acc[k]), "sd_seeds": _sd(per_seed[:, k]), "n_rows": int(cells[0]["correct"][t].size)}
                  for k, t in enumerate(tasks)},
        "mean": float(acc.mean()), "mean_sd_seeds": _sd(per_seed.mean(axis=1)),
        "worst": float(acc[worst]), "worst_task": tasks[worst],
        "wall_s": float(np.mean(walls)) if walls else None, "params": cells[0]["params"],
    }


# --------------------------------------------------------------------------------------------
def _by_seed(cells: list[dict], where: str) -> dict[int, dict]:
    out = {}
    for c in cells:
        if c["seed"] in out:
            raise CompareError(f"{where} holds seed {c['seed']} twice: pass the cells of one arm, one per seed")
        out[c["seed"]] = c
    return out


def check_bootstrap_args(n_boot: int, seed: int, level: float) -> None:
    """Raise :class:`CompareError` unless ``n_boot >= 1``, ``seed >= 0`` (integers) and ``0 < level < 1``."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise CompareError(f"n_boot must be a positive integer, got {n_boot!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise CompareError(f"seed must be an integer >= 0, got {seed!r}")
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0 < level < 1:
        raise CompareError(f"level must be a fraction in (0, 1) such as 0.95, got {level!r}")


def _statistic(acc: np.ndarray, statistic: str, tasks: list[str]) -> np.ndarray:
    """The statistic of per-task accuracies ``acc [..., T]``."""
    if statistic == "mean":
        return acc.mean(axis=-1)
    if statistic == "worst":
        return acc.min(axis=-1)
    return acc[..., tasks.index(statistic)]


def paired_replicates(cells_a: Sequence[Mapping], cells_b: Sequence[Mapping], n_boot: int, seed: int) -> dict:
    """The paired bootstrap behind :func:`paired_differences`, before any statistic is taken.

    Returns ``{"tasks", "seeds", "dropped_seeds": {"a", "b"}, "observed": [2, T], "boot": [2, n_boot, T]}``:
    the per-task accuracies of arm a (index 0) and b (1) on the shared seeds, observed and replicated by
    :func:`~rlora.compare.bootstrap.bootstrap_accuracies` with ``numpy.random.default_rng(seed)``.
    """
    a_cells, b_cells = check_cells(cells_a, "cells_a"), check_cells(cells_b, "cells_b")
    a_seed, b_seed = _by_seed(a_cells, "cells_a"), _by_seed(b_cells, "cells_b")
    check_same_rows(a_cells[0], b_cells[0], "cells_b")
    tasks = task_names(a_cells)
    seeds = sorted(set(a_seed) & set(b_seed))
    if not seeds:
        raise CompareError(f"cells_a (seeds {sorted(a_seed)}) and cells_b (seeds {sorted(b_seed)}) share no seed: "
                           "run both arms with the same seeds")
    xa = [np.stack([a_seed[s]["correct"][t] for s in seeds]) for t in tasks]              # T x [S, n_t]
    xb = [np.stack([b_seed[s]["correct"][t] for s in seeds]) for t in tasks]
    observed = np.stack([_per_seed_accuracy(xa).mean(axis=0), _per_seed_accuracy(xb).mean(axis=0)])  # [2, T]
    boot = bootstrap_accuracies(xa, xb, int(n_boot), np.random.default_rng(int(seed)))    # [2, B, T]
    return {"tasks": tasks, "seeds": seeds, "observed": observed, "boot": boot,
            "dropped_seeds": {"a": sorted(set(a_seed) - set(seeds)), "b": sorted(set(b_seed) - set(seeds))}}


def paired_differences(cells_a: Sequence[Mapping], cells_b: Sequence[Mapping],
                       statistics: Optional[Iterable[str]] = None, n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> dict:
    """``stat(a) - stat(b)`` with a bootstrap interval, for several statistics from one bootstrap.

    ``cells_a``/``cells_b``: the cells of arm a and arm b (one per seed); they are paired on the seeds
    both have, the others are listed in ``dropped_seeds``. ``statistics`` defaults to ``"mean"``,
    ``"worst"`` and every task. ``seed`` seeds the bootstrap's numpy generator, so the result is a
    pure function of the input.

    Returns ``{"tasks", "seeds", "n_seeds", "seeds_resampled", "dropped_seeds": {"a": [..], "b": [..]},
    "n_boot", "level", "rng_seed", "results": {statistic: result}}`` with each ``result`` =
    ``{"statistic", "a", "b", "diff", "lo", "hi", "half_width", "verdict", "seeds_to_resolve_1pt"}``:
    ``a``/``b`` the observed statistics, ``diff = a - b`` (exactly the observed difference),
    ``[lo, hi]`` the percentile interval of the replicated differences at ``level``, and
    ``seeds_to_resolve_1pt`` :func:`seeds_needed` for a half-width of 0.01 (None with one seed).
    """
    check_bootstrap_args(n_boot, seed, level)
    rep = paired_replicates(cells_a, cells_b, n_boot, seed)
    tasks, seeds, observed, boot = rep["tasks"], rep["seeds"], rep["observed"], rep["boot"]
    stats = list(statistics) if statistics is not None else [*RESERVED, *tasks]
    for s in stats:
        if s not in RESERVED and s not in tasks:
            raise CompareError(f"unknown statistic {s!r}: use 'mean', 'worst' or one of the tasks {tasks}")
    tail = (1 - level) / 2
    results = {}
    for s in stats:
        obs_a, obs_b = (float(v) for v in _statistic(observed, s, tasks))
        diffs = _statistic(boot[0], s, tasks) - _statistic(boot[1], s, tasks)
        lo, hi = (float(v) for v in np.quantile(diffs, [tail, 1 - tail]))
        half = (hi - lo) / 2
        results[s] = {"statistic": s, "a": obs_a, "b": obs_b, "diff": obs_a - obs_b, "lo": lo, "hi": hi,
                      "half_width": half, "verdict": verdict(lo, hi),
                      "seeds_to_resolve_1pt": seeds_needed(half, len(seeds)) if len(seeds) > 1 else None}
    return {"tasks": tasks, "seeds": seeds, "n_seeds": len(seeds), "seeds_resampled": len(seeds) > 1,
            "dropped_seeds": rep["dropped_seeds"], "n_boot": int(n_boot), "level": float(level),
            "rng_seed": int(seed), "results": results}


def paired_difference(cells_a: Sequence[Mapping], cells_b: Sequence[Mapping], statistic: str = "mean",
                      n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """One statistic of :func:`paired_differences`: its result dict merged with the pairing fields
    (``seeds``, ``n_seeds``, ``seeds_resampled``, ``dropped_seeds``, ``n_boot``, ``level``, ``rng_seed``)."""
    out = paired_differences(cells_a, cells_b, [statistic], n_boot=n_boot, seed=seed, level=level)
    result = out.pop("results")[statistic]
    out.pop("tasks")
    return {**out, **result}
