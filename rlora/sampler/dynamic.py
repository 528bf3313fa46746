"""Interference-aware dynamic task balancing (DWA-style, applied to sampling probabilities).

Inputs, fed through :meth:`DynamicBalancer.observe` once per training step (identical on every
rank, i.e. already reduced across ranks):

* ``L_t``: the mean loss of task ``t`` on that step (``NaN`` when ``t`` was not in the step);
  the last ``2W`` observations of each task are kept (``W = cfg.dynamic_window``);
* optionally ``C`` [T, T]: gradient cosines between tasks (``cfg.dynamic_signal ==
  "loss_ratio+conflict"``; ignored otherwise). ``c_t`` = mean of ``C[t, s]`` over ``s != t``
  (NaN entries skipped) is kept until the next matrix arrives (see :func:`conflict_means`). A
  task with no finite off-diagonal entry (not probed yet: a budgeted probe fills the matrix a
  few tasks per pass) gets the *mean of the known row means*, a neutral value: a constant
  matrix, fully or partly probed, gives every task the same ``c_t`` and so leaves the
  probabilities exactly as with no conflict signal (softmax is shift-invariant).

Every ``cfg.dynamic_interval`` steps (when ``step - last_reweight_step >= interval``) the
probabilities are recomputed:

.. math::

    r_t = \\frac{\\mathrm{mean}(L_t[-W:])}{\\mathrm{mean}(L_t[-2W:-W])} \\quad
          (r_t = 1 \\text{ until } t \\text{ has } 2W \\text{ observations or if the older mean} \\le 0)

    s_t = r_t - \\beta \\, c_t \\quad (\\beta = \\text{cfg.dynamic\\_conflict\\_weight}; \\ c_t = 0 \\text{ for loss\\_ratio})

    q_t = \\frac{\\pi_t \\exp(s_t / \\tau)}{\\sum_u \\pi_u \\exp(s_u / \\tau)}, \\quad
    p_t = (1 - f)\\, q_t + f / T

with ``pi`` the proportional distribution ``n_t / sum n`` (so equal signals give back the
proportional start), ``tau = cfg.dynamic_tau`` and ``f = cfg.dynamic_floor``, hence
``p_t >= f / T``: no task starves. A task whose loss stopped falling (``r_t ~ 1`` while the
others have ``r < 1``) gains weight; so does a task whose gradient points against the rest
(negative mean cosine): the shared update serves it least, so it is shown more often. Tasks
not yet observed ``2W`` times count as not improving (``r_t = 1``). Everything is a pure
function of the feed, so equal feeds give equal probabilities on every rank and after resume.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Sequence

import numpy as np

from rlora.config import SamplerConfig

from .errors import SamplerError
from .strategies import apply_task_weights, proportional

HISTORY_LIMIT = 1000  # re-weightings kept in ``history`` (and in the state) for logging


def conflict_means(c: np.ndarray) -> np.ndarray:
    """[T] row means ``c_t`` of a square [T, T] cosine matrix ``C``.

    .. math::

        c_t = \\frac{1}{|K_t|} \\sum_{s \\in K_t} C[t, s], \\quad
        K_t = \\{ s \\ne t : C[t, s] \\text{ finite} \\}

    for the known tasks (``K_t`` non-empty); every task with ``K_t`` empty gets the mean of the
    known ``c_t`` (neutral: it neither gains nor loses weight against the average probed task);
    0.0 for all when no task is known (or ``T == 1``). The caller checks the shape."""
    off = np.array(c, dtype=np.float64)
    t = off.shape[0]
    if t <= 1:
        return np.zeros(t)
    np.fill_diagonal(off, np.nan)
    valid = np.isfinite(off)
    sums = np.where(valid, off, 0.0).sum(axis=1)
    counts = valid.sum(axis=1)
    known = counts > 0
    if not known.any():
        return np.zeros(t)
    means = sums / np.maximum(counts, 1)
    return np.where(known, means, float(means[known].mean()))


class DynamicBalancer:
    """Holds the loss history and the current probabilities of the ``dynamic`` strategy."""

    def __init__(self, task_sizes: np.ndarray, cfg: SamplerConfig, task_weights=None):
        self.num_tasks = len(task_sizes)
        self.prior = apply_task_weights(proportional(task_sizes), task_weights)
        with np.errstate(divide="ignore"):  # a task of weight 0 has log-prior -inf: only the floor draws it
            self._log_prior_list = np.log(self.prior).tolist()
        self.tau = float(cfg.dynamic_tau)
        self.floor = float(cfg.dynamic_floor)
        self.interval = int(cfg.dynamic_interval)
        self.window = int(cfg.dynamic_window)
        self.use_conflict = cfg.dynamic_signal == "loss_ratio+conflict"
        self.conflict_weight = float(cfg.dynamic_conflict_weight)
        if not self.tau > 0:
            raise SamplerError(f"sampler.dynamic_tau must be > 0, got {cfg.dynamic_tau}")
        if not 0.0 <= self.floor <= 1.0:
            raise SamplerError(f"sampler.dynamic_floor must be in [0, 1], got {cfg.dynamic_floor}")
        if self.interval < 1 or self.window < 1:
            raise SamplerError(
                f"sampler.dynamic_interval and dynamic_window must be >= 1, got {self.interval} and {self.window}"
            )
        self.losses: list[deque] = [deque(maxlen=2 * self.window) for _ in range(self.num_tasks)]
        self.conflict = np.zeros(self.num_tasks)
        self.ratios = np.ones(self.num_tasks)
        self.last_reweight_step = 0
        self.probabilities = self._mix(self.prior)
        self.history: list[dict] = [{"step": 0, "probabilities": self.probabilities.tolist()}]

    # ------------------------------------------------------------------------------------------
    def _mix(self, q: np.ndarray) -> np.ndarray:
        return (1.0 - self.floor) * q + self.floor / self.num_tasks

    def start_probabilities(self) -> np.ndarray:
        """The distribution before any re-weighting: ``(1 - f) * pi + f / T`` with ``pi`` the (weighted) prior."""
        return self._mix(self.prior)

    def loss_ratios(self) -> np.ndarray:
        """``r_t`` [T] from the kept loss history (1 where not enough observations)."""
        return np.array(self._ratio_list())

    def _ratio_list(self) -> list[float]:
        w = self.window
        r = [1.0] * self.num_tasks
        for t, h in enumerate(self.losses):
            if len(h) == 2 * w:  # h holds at most the last 2W observations
                vals = list(h)
                old = sum(vals[:w])
                if old > 0:
                    r[t] = sum(vals[w:]) / old  # = mean(new window) / mean(old window)
        return r

    def observe(self, task_losses: Sequence[float], step: int, conflict: np.ndarray | None = None) -> bool:
        """Record one step's per-task losses (and conflict matrix); re-weight when due.

        Returns True when the probabilities were recomputed."""
        try:
            if isinstance(task_losses, (list, tuple)):
                values = [float(v) for v in task_losses]
            else:
                values = np.asarray(task_losses, dtype=np.float64).reshape(-1).tolist()
        except (TypeError, ValueError):
            raise SamplerError("update: task_losses must be a sequence of floats (NaN for an absent task)") from None
        if len(values) != self.num_tasks:
            raise SamplerError(
                f"update: task_losses has {len(values)} values but there are {self.num_tasks} tasks: "
                "give one mean loss per task (NaN when absent)"
            )
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise SamplerError(f"update: step must be a non-negative integer, got {step!r}")
        isfinite = math.isfinite
        for h, v in zip(self.losses, values):
            if isfinite(v):
                h.append(v)
        if conflict is not None and self.use_conflict:
            self.conflict = self._conflict_means(conflict)
        if int(step) - self.last_reweight_step >= self.interval:
            self.reweight(int(step))
            return True
        return False

    def _conflict_means(self, conflict: np.ndarray) -> np.ndarray:
        try:
            c = np.asarray(conflict, dtype=np.float64)
        except (TypeError, ValueError):
            raise SamplerError("update: conflict must be a T x T array of gradient cosines") from None
        t = self.num_tasks
        if c.shape != (t, t):
            raise SamplerError(
                f"update: conflict has shape {tuple(c.shape)}, expected ({t}, {t}): pass the task x task cosine matrix"
            )
        return conflict_means(c)

    def reweight(self, step: int) -> np.ndarray:
        # plain floats: T is small and this runs once per interval
        r = self._ratio_list()
        beta = self.conflict_weight if self.use_conflict else 0.0
        conflict = self.conflict.tolist()
        tau, num, floor = self.tau, self.num_tasks, self.floor
        logits = [lp + (rt - beta * ct) / tau for lp, rt, ct in zip(self._log_prior_list, r, conflict)]
        top = max(logits)
        w = [math.exp(x - top) for x in logits]
        z = sum(w)
        probs = [(1.0 - floor) * x / z + floor / num for x in w]
        self.ratios = np.array(r)
        self.probabilities = np.array(probs)
        self.last_reweight_step = int(step)
        self.history.append({"step": int(step), "probabilities": probs})
        if len(self.history) > HISTORY_LIMIT:
            del self.history[: len(self.history) - HISTORY_LIMIT]
        return self.probabilities

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "losses": [list(h) for h in self.losses],
            "conflict": self.conflict.tolist(),
            "ratios": self.ratios.tolist(),
            "last_reweight_step": self.last_reweight_step,
            "probabilities": self.probabilities.tolist(),
            "history": [dict(step=h["step"], probabilities=list(h["probabilities"])) for h in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            losses = [deque((float(v) for v in h), maxlen=2 * self.window) for h in state["losses"]]
            conflict = np.asarray(state["conflict"], dtype=np.float64)
            ratios = np.asarray(state["ratios"], dtype=np.float64)
            probs = np.asarray(state["probabilities"], dtype=np.float64)
            last = int(state["last_reweight_step"])
            history = [dict(step=int(h["step"]), probabilities=[float(x) for x in h["probabilities"]])
                       for h in state["history"]]
        except (KeyError, TypeError, ValueError) as err:
            raise SamplerError(f"sampler state 'dynamic' is malformed ({err!r}): pass the dict from state_dict()") from None
        t = self.num_tasks
        if len(losses) != t or conflict.shape != (t,) or ratios.shape != (t,) or probs.shape != (t,):
            raise SamplerError(f"sampler state 'dynamic' is for a different number of tasks than {t}")
        self.losses, self.conflict, self.ratios = losses, conflict, ratios
        self.probabilities, self.last_reweight_step, self.history = probs, last, history
