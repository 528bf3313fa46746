"""Which tasks a diagnostics pass probes, so that its cost stays a bounded share of training time.

The interference matrix costs one forward + ``autograd.grad`` per probed task (the T x T Gram of the
gradients is cheap next to that), so a pass over T tasks costs ~T backwards: at T = 200 that is minutes
on a CPU, every pass. A pass therefore probes a **subset** of k tasks, k set by a time budget, and the
subsets **rotate**:

* **Rotation.** A seeded permutation of the T tasks is cut into consecutive chunks of k; each pass takes
  the next chunk; when the permutation runs out a new one is drawn (cycle c uses ``default_rng([seed, c])``).
  Every task is probed once per cycle (⌈T / k⌉ passes when k divides T; in any 2⌈T / k⌉ consecutive
  passes otherwise), and since each cycle is a fresh shuffle, every pair of tasks is eventually probed
  together.
* **Budget.** With ``f = diagnostics.max_time_fraction`` (default 0.10), ``S`` the training seconds so
  far (wall time of the loop less diagnostics, mid-run evaluation and checkpoints) and ``D`` the seconds
  all diagnostics passes took so far, a pass may spend ``A = f·S − D`` (savings of earlier passes carry
  over, overruns are paid back). With ``g`` the fixed part of a pass (head geometry, metrics, data files:
  the last pass's time less its probe and figures), ``φ`` the seconds of the PNG figures (the last drawn;
  before any, :data:`FIGURES_GUESS_S`) and ``p`` the seconds per probed task (the last pass's; before any
  pass, a training step's seconds scaled by probe rows / step rows),

      k = max(floor, k'),  k' = min(⌊(A − g − φ) / p⌋, T) if that is >= 2, else 0
                          (one task gives no pair but costs a backward),
      floor = min(T, MIN_PROBE_TASKS) in a run's first pass and whenever T <= MIN_PROBE_TASKS, else 0.

  The PNG figures of a pass (the bulk of ``g``; their data, .json and .csv, are always written) are
  drawn when the allowance left after the probe covers them (the last drawn figures' seconds; before
  any, :data:`FIGURES_GUESS_S`), and in the last pass of a run that has drawn none yet (so every run
  has one set).

  Up to :data:`MIN_PROBE_TASKS` tasks every pass probes all of them (small runs are exact and their
  conflict signal does not depend on timing); with more, the first pass probes at least that many (every
  run gets a matrix) and can overrun its share, which later passes pay back (k = 0: that pass has no
  probe, the sampler keeps the latest matrix). ``f = None`` probes every task every pass.

**What the estimate is, and its error.** Entries of the probed k x k block are exact: the same cosines a
full pass at that step would give (the same model, the same probe rows). The matrix handed to the
sampler is the *latest* one (:meth:`ProbePlan.merge`): each entry is the cosine measured the last time
both tasks were probed together, NaN until then (the sampler skips NaN; a task with no probed pair yet
gets the mean of the probed tasks' row means, :func:`rlora.sampler.dynamic.conflict_means`). The dynamic sampler uses the
row means ``c_t = mean_{u≠t} C[t, u]``; from one pass, the mean over the k − 1 probed partners of t is
an unbiased estimate of the full row mean (a simple random sample of the T − 1 partners, without
replacement), with standard error

      SE(c_t) = σ_t / √(k − 1) · √((T − k) / (T − 2)),

σ_t the standard deviation of row t's T − 1 off-diagonal entries (0 when k = T). Over passes the
merged row mixes measurements of different steps (how old depends on when the pair was last drawn together),
which adds the drift of the model over that many passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

MIN_PROBE_TASKS = 8
FIGURES_GUESS_S = 3.0  # seconds of a pass's PNGs before any was timed (SmolLM2-135M, 2-core CPU: 2-4 s)


def row_mean_standard_error(sigma: float, k: int, num_tasks: int) -> float:
    """SE of the mean of one row's k − 1 sampled off-diagonal entries (module docstring)."""
    if k >= num_tasks or num_tasks <= 2:
        return 0.0
    return sigma / math.sqrt(max(k - 1, 1)) * math.sqrt((num_tasks - k) / (num_tasks - 2))


