"""Synthetic comparison cells for the tests."""
from __future__ import annotations

import numpy as np


def cell(method: str, sampler: str, seed: int, correct: dict, **extra) -> dict:
    """One cell; ``correct`` maps task -> 0/1 scores (any sequence)."""
    return {"method": method, "sampler": sampler, "seed": seed,
            "correct": {t: np.asarray(v).tolist() for t, v in correct.items()}, **extra}


def arm(method: str, sampler: str, scores_by_seed: dict) -> list[dict]:
    """Cells of one arm from ``{seed: {task: scores}}``."""
    return [cell(method, sampler, s, c) for s, c in scores_by_seed.items()]


def paired_vector(n_plus: int, n_minus: int, n_both: int, n: int, rng: np.random.Generator):
    """Two 0/1 arrays of length ``n`` whose row difference a - b has ``n_plus`` +1s, ``n_minus`` -1s
    and zeros elsewhere (``n_both`` rows where both are right), in a random row order."""
    a = np.r_[np.ones(n_plus), np.zeros(n_minus), np.ones(n_both), np.zeros(n - n_plus - n_minus - n_both)]
    b = np.r_[np.zeros(n_plus), np.ones(n_minus), np.ones(n_both), np.zeros(n - n_plus - n_minus - n_both)]
    order = rng.permutation(n)
    return a[order].astype(int), b[order].astype(int)


def grid(methods: dict, samplers=("proportional", "dynamic"), seeds=(0, 1, 2), tasks=("qa", "nli", "sum"),
         n_rows: int = 120, seed: int = 0) -> list[dict]:
    """Cells of every (method, sampler, seed): ``methods`` maps a method to its accuracy; rows are
    correlated across methods (a shared per-row difficulty), as real dev rows are."""
    rng = np.random.default_rng(seed)
    difficulty = {(s, t): rng.random(n_rows) for s in seeds for t in tasks}
    cells = []
    for sampler in samplers:
        for method, acc in methods.items():
            for s in seeds:
                noise = {t: rng.random(n_rows) * 0.2 - 0.1 for t in tasks}
                correct = {t: (difficulty[s, t] + noise[t] < acc).astype(int) for t in tasks}
                cells.append(cell(method, sampler, s, correct, wall_s=100.0 + s, params={"r": 8}))
    return cells
