"""One summary of a (method, sampler, seed) grid: every arm's accuracy and the paired comparisons.

Comparisons (``a`` vs ``b``, difference ``a - b``):

* ``kind == "method"``: under each sampler, every other method vs the baseline method;
* ``kind == "sampler"``: for each method, every other sampler vs the baseline sampler.

An arm pair is compared only when both arms have cells; what could not be compared is listed in
``notes``. Each comparison is exactly :func:`~rlora.compare.stats.paired_differences` of the two arms
with the summary's ``n_boot``, ``seed`` and ``level`` (so any line of the report can be reproduced
on its own). The summary holds only JSON types (dicts, lists, str, int, float, bool, None), so
:mod:`rlora.compare.report` can also be re-run on a summary read back from JSON.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from .cells import CompareError, check_cells, group_arms, task_names
from .stats import arm_summary, check_bootstrap_args, paired_differences


def _label(kind: str, a: tuple[str, str], b: tuple[str, str]) -> str:
    if kind == "method":
        return f"{a[0]} vs {b[0]} ({a[1]})"
    return f"{a[1]} vs {b[1]} ({a[0]})"


def _pairs(arms: dict, methods: list[str], samplers: list[str], base_m: str, base_s: str) -> tuple[list, list]:
    """``([(kind, arm_a, arm_b)], notes)`` in report order."""
    pairs, notes = [], []
    for s in samplers:
        others = [m for m in methods if m != base_m and (m, s) in arms]
        if (base_m, s) in arms:
            pairs += [("method", (m, s), (base_m, s)) for m in others]
        elif others:
            notes.append(f"no {base_m!r} cells under sampler {s!r}: {others} are not compared with it there")
    for m in methods:
        others = [s for s in samplers if s != base_s and (m, s) in arms]
        if (m, base_s) in arms:
            pairs += [("sampler", (m, s), (m, base_s)) for s in others]
        elif others:
            notes.append(f"no {m!r} cells under the baseline sampler {base_s!r}: samplers {others} are not compared")
    return pairs, notes


def summarize(cells: Sequence[Mapping], baseline_method: str, baseline_sampler: str = "proportional",
              n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Summary of a comparison grid (see :mod:`rlora.compare.cells` for ``cells``).

    Returns::

        {"tasks": [str], "methods": [str], "samplers": [str],     # in order of first appearance
         "baseline": {"method": str, "sampler": str},
         "n_boot": int, "level": float, "rng_seed": int,
         "arms": [arm_summary(...) per (method, sampler), samplers outer, methods inner],
         "comparisons": [{"kind": "method" | "sampler", "label": str,
                          "a": {"method", "sampler"}, "b": {"method", "sampler"},
                          "seeds": [int], "n_seeds": int, "seeds_resampled": bool,
                          "dropped_seeds": {"a": [int], "b": [int]},
                          "mean": result, "worst": result, "tasks": {task: result}}],
         "notes": [str]}

    with ``result`` as in :func:`~rlora.compare.stats.paired_differences` (fractions, not points).
    """
    check_bootstrap_args(n_boot, seed, level)
    checked = check_cells(cells, "cells")
    arms = group_arms(checked)
    methods = list(dict.fromkeys(m for m, _ in arms))
    samplers = list(dict.fromkeys(s for _, s in arms))
    if baseline_method not in methods:
        raise CompareError(f"baseline_method {baseline_method!r} has no cells (methods present: {methods}): "
                           "pass one of them or run the baseline too")
    tasks = task_names(checked)
    pairs, notes = _pairs(arms, methods, samplers, baseline_method, baseline_sampler)
    comparisons = []
    for kind, a, b in pairs:
        out = paired_differences(arms[a], arms[b], n_boot=n_boot, seed=seed, level=level)
        results = out["results"]
        comparisons.append({
            "kind": kind, "label": _label(kind, a, b),
            "a": {"method": a[0], "sampler": a[1]}, "b": {"method": b[0], "sampler": b[1]},
            "seeds": out["seeds"], "n_seeds": out["n_seeds"], "seeds_resampled": out["seeds_resampled"],
            "dropped_seeds": out["dropped_seeds"],
            "mean": results["mean"], "worst": results["worst"], "tasks": {t: results[t] for t in tasks},
        })
    ordered = [(m, s) for s in samplers for m in methods if (m, s) in arms]
    return {"tasks": tasks, "methods": methods, "samplers": samplers,
            "baseline": {"method": baseline_method, "sampler": baseline_sampler},
            "n_boot": int(n_boot), "level": float(level), "rng_seed": int(seed),
            "arms": [arm_summary(arms[arm]) for arm in ordered], "comparisons": comparisons, "notes": notes}
