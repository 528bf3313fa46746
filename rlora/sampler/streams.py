"""Reproducible randomness for the sampler, keyed by (seed, step) and (seed, task, epoch).

* :class:`UniformStream` gives ``D`` uniforms in [0, 1) per step. Steps are grouped in blocks of
  :data:`BLOCK_STEPS`; block ``k = step // BLOCK_STEPS`` is drawn at once from
  ``np.random.default_rng([seed, 0, k])`` (shape ``[BLOCK_STEPS, D]``) and row
  ``step % BLOCK_STEPS`` belongs to ``step``. The uniforms of a step therefore depend only on
  ``(seed, step, D)``: a resumed sampler sees exactly the numbers the uninterrupted one saw,
  while one generator is built per 256 steps instead of one per step.
* :class:`PermutationStore` gives the order in which task ``t`` visits its examples during epoch
  ``e``: ``np.random.default_rng([seed, 1, t, e]).permutation(n_t)``, cached per task for the
  current and the next epoch.
"""
from __future__ import annotations

import numpy as np

BLOCK_STEPS = 256
_TASK_STREAM = 0
_PERM_STREAM = 1


class UniformStream:
    """``D`` uniforms per step; ``rows(step, count)`` is a view ``[count, D]`` inside one block."""

    def __init__(self, seed: int, draws_per_step: int):
        self.seed = int(seed)
        self.draws_per_step = int(draws_per_step)
        self._block_id = -1
        self._block: np.ndarray | None = None

    def block(self, k: int) -> np.ndarray:
        if k != self._block_id:
            rng = np.random.default_rng([self.seed, _TASK_STREAM, int(k)])
            self._block = rng.random((BLOCK_STEPS, self.draws_per_step))
            self._block_id = k
        return self._block  # type: ignore[return-value]

    def rows(self, step: int, count: int) -> np.ndarray:
        k, r = divmod(int(step), BLOCK_STEPS)
        if r + count > BLOCK_STEPS:
            raise ValueError(f"rows({step}, {count}) crosses a block boundary")
        return self.block(k)[r : r + count]


class PermutationStore:
    """Per-(task, epoch) example orders; ``take(t, start, count)`` reads ``count`` example indices
    of task ``t`` starting at its absolute position ``start`` (= epoch * n_t + cursor), crossing
    into later epochs (fresh permutations) when needed."""

    def __init__(self, seed: int, task_sizes: np.ndarray):
        self.seed = int(seed)
        self.sizes = np.asarray(task_sizes, dtype=np.int64)
        self._cache: list[dict[int, np.ndarray]] = [{} for _ in range(len(self.sizes))]

    def perm(self, task: int, epoch: int) -> np.ndarray:
        cache = self._cache[task]
        p = cache.get(epoch)
        if p is None:
            rng = np.random.default_rng([self.seed, _PERM_STREAM, int(task), int(epoch)])
            p = rng.permutation(int(self.sizes[task]))
            cache[epoch] = p
            if len(cache) > 2:
                for old in sorted(cache)[:-2]:
                    del cache[old]
        return p

    def take(self, task: int, start: int, count: int) -> np.ndarray:
        n = int(self.sizes[task])
        epoch, off = divmod(int(start), n)
        if off + count <= n:
            return self.perm(task, epoch)[off : off + count]
        parts = []
        left = count
        while left > 0:
            k = min(n - off, left)
            parts.append(self.perm(task, epoch)[off : off + k])
            left -= k
            epoch += 1
            off = 0
        return np.concatenate(parts)
