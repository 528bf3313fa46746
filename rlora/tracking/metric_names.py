"""The flat MLflow metrics of a diagnostics pass: names, grouping by module type, finite values only.

Names (``<type>`` = wrapped module kind such as ``q_proj``, so the count does not grow with depth)::

    diag/head_cos_B/{mean,max,<type>}          raw heads: mean pairwise cos(B_i, B_j)
    diag/head_cos_BA/{mean,max,<type>}         raw head updates: cos(B_i A, B_j A)
    diag/head_cos_learned/{mean,max,<type>}    learned updates: cos((B_i − B_i⁰) A, (B_j − B_j⁰) A)
    diag/head_cos_effective/{mean,max,<type>}  effective per-head ΔW: cos(B_i A − B̄⁰A⁰, B_j A − B̄⁰A⁰)
    diag/head_norm/{mean,<type>}               diag/eff_rank/{mean,min,<type>}
    diag/router_entropy/{<task>,mean}          diag/router_usage/<task>_head<i>
    diag/mtl_mix/<task>_head<i>                diag/lambda_dev/{<task>,mean}
    diag/interference/<a>__<b> (a before b)    diag/interference/{mean,min}
    diag/interference_task/<task>              train/diagnostics_seconds (the pass's cost: with train/*)

Bounded at many tasks: with more than :data:`MANY_TASKS` tasks the families that grow with T² or T x heads
are not metrics. The pairs become ``diag/interference/top/01`` .. ``/NN`` (:data:`TOP_PAIRS`: the most
conflicting probed pairs, lowest cosine first; which pair each slot holds is in the pass's
``interference_top.csv`` artifact, the whole probed matrix in ``interference.csv``), and router usage /
MTL mixing per task and head become one mean over tasks per head (``diag/router_usage/mean_head<i>``,
``diag/mtl_mix/mean_head<i>``; every task's row in ``router_usage.csv`` / ``mtl_mixing.csv``). Per-task
families (one key per task: ``router_entropy``, ``lambda_dev``, ``interference_task``) stay, so a run
of T tasks has O(T) keys.

MLflow's run page groups charts by the name up to its last ``/`` and titles each chart with the
rest, so every family above is one group (``diag/router_usage``: one chart per task and head, not one
group per task).

(``head_cos_learned`` and ``head_cos_effective`` equal ``head_cos_BA`` for the zero-initialised
methods; for R-LoRA they separate the learned part from the random init, see
:mod:`rlora.tracking.head_geometry`.  Layers whose initial heads are unknown are left out of
``head_cos_learned``.)
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from .interference import interference_summary

PREFIX = "diag"
SIMILARITY_METRICS = (("B_cos", "head_cos_B"), ("BA_cos", "head_cos_BA"), ("learned_cos", "head_cos_learned"),
                      ("effective_cos", "head_cos_effective"))
MANY_TASKS = 20  # above: no per-pair or per-task-and-head metrics (artifacts instead)
TOP_PAIRS = 10
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. ]")


def metric_segment(text: str, limit: int = 64) -> str:
    """One MLflow-safe path segment: characters outside ``A-Za-z0-9_-. `` (and '/') become '_',
    dot-only or empty segments become '_', at most ``limit`` characters."""
    seg = _UNSAFE.sub("_", str(text)).strip()[:limit]
    return "_" if not seg.strip(".") else seg


def unique_segments(names: Sequence[str]) -> list[str]:
    """:func:`metric_segment` of each name, made unique by a ``_<index>`` suffix where they collide."""
    out, seen = [], set()
    for i, n in enumerate(names):
        seg = metric_segment(n)
        if seg in seen:
            seg = metric_segment(f"{seg}_{i}")
        seen.add(seg)
        out.append(seg)
    return out


def module_type(layer_name: str) -> str:
    """The kind of module an adapter layer wraps: the last component of its name (``q_proj``)."""
    return layer_name.rsplit(".", 1)[-1]


def by_type(values: dict[str, float]) -> dict[str, float]:
    """{module type: mean of the values of its layers}."""
    groups: dict[str, list[float]] = {}
    for name, v in values.items():
        groups.setdefault(module_type(name), []).append(v)
    return {t: float(np.mean(v)) for t, v in groups.items()}


def top_pairs(matrix: np.ndarray, k: int = TOP_PAIRS) -> list[tuple[int, int, float]]:
    """The ``k`` pairs a < b with the lowest finite cosine (most conflicting first; ties by index)."""
    c = np.asarray(matrix, dtype=np.float64)
    a, b = np.triu_indices(c.shape[0], k=1)
    v = c[a, b]
    ok = np.isfinite(v)
    a, b, v = a[ok], b[ok], v[ok]
    order = np.lexsort((b, a, v))[:k]
    return [(int(a[i]), int(b[i]), float(v[i])) for i in order]


def flatten(d) -> dict[str, float]:
    """{metric name: finite float} of a :class:`rlora.tracking.diagnostics.Diagnostics` (names above)."""
    m: dict[str, float] = {}
    tasks = unique_segments(d.task_names)
    seg = dict(zip(d.task_names, tasks))
    many = len(tasks) > MANY_TASKS

    for key, metric in SIMILARITY_METRICS:
        vals = {n: s[key] for n, s in d.similarity.items() if key in s}
        if vals:
            m[f"{PREFIX}/{metric}/mean"] = float(np.mean(list(vals.values())))
            m[f"{PREFIX}/{metric}/max"] = float(np.max(list(vals.values())))
            for t, v in by_type(vals).items():
                m[f"{PREFIX}/{metric}/{metric_segment(t)}"] = v
    if d.norms:
        vals = {n: float(np.mean(v)) for n, v in d.norms.items()}
        m[f"{PREFIX}/head_norm/mean"] = float(np.mean(list(vals.values())))
        for t, v in by_type(vals).items():
            m[f"{PREFIX}/head_norm/{metric_segment(t)}"] = v
    if d.eff_rank:
        vals = {n: float(np.mean(v)) for n, v in d.eff_rank.items()}
        m[f"{PREFIX}/eff_rank/mean"] = float(np.mean(list(vals.values())))
        m[f"{PREFIX}/eff_rank/min"] = float(min(np.min(v) for v in d.eff_rank.values()))
        for t, v in by_type(vals).items():
            m[f"{PREFIX}/eff_rank/{metric_segment(t)}"] = v
    if d.router is not None:
        for k, name in enumerate(d.router["tasks"]):
            s = seg.get(name, metric_segment(name))
            m[f"{PREFIX}/router_entropy/{s}"] = float(d.router["entropy"][k])
            for i, u in enumerate(d.router["usage"][k] if not many else ()):
                m[f"{PREFIX}/router_usage/{s}_head{i}"] = float(u)
        if many:
            for i, u in enumerate(np.mean(d.router["usage"], axis=0)):
                m[f"{PREFIX}/router_usage/mean_head{i}"] = float(u)
        m[f"{PREFIX}/router_entropy/mean"] = float(np.mean(d.router["entropy"]))
    if d.mtl is not None:
        rows = d.mtl["mixing"].shape[0]
        labels = tasks if len(tasks) == rows else [f"task{k}" for k in range(rows)]
        for k, s in enumerate(labels):
            for i, u in enumerate(d.mtl["mixing"][k] if not many else ()):
                m[f"{PREFIX}/mtl_mix/{s}_head{i}"] = float(u)
            m[f"{PREFIX}/lambda_dev/{s}"] = float(d.mtl["lambda_dev"][k])
        if many:
            for i, u in enumerate(np.mean(d.mtl["mixing"], axis=0)):
                m[f"{PREFIX}/mtl_mix/mean_head{i}"] = float(u)
        m[f"{PREFIX}/lambda_dev/mean"] = float(np.mean(d.mtl["lambda_dev"]))
    if d.interference is not None:
        c = d.interference
        present = [t for t in range(c.shape[0]) if np.isfinite(c[t, t])]
        pairs = [float(c[a, b]) for i, a in enumerate(present) for b in present[i + 1:]]
        if many:
            for rank, (_, _, v) in enumerate(top_pairs(c), start=1):
                m[f"{PREFIX}/interference/top/{rank:02d}"] = v
        else:
            for i, a in enumerate(present):
                for b in present[i + 1:]:
                    m[f"{PREFIX}/interference/{tasks[a]}__{tasks[b]}"] = float(c[a, b])
        if pairs:
            m[f"{PREFIX}/interference/mean"] = float(np.mean(pairs))
            m[f"{PREFIX}/interference/min"] = float(np.min(pairs))
            summary = interference_summary(c)
            for t in present:
                m[f"{PREFIX}/interference_task/{tasks[t]}"] = float(summary[t])
    m["train/diagnostics_seconds"] = float(d.seconds)  # a cost, next to tokens/s: not a chart section of its own
    return {k[:250]: v for k, v in m.items() if math.isfinite(v)}


__all__ = ["PREFIX", "MANY_TASKS", "TOP_PAIRS", "top_pairs", "metric_segment", "unique_segments", "module_type", "by_type", "flatten"]
