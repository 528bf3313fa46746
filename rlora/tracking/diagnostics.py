"""Head and task diagnostics of a multi-head LoRA model, cheap enough to run every few dozen steps.

One pass (:func:`run_diagnostics`) combines four parts, each in its own module:

* :mod:`~rlora.tracking.head_geometry` -- from the adapter parameters alone: head similarity (raw
  heads, learned updates, effective per-head ΔW), update norms, effective rank, MTL-LoRA mixing;
* :mod:`~rlora.tracking.router_stats` -- router usage and entropy per task (HydraLoRA, R-LoRA);
* :mod:`~rlora.tracking.interference` -- per-task gradient cosines on the shared adapter parameters;
* :mod:`~rlora.tracking.metric_names` -- the flat MLflow metrics;

with the probe batches of :mod:`~rlora.tracking.probes`.  Everything returns plain Python / numpy
values.  The model must be the unwrapped module with its adapter parameters fully materialised
(every rank gathers them first under ZeRO-3).

Conventions (so that no metric is ever NaN):

* cosine of two heads when either has norm 0 (HydraLoRA / MTL-LoRA heads start at exactly zero) is
  defined as **0.0** ("no shared direction"); the diagonal of a similarity matrix is 1 for a
  non-zero head and 0 for a zero head.  Mean pairwise cosine = mean over the N(N-1)/2 pairs i < j.
* effective rank of a zero update is **0.0** (it spans nothing); otherwise exp(H(σ / Σσ)) ∈ [1, r].
* normalised router entropy of a one-head router is 1.0 (its only gate equals the uniform 1/N).
* a task whose probe gradient is exactly zero gets a zero row and column (diagonal included) in the
  interference matrix; a task absent from the probe gets NaN there (the dynamic sampler skips NaN)
  and is left out of the metrics.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
from torch import nn

from .errors import DiagnosticsError
from .head_geometry import (KINDS, cosine_from_gram, effective_rank, entropy_rank, head_norms, head_similarity,
                            head_similarity_matrices, layer_grams, mean_pairwise, mtl_mixing, update_similarity)
from .interference import gradient_pass, interference_summary, shared_adapter_params, task_interference
from .metric_names import PREFIX, flatten, metric_segment, module_type
from .probes import eval_mode, make_probe
from .router_stats import has_router, router_usage


@dataclass
class Diagnostics:
    """Everything one diagnostics pass computed (arrays as documented on each function)."""

    task_names: list[str]
    similarity: dict[str, dict[str, float]] = field(default_factory=dict)       # layer -> {"B_cos", "BA_cos", ...}
    matrices: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)   # layer -> {"B", "BA", ...}
    norms: dict[str, np.ndarray] = field(default_factory=dict)
    eff_rank: dict[str, np.ndarray] = field(default_factory=dict)
    router: Optional[dict] = None
    mtl: Optional[dict] = None
    interference: Optional[np.ndarray] = None
    seconds: float = 0.0
    probe_seconds: float = 0.0                                                  # the probe's part of ``seconds``
    probed: list[str] = field(default_factory=list)                             # the tasks of the probe

    @property
    def conflict(self) -> Optional[np.ndarray]:
        """The [T, T] matrix to pass as ``TaskSampler.update(..., conflict=...)``."""
        return self.interference

    def metrics(self) -> dict[str, float]:
        return flatten(self)


def run_diagnostics(model: nn.Module, probe: Optional[Mapping[str, Mapping]], task_names: Sequence[str],
                    interference: bool = True) -> Diagnostics:
    """All diagnostics in one pass: head geometry from the parameters, and — when a probe is given —
    one forward + ``autograd.grad`` per task that yields both the interference matrix and the router
    statistics (gates captured during the same forwards).  ``interference=False`` (or no trainable
    shared adapter parameter) runs the probe without gradients, for the router only.

    ``similarity[layer]`` holds ``B_cos``, ``BA_cos`` (raw heads), ``effective_cos`` and, where the
    initial heads are known, ``learned_cos``; ``matrices[layer]`` the matching [N, N] cosine
    matrices ``B``, ``BA``, ``effective``, ``learned``.

    Cost: the parameter part is negligible (SmolLM2-135M, 210 layers: ~0.05 s CPU); the probe part is
    one forward + backward of the probe rows, e.g. 6 tasks x 2 rows ≈ 3 training steps of 4 rows. With
    many tasks pass a probe of a subset (:class:`rlora.tracking.probe_budget.ProbePlan`, as the training
    loop does): the matrix then has NaN outside the probed tasks."""
    start = time.perf_counter()
    task_names = list(task_names)
    if probe:
        unknown = [k for k in probe if k not in task_names]
        if unknown:
            raise DiagnosticsError(f"probe tasks {unknown} are not in task_names {task_names}")
    grams = layer_grams(model)
    if not grams:
        raise DiagnosticsError("the model has no adapter layer: call rlora.inject (or rlora.load_adapter) first")
    d = Diagnostics(task_names=task_names)
    updates = update_similarity(model, grams)
    d.similarity = {k: {**v, **updates.get(k, {})} for k, v in head_similarity(model, grams).items()}
    mats = {kind: head_similarity_matrices(model, kind, grams) for kind in KINDS}
    d.matrices = {k: {kind: mats[kind][k] for kind in KINDS if k in mats[kind]} for k in mats["B"]}
    d.norms = head_norms(model, grams)
    d.eff_rank = effective_rank(model, grams)
    d.mtl = mtl_mixing(model)
    if probe:
        routed = has_router(model)
        t0 = time.perf_counter()
        d.probed = [t for t in task_names if t in probe]
        if interference and shared_adapter_params(model):
            d.interference, d.router = gradient_pass(model, probe, len(task_names), record_gates=routed)
        elif routed:
            d.router = router_usage(model, probe)
        d.probe_seconds = time.perf_counter() - t0
    d.seconds = time.perf_counter() - start
    return d


def diagnostics_metrics(model: nn.Module, probe: Optional[Mapping[str, Mapping]],
                        task_names: Sequence[str]) -> dict[str, float]:
    """``run_diagnostics(...).metrics()``: a flat {MLflow metric name: finite float} (names in
    :mod:`rlora.tracking.metric_names`)."""
    return run_diagnostics(model, probe, task_names).metrics()


__all__ = ["DiagnosticsError", "Diagnostics", "run_diagnostics", "diagnostics_metrics", "head_similarity",
           "update_similarity", "head_similarity_matrices", "head_norms", "effective_rank", "router_usage",
           "mtl_mixing", "task_interference", "interference_summary", "make_probe", "cosine_from_gram",
           "mean_pairwise", "entropy_rank", "metric_segment", "module_type", "eval_mode", "has_router", "PREFIX"]
