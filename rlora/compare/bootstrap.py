"""Paired two-level bootstrap of the per-task accuracies of two arms: seeds and dev rows, crossed.

Input, per task ``t``: the scores of arm a and arm b, ``xa[t]`` and ``xb[t]`` of shape ``[S, n_t]``
(``S`` paired seeds in the same order in both, ``n_t`` dev rows in the same order in both). Every seed
scores the *same* dev rows, so seeds and rows are crossed, not nested: a row that arm a gets right and
arm b wrong in every seed adds the same difference to every seed's mean, and averaging over seeds does
not shrink it.

Write one arm's score as a two-way layout ``x[s, i] = m + alpha_s + beta_i + eps_si`` (seed effect,
row effect, interaction). What the observed accuracy ``m_hat = 1/(S n) sum_s sum_i x[s, i]`` varies by,
over new seeds and new rows, is ``var(alpha)/S + var(beta)/n + var(eps)/(S n)``. One replicate ``b``
resamples the two main effects independently and adds them (an additive two-way bootstrap):

1. **rows** -- draw ``n_t`` rows ``r_1 .. r_n`` with replacement, once for all seeds and both arms
   (paired), and take the mean of each drawn row's seed-mean score ``xbar[r] = 1/S sum_s x[s, r]``;
2. **seeds** -- draw ``k_1 .. k_S`` from the ``S`` seeds with replacement (one draw per replicate,
   shared by every task and both arms) and add the mean of their deviations
   ``xbar[k] - m_hat``, ``xbar[k] = 1/n sum_i x[k, i]`` (when ``S == 1`` nothing is drawn and the term is 0);
3. **accuracy** -- ``acc*[b, t] = 1/n sum_l xbar[r_l] + 1/S sum_j (xbar[k_j] - m_hat)``.

The two terms are independent given the data, so the replicate variance is their sum: rows give
``var(xbar[r]) / n``, whose expectation is ``(var(beta) + var(eps)/S) / n`` -- exactly the row and
interaction part, persistent row differences counted in full; seeds give ``(S - 1)/S^2 (var(alpha) +
var(eps)/n)``: a percentile bootstrap over ``S`` seeds sees ``(S - 1)/S`` of their variance (narrow when
seeds dominate; more seeds are the remedy), plus the row noise inside each seed's mean counted a second
time (wide when rows dominate). Two other schemes were measured and not used (tests/compare/test_coverage.py):
seeds then rows *within* each drawn seed (nested) draws rows afresh per seed, so a persistent row
difference is divided by ``S`` (too narrow when rows differ consistently between arms); resampling
rows once and reading the drawn seeds' own scores on them (Owen's pigeonhole bootstrap) adds the
interaction a third time (``(3 - 2/S)`` times its variance: about 1.4 x the exact width at ``S = 2``).
A replicate's accuracy can leave [0, 1] by a seed deviation when a task sits at 0 or 1 on nearly every
row; the intervals are of differences, so this is harmless.

How step 1 is drawn: rows with the same pair of seed means ``(xbar_a[r], xbar_b[r])`` are
interchangeable, so drawing ``n_t`` indices uniformly is the same, in distribution, as drawing how many
times each distinct pair comes up: ``counts ~ Multinomial(n_t, share of each pair)``. For 0/1 scores
there are at most ``(S + 1)^2`` pairs, so a replicate costs ``O(T (S + 1)^2)`` random numbers instead of
``O(sum_t n_t)``; the draws are made in chunks of replicates so that the count array stays under
:data:`CHUNK_ELEMENTS` numbers whatever ``n_boot`` is; numpy draws the multinomial rows one after the
other, so the chunk size does not change the numbers.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

CHUNK_ELEMENTS = 1 << 20     # at most this many multinomial counts held at once (8 MiB of int64)


def _row_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pairs of seed-mean row scores ``U`` [G, 2] and their share among the rows ``P`` [G]."""
    values, counts = np.unique(np.stack([a.mean(axis=0), b.mean(axis=0)], axis=1), axis=0, return_counts=True)
    return values, counts / a.shape[1]


def bootstrap_accuracies(xa: Sequence[np.ndarray], xb: Sequence[np.ndarray], n_boot: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Replicated per-task accuracies ``[2, n_boot, T]`` (index 0: arm a, 1: arm b), drawn as above."""
    num_seeds = xa[0].shape[0]
    seed_draws = rng.integers(0, num_seeds, size=(n_boot, num_seeds)) if num_seeds > 1 else None
    acc = np.empty((2, n_boot, len(xa)))
    for t, (a, b) in enumerate(zip(xa, xb)):
        values, shares = _row_pairs(a, b)
        n_rows = a.shape[1]
        chunk = max(1, CHUNK_ELEMENTS // len(values))
        for start in range(0, n_boot, chunk):
            stop = min(n_boot, start + chunk)
            counts = rng.multinomial(n_rows, shares, size=stop - start)                  # [c, G]
            # an elementwise product summed along G, not a matmul: BLAS may sum in another order for
            # another chunk size, and the numbers must not depend on it
            acc[:, start:stop, t] = (counts[:, :, None] * values).sum(axis=1).T / n_rows  # [2, c]
        if seed_draws is not None:
            seed_means = np.stack([a.mean(axis=1), b.mean(axis=1)])                       # [2, S]
            deviation = seed_means - seed_means.mean(axis=1, keepdims=True)
            acc[:, :, t] += deviation[:, seed_draws].mean(axis=2)                        # [2, B]
    return acc