def tasks_within_budget(num_tasks: int, fraction: Optional[float], train_s: float, spent_s: float, fixed_s: float,
                        per_task_s: float, first: bool = True) -> int:
    """k of the module docstring: how many tasks the next pass probes (``fixed_s`` = g + φ)."""
    floor = min(num_tasks, MIN_PROBE_TASKS) if first or num_tasks <= MIN_PROBE_TASKS else 0
    if fraction is None:
        return num_tasks
    allowance = fraction * max(train_s, 0.0) - spent_s - fixed_s
    k = min(num_tasks, int(allowance // per_task_s) if per_task_s > 0 else num_tasks)
    return max(floor, k if k >= 2 else 0)  # a single probed task gives no pair: not worth its backward


@dataclass
class ProbePlan:
    """The rotation, the running timing figures and the latest conflict matrix of one run."""

    num_tasks: int
    seed: int = 0
    cycle: int = 0
    position: int = 0
    order: list[int] = field(default_factory=list)
    spent_s: float = 0.0          # D: all passes so far
    fixed_s: Optional[float] = None
    per_task_s: Optional[float] = None
    passes: int = 0
    latest: Optional[np.ndarray] = None
    figures_s: Optional[float] = None  # the last drawn figures' seconds

    def next_subset(self, k: int) -> list[int]:
        """The next k task ids of the rotation (sorted); all tasks when k >= T."""
        T = self.num_tasks
        if k >= T:
            return list(range(T))
        out: set[int] = set()
        while len(out) < k:
            if self.position >= len(self.order):
                self.order = np.random.default_rng([self.seed, self.cycle]).permutation(T).tolist()
                self.cycle += 1
                self.position = 0
            t = self.order[self.position]
            if t in out:  # the new cycle starts with a task the last one's end just gave: probe it later
                self.order.append(self.order.pop(self.position))
                continue
            out.add(t)
            self.position += 1
        return sorted(out)

    def choose(self, fraction: Optional[float], train_s: float, step_s: float, probe_rows: int,
               step_rows: int) -> int:
        """k for the next pass (see :func:`tasks_within_budget`); ``step_s`` seconds of one training step
        of ``step_rows`` rows give the per-task estimate before any pass was measured."""
        per_task = self.per_task_s if self.per_task_s is not None else step_s * probe_rows / max(step_rows, 1)
        figures = self.figures_s if self.figures_s is not None else FIGURES_GUESS_S
        return tasks_within_budget(self.num_tasks, fraction, train_s, self.spent_s, (self.fixed_s or 0.0) + figures,
                                   per_task, first=self.passes == 0)

    def draw_figures(self, fraction: Optional[float], train_s: float, pass_s: float, last: bool) -> bool:
        """Whether this pass (``pass_s`` seconds so far) draws its PNGs (module docstring)."""
        if fraction is None or (last and self.figures_s is None):
            return True
        cost = self.figures_s if self.figures_s is not None else FIGURES_GUESS_S
        return fraction * max(train_s, 0.0) - self.spent_s - pass_s >= cost

    def record(self, pass_s: float, probe_s: float, probed: int, figures_s: Optional[float] = None) -> None:
        """A pass took ``pass_s`` seconds, ``probe_s`` of them probing ``probed`` tasks and ``figures_s``
        drawing its PNGs (None: none drawn)."""
        self.passes += 1
        self.spent_s += pass_s
        self.fixed_s = max(pass_s - probe_s - (figures_s or 0.0), 0.0)
        if figures_s is not None:
            self.figures_s = figures_s
        if probed:
            self.per_task_s = probe_s / probed

    def merge(self, matrix: np.ndarray) -> np.ndarray:
        """The latest matrix: entries of ``matrix`` that are finite replace the stored ones."""
        m = np.asarray(matrix, dtype=np.float64)
        if self.latest is None:
            self.latest = np.full((self.num_tasks, self.num_tasks), np.nan)
        ok = np.isfinite(m)
        self.latest[ok] = m[ok]
        return self.latest.copy()

    def state_dict(self) -> dict:
        """Everything the plan needs to go on after a resume, JSON-serialisable (NaN entries of the
        stored matrix as ``None``)."""
        latest = None if self.latest is None else [[v if math.isfinite(v) else None for v in row]
                                                   for row in self.latest.tolist()]
        return {"num_tasks": self.num_tasks, "seed": self.seed, "cycle": self.cycle, "position": self.position,
                "order": list(self.order), "spent_s": self.spent_s, "fixed_s": self.fixed_s,
                "per_task_s": self.per_task_s, "passes": self.passes, "figures_s": self.figures_s,
                "latest": latest}

    @classmethod
    def from_state(cls, state: dict) -> "ProbePlan":
        """The plan :meth:`state_dict` saved (``ValueError`` naming the problem when malformed)."""
        try:
            latest = state["latest"]
            plan = cls(num_tasks=int(state["num_tasks"]), seed=int(state["seed"]), cycle=int(state["cycle"]),
                       position=int(state["position"]), order=[int(t) for t in state["order"]],
                       spent_s=float(state["spent_s"]),
                       fixed_s=None if state["fixed_s"] is None else float(state["fixed_s"]),
                       per_task_s=None if state["per_task_s"] is None else float(state["per_task_s"]),
                       passes=int(state["passes"]),
                       figures_s=None if state["figures_s"] is None else float(state["figures_s"]),
                       latest=None if latest is None else np.array(
                           [[np.nan if v is None else float(v) for v in row] for row in latest], dtype=np.float64))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"probe plan state is malformed ({err!r}): pass the dict from ProbePlan.state_dict()") from None
        if plan.latest is not None and plan.latest.shape != (plan.num_tasks, plan.num_tasks):
            raise ValueError(f"probe plan state: stored matrix has shape {plan.latest.shape}, "
                             f"expected ({plan.num_tasks}, {plan.num_tasks})")
        return plan

    def budget_line(self, step: int, probed: int, pairs: int, probe_s: float, pass_s: float,
                    fraction: Optional[float], train_s: float, figures: bool = True) -> str:
        """The console line of a pass: what was probed, how long it took, against the budget."""
        what = f"probed {probed}/{self.num_tasks} tasks ({pairs} pairs)" if probed else "no probe"
        if fraction is None:
            budget = "no time budget (diagnostics.max_time_fraction: null)"
        else:
            share = self.spent_s / train_s if train_s > 0 else float("inf")
            budget = (f"diagnostics so far {self.spent_s:.1f}s = {100 * share:.1f}% of {train_s:.1f}s training "
                      f"(budget {100 * fraction:.0f}%{', over' if share > fraction else ''})")
        pngs = "" if figures else " without figures"
        return f"[rlora] diagnostics step {step}: {what} in {probe_s:.1f}s, pass {pass_s:.1f}s{pngs}; {budget}"


__all__ = ["MIN_PROBE_TASKS", "FIGURES_GUESS_S", "ProbePlan", "tasks_within_budget", "row_mean_standard_error"]
