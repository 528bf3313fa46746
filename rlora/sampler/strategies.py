"""Static task distributions: which share of the micro-batch slots each task gets.

With ``n_t`` the number of training examples of task ``t`` and ``T`` the number of tasks:

=================  ==============================================================
``proportional``   ``p_t = n_t / sum_s n_s``
``temperature``    ``p_t ~ n_t^(1/tau)`` (``tau = cfg.temperature``; tau=1 is proportional,
                   tau -> inf is uniform); computed in log space so large sizes cannot overflow
``capped``         ``p_t ~ min(n_t, K)`` (T5 "examples-proportional mixing", ``K = cfg.cap``)
``uniform``        ``p_t = 1 / T``
``round_robin``    deterministic cycling over the tasks, slot by slot; long-run share ``1 / T``
``probabilities``  explicit ``cfg.probabilities = {task_name: p}``: every task must be listed
                   (``0`` excludes a task); negative or non-finite values are errors; a
                   mapping that does not sum to 1 is **normalised** with a :class:`SamplerWarning`
                   (so relative weights such as ``{a: 2, b: 1}`` work)
``dynamic``        the starting distribution of the dynamic balancer:
                   ``p_t = (1 - f) * n_t / sum_s n_s + f / T`` (``f = cfg.dynamic_floor``)
=================  ==============================================================
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Sequence

import numpy as np

from rlora.config import SamplerConfig

from .errors import SamplerError, SamplerWarning

_SUM_TOL = 1e-6


def resolve_task_names(task_names: Sequence[str] | None, num_tasks: int) -> list[str]:
    """Task names (``task_names`` checked, or ``"0" .. "T-1"``)."""
    if task_names is None:
        return [str(i) for i in range(num_tasks)]
    names = list(task_names)
    if len(names) != num_tasks:
        raise SamplerError(
            f"task_names has {len(names)} entries but task_sizes has {num_tasks}: give one name per task"
        )
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise SamplerError(f"task_names[{i}] must be a non-empty string, got {name!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SamplerError(f"task_names has duplicates {dup}: give every task a unique name")
    return names


def validate_task_sizes(task_sizes: Sequence[int], task_names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Check the per-task example counts; returns ``(sizes int64 [T], names)``."""
    try:
        sizes_list = list(task_sizes)
    except TypeError:
        raise SamplerError(f"task_sizes must be a sequence of example counts, got {type(task_sizes).__name__}") from None
    if not sizes_list:
        raise SamplerError("task_sizes is empty: the sampler needs at least one task")
    names = resolve_task_names(task_names, len(sizes_list))
    for i, n in enumerate(sizes_list):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise SamplerError(f"task {names[i]!r} size must be an integer example count, got {n!r}")
        if n < 1:
            raise SamplerError(
                f"task {names[i]!r} (id {i}) has {int(n)} examples: drop it from the task list or give it data"
            )
    return np.asarray(sizes_list, dtype=np.int64), names


def proportional(task_sizes: np.ndarray) -> np.ndarray:
    """``p_t = n_t / sum n``."""
    sizes = np.asarray(task_sizes, dtype=np.float64)
    return sizes / sizes.sum()


def _explicit(cfg: SamplerConfig, names: list[str]) -> np.ndarray:
    probs = cfg.probabilities
    if not probs:
        raise SamplerError(
            "sampler.probabilities is not set: give a mapping task_name -> probability for strategy=probabilities"
        )
    unknown = [k for k in probs if k not in names]
    if unknown:
        raise SamplerError(
            f"sampler.probabilities names unknown task(s) {unknown}: use the task names {names}"
        )
    missing = [n for n in names if n not in probs]
    if missing:
        raise SamplerError(
            f"sampler.probabilities has no entry for task(s) {missing}: give every task a value (0 excludes it)"
        )
    p = np.array([float(probs[n]) for n in names], dtype=np.float64)
    for n, v in zip(names, p):
        if not math.isfinite(v):
            raise SamplerError(f"sampler.probabilities[{n!r}] is {v}: use a finite value >= 0")
        if v < 0:
            raise SamplerError(f"sampler.probabilities[{n!r}] is negative ({v}): use a value >= 0")
    total = float(p.sum())
    if total <= 0:
        raise SamplerError("sampler.probabilities are all 0: give at least one task a positive probability")
    if abs(total - 1.0) > _SUM_TOL:
        warnings.warn(
            f"sampler.probabilities sum to {total:.6g}, not 1: normalised to {np.round(p / total, 6).tolist()}",
            SamplerWarning,
            stacklevel=3,
        )
    return p / total


