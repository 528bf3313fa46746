"""Paired hierarchical bootstrap of the per-task accuracies of two arms.

Input, per task ``t``: the scores of arm a and arm b, ``xa[t]`` and ``xb[t]`` of shape ``[S, n_t]``
(``S`` paired seeds in the same order in both, ``n_t`` dev rows in the same order in both).

One replicate ``b``:

1. **seeds** -- draw ``k_1 .. k_S`` from the ``S`` seeds with replacement (when ``S == 1`` there is
   nothing to draw: ``k_1`` is the one seed, and only rows are resampled);
2. **rows** -- for every drawn seed ``k_j`` and task ``t`` draw ``n_t`` row indices ``r_j1 .. r_jn``
   with replacement; the *same* indices for both arms (paired);
3. **accuracies** -- ``acc*_a[b, t] = 1 / (S n_t) * sum_j sum_i xa[t][k_j, r_ji]``, likewise for b.

How step 2 is drawn: in step 3 rows with the same pair of scores ``(xa, xb)`` are interchangeable,
so drawing ``n_t`` indices uniformly is the same, in distribution, as drawing how many times each
distinct pair comes up: ``counts ~ Multinomial(n_t, share of each pair among the rows of seed
k_j)``. A drawn row still carries both arms' scores, so pairing is kept. For 0/1 scores there are at
most four pairs (11, 10, 01, 00): a replicate costs ``O(S * T * 4)`` random numbers instead of
``O(S * sum_t n_t)``, and the draws are made in chunks of replicates so that the count array stays
under :data:`CHUNK_ELEMENTS` numbers whatever ``n_boot`` is; numpy draws the multinomial rows one
after the other, so the chunk size does not change the numbers.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

CHUNK_ELEMENTS = 1 << 20     # at most this many multinomial counts held at once (8 MiB of int64)


def _pair_table(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct score pairs ``U`` [G, 2] and their share in each seed's rows ``P`` [S, G]."""
    pairs = np.stack([a.reshape(-1), b.reshape(-1)], axis=1)
    values, which = np.unique(pairs, axis=0, return_inverse=True)
    which = which.reshape(a.shape)
    shares = np.stack([np.bincount(row, minlength=len(values)) for row in which]) / a.shape[1]
    return values, shares


def bootstrap_accuracies(xa: Sequence[np.ndarray], xb: Sequence[np.ndarray], n_boot: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Replicated per-task accuracies ``[2, n_boot, T]`` (index 0: arm a, 1: arm b), drawn as above."""
    num_seeds = xa[0].shape[0]
    if num_seeds > 1:
        seed_draws = rng.integers(0, num_seeds, size=(n_boot, num_seeds))
    else:
        seed_draws = np.zeros((n_boot, 1), dtype=np.int64)
    acc = np.empty((2, n_boot, len(xa)))
    for t, (a, b) in enumerate(zip(xa, xb)):
        values, shares = _pair_table(a, b)
        n_rows = a.shape[1]
        chunk = max(1, CHUNK_ELEMENTS // (num_seeds * len(values)))
        for start in range(0, n_boot, chunk):
            stop = min(n_boot, start + chunk)
            counts = rng.multinomial(n_rows, shares[seed_draws[start:stop]])    # [c, S, G]
            totals = (counts @ values).sum(axis=1)                               # [c, 2]
            acc[:, start:stop, t] = totals.T / (num_seeds * n_rows)
    return acc