def compute_probabilities(
    task_sizes: Sequence[int], cfg: SamplerConfig, task_names: Sequence[str] | None = None
) -> np.ndarray:
    """Per-task sampling probabilities ``p`` [T] (float64, sums to 1) for ``cfg.strategy``.

    For ``dynamic`` this is the starting distribution (proportional mixed with the floor); for
    ``round_robin`` it is the long-run share ``1/T``. Raises :class:`SamplerError` on bad input.
    """
    sizes, names = validate_task_sizes(task_sizes, task_names)
    num = len(sizes)
    strategy = cfg.strategy
    if strategy == "proportional":
        return proportional(sizes)
    if strategy == "temperature":
        tau = float(cfg.temperature)
        if not tau > 0:
            raise SamplerError(f"sampler.temperature must be > 0, got {cfg.temperature}")
        logits = np.log(sizes.astype(np.float64)) / tau
        w = np.exp(logits - logits.max())
        return w / w.sum()
    if strategy == "capped":
        if int(cfg.cap) < 1:
            raise SamplerError(f"sampler.cap must be >= 1, got {cfg.cap}")
        w = np.minimum(sizes, int(cfg.cap)).astype(np.float64)
        return w / w.sum()
    if strategy in ("uniform", "round_robin"):
        return np.full(num, 1.0 / num)
    if strategy == "probabilities":
        return _explicit(cfg, names)
    if strategy == "dynamic":
        floor = float(cfg.dynamic_floor)
        if not 0.0 <= floor <= 1.0:
            raise SamplerError(f"sampler.dynamic_floor must be in [0, 1], got {cfg.dynamic_floor}")
        return (1.0 - floor) * proportional(sizes) + floor / num
    raise SamplerError(
        f"sampler.strategy {strategy!r} is unknown: use proportional, temperature, capped, uniform, "
        "round_robin, probabilities or dynamic"
    )


def validate_task_weights(weights: Sequence[float] | None, cfg: SamplerConfig,
                          task_names: Sequence[str]) -> list[float] | None:
    """Check per-task weights (``data.tasks[].weight``); ``None`` or all ones means no weighting."""
    if weights is None:
        return None
    w = [float(x) for x in weights]
    if len(w) != len(task_names):
        raise SamplerError(f"{len(w)} task weights for {len(task_names)} tasks: give one weight per task")
    for name, x in zip(task_names, w):
        if not (math.isfinite(x) and x >= 0):
            raise SamplerError(f"data.tasks[{name}].weight must be a finite number >= 0, got {x}")
    if not any(x > 0 for x in w):
        raise SamplerError("every data.tasks[].weight is 0: give at least one task a positive weight")
    if all(x == 1.0 for x in w):
        return None
    if cfg.strategy in ("round_robin", "probabilities"):
        raise SamplerError(f"data.tasks[].weight does not combine with sampler.strategy={cfg.strategy}: "
                           "remove the weights or use proportional, temperature, capped, uniform or dynamic")
    return w


def apply_task_weights(p: np.ndarray, weights: Sequence[float] | None) -> np.ndarray:
    """``p_t w_t / sum_s p_s w_s`` (``p`` unchanged without weights)."""
    if weights is None:
        return p
    q = p * np.asarray(weights, dtype=np.float64)
    return q / q.sum()


def steps_per_epoch(
    task_sizes: Sequence[int],
    probabilities: Sequence[float],
    global_batch_size: int,
    stopping_strategy: str = "all_exhausted",
) -> float:
    """Expected number of steps for one epoch under ``stopping_strategy``.

    Task ``t`` receives ``p_t * S`` of the ``S = world_size * batch_size`` global slots per step
    in expectation, so one pass over its ``n_t`` examples takes ``n_t / (p_t * S)`` steps. One
    epoch of the mixture is the minimum of that over tasks with ``p_t > 0`` for
    ``first_exhausted`` and the maximum for ``all_exhausted``. Multiply by ``num_epochs`` for a
    step budget (the sampler's ``total_steps`` gives the exact count for the static strategies).
    """
    sizes = np.asarray(task_sizes, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    if sizes.shape != p.shape:
        raise SamplerError(f"steps_per_epoch: {len(sizes)} task sizes but {len(p)} probabilities")
    if global_batch_size < 1:
        raise SamplerError(f"steps_per_epoch: global_batch_size must be >= 1, got {global_batch_size}")
    active = p > 0
    if not active.any():
        raise SamplerError("steps_per_epoch: every probability is 0")
    per_task = sizes[active] / (p[active] * global_batch_size)
    if stopping_strategy == "first_exhausted":
        return float(per_task.min())
    if stopping_strategy == "all_exhausted":
        return float(per_task.max())
    raise SamplerError(
        f"stopping_strategy {stopping_strategy!r} is unknown: use first_exhausted or all_exhausted"
    )
