"""The task sampler: which (task, example) fills every micro-batch slot of every rank.

Per step every rank computes the same **global** draw of ``S = world_size * batch_size`` slots and
keeps its slice ``[rank * batch_size, (rank + 1) * batch_size)``:

1. **task of each slot** -- ``mixed``: slot ``j`` gets ``searchsorted(cdf(p), u_j)`` with ``u`` the
   step's ``S`` uniforms; ``homogeneous``: rank group ``r`` gets one task from ``u_r`` (``W``
   uniforms per step) for all its ``batch_size`` slots; ``round_robin``: slot ``g = step * S + j``
   (or group ``step * W + r``) gets task ``g mod T``. The uniforms come from
   :class:`~rlora.sampler.streams.UniformStream`, a pure function of ``(seed, step)``.
2. **example of each slot** -- task ``t`` walks a per-epoch permutation of its ``n_t`` examples
   (:class:`~rlora.sampler.streams.PermutationStore`, keyed by ``(seed, t, epoch)``). Its cursor
   advances by the number of global slots ``t`` got; slots are served in global slot order, so
   the ranks never share an example index within a task epoch. A task that reaches the end of
   its permutation continues with the next epoch's permutation (so a micro-batch that straddles
   an epoch boundary of a small task may hold one example twice, once from each epoch).

Steps are computed in vectorised chunks (up to a 256-step block, or ``dynamic_interval`` steps
for ``dynamic``); a probability change discards the rest of the chunk, which is exact because a
step's draw depends only on its uniforms, the probabilities and the cursors.

Budget: ``max_steps``, or ``num_epochs`` with ``cfg.stopping_strategy`` -- ``first_exhausted``
stops as soon as one task (with ``p_t > 0``) has served ``ceil(num_epochs * n_t)`` examples,
``all_exhausted`` once every such task has (tasks already done keep cycling through new
epochs meanwhile). With neither, iteration never ends. :meth:`TaskSampler.next_batch` always
draws; only iteration (``for batch in sampler``) stops at the budget.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from rlora.config import SamplerConfig

from .dynamic import DynamicBalancer
from .errors import SamplerError
from .streams import BLOCK_STEPS, PermutationStore, UniformStream
from .strategies import (apply_task_weights, compute_probabilities, steps_per_epoch, validate_task_sizes,
                         validate_task_weights)

STATE_VERSION = 1


@dataclass
class _Chunk:
    """Precomputed steps ``[start, stop)`` for this rank."""

    start: int
    stop: int
    tasks: list  # [P][batch_size] task ids (python ints) of this rank's slice
    index: list  # [P][batch_size] example indices
    consumed: np.ndarray  # [P + 1, T] examples consumed per task before step start + i


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SamplerError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise SamplerError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class TaskSampler:
    """Reproducible multi-task micro-batch sampler (see the module docstring for the algorithm).

    Args:
        task_sizes: training examples per task ``[T]`` (each >= 1).
        cfg: the ``sampler`` section of the run config.
        batch_size: micro-batch size per rank.
        rank, world_size: this process's slice of the global draw.
        seed: non-negative integer; all randomness derives from ``(seed, step)`` and
            ``(seed, task, epoch)``.
        task_names: names for messages, logging and ``cfg.probabilities`` (default ``"0".."T-1"``).
        max_steps / num_epochs: the budget (at most one).
        task_weights: per-task weights ``w`` [T] (``data.tasks[].weight``): the strategy's
            probabilities become ``p_t w_t / sum_s p_s w_s`` (for ``dynamic``, its prior); refused
            with ``round_robin`` (no probabilities) and ``probabilities`` (give them directly).
    """

    def __init__(
        self,
        task_sizes: Sequence[int],
        cfg: SamplerConfig,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        task_names: Sequence[str] | None = None,
        max_steps: int | None = None,
        num_epochs: float | None = None,
        task_weights: Sequence[float] | None = None,
    ):
        if not isinstance(cfg, SamplerConfig):
            raise SamplerError(f"cfg must be a rlora.config.SamplerConfig, got {type(cfg).__name__}")
        sizes, names = validate_task_sizes(task_sizes, task_names)
        self.cfg = cfg
        self.task_sizes = sizes
        self.task_names = names
        self.num_tasks = len(sizes)
        self.batch_size = _int_arg("batch_size", batch_size, 1)
        self.world_size = _int_arg("world_size", world_size, 1)
        self.rank = _int_arg("rank", rank, 0)
        if self.rank >= self.world_size:
            raise SamplerError(f"rank {rank} is out of range for world_size={world_size}: use 0..{world_size - 1}")
        self.seed = _int_arg("seed", seed, 0)
        self.global_batch_size = self.world_size * self.batch_size
        if max_steps is not None and num_epochs is not None:
            raise SamplerError("max_steps and num_epochs are both set: give the sampler one budget")
        self.max_steps = None if max_steps is None else _int_arg("max_steps", max_steps, 1)
        self.num_epochs: float | None = None
        if num_epochs is not None:
            try:
                ne = float(num_epochs)
            except (TypeError, ValueError):
                raise SamplerError(f"num_epochs must be a number > 0, got {num_epochs!r}") from None
            if not (math.isfinite(ne) and ne > 0):
                raise SamplerError(f"num_epochs must be a finite number > 0, got {num_epochs!r}")
            self.num_epochs = ne

        self.strategy = cfg.strategy
        self.homogeneous = cfg.batch_composition == "homogeneous"
        self.task_weights = validate_task_weights(task_weights, cfg, names)
        self._probs = apply_task_weights(compute_probabilities(sizes, cfg, names), self.task_weights)
        self._dynamic = (DynamicBalancer(sizes, cfg, self.task_weights) if self.strategy == "dynamic" else None)
        if self._dynamic is not None:  # the floor applies to the weighted prior: start where the balancer does
            self._probs = self._dynamic.probabilities.copy()
        # tasks that can be drawn; only they count for the epoch budget
        self._active = self._probs > 0
        if self.homogeneous:
            small = [(names[t], int(sizes[t])) for t in range(self.num_tasks)
                     if self._active[t] and sizes[t] < self.batch_size]
            if small:
                name, n = small[0]
                raise SamplerError(
                    f"task {name!r} has {n} examples, fewer than one micro-batch (batch_size={self.batch_size}) "
                    "in homogeneous mode: use sampler.batch_composition=mixed or a smaller batch size"
                )
        self._quota = (
            None if self.num_epochs is None
            else np.ceil(self.num_epochs * sizes.astype(np.float64) - 1e-9).astype(np.int64)
        )
        self._draws = self.world_size if self.homogeneous else self.global_batch_size
        self._stream = UniformStream(self.seed, self._draws)
        self._perms = PermutationStore(self.seed, sizes)
        self._sizes_list = sizes.tolist()
        # row offset (step within chunk * T) of every flat slot, for the per-step bincount
        self._row_keys = np.arange(BLOCK_STEPS, dtype=np.int64).repeat(self.global_batch_size) * self.num_tasks
        self._set_cdf()
        self._step = 0
        self._base_step = 0
        self._base_consumed = np.zeros(self.num_tasks, dtype=np.int64)
        self._chunk: _Chunk | None = None
        self._total_steps: int | None = None
        self._total_known = False

    # ------------------------------------------------------------------------------------------
    # public read-only views
    # ------------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Micro-batches drawn so far (global: the same on every rank)."""
        return self._step

    @property
    def probabilities(self) -> np.ndarray:
        """Current task probabilities ``[T]`` (for logging; ``1/T`` for round_robin)."""
        return self._probs.copy()

    @property
    def history(self) -> list[dict]:
        """``[{"step", "probabilities"}]``: every re-weighting of ``dynamic`` (the start for the others)."""
        if self._dynamic is not None:
            return [dict(h) for h in self._dynamic.history]
        return [{"step": 0, "probabilities": self._probs.tolist()}]

    @property
    def loss_ratios(self) -> np.ndarray | None:
        """``dynamic``: the ``r_t`` of the last re-weighting; ``None`` for the other strategies."""
        return None if self._dynamic is None else self._dynamic.ratios.copy()

    @property
    def examples_seen(self) -> np.ndarray:
        """Examples served per task so far (all ranks together) ``[T]``."""
        return self._consumed_now().copy()

    @property
    def epochs(self) -> list[int]:
        """Completed passes per task (= index of the epoch each task is in)."""
        return (self._consumed_now() // self.task_sizes).tolist()

    def epoch_of(self, task_id: int) -> int:
        """Completed passes over task ``task_id``."""
        t = self._task_id(task_id)
        return int(self._consumed_now()[t] // self.task_sizes[t])

    def steps_per_epoch(self) -> float:
        """Expected steps for one epoch under ``cfg.stopping_strategy`` (see
        :func:`rlora.sampler.strategies.steps_per_epoch`), from the current probabilities."""
        return steps_per_epoch(self.task_sizes, self._probs, self.global_batch_size, self.cfg.stopping_strategy)

    @property
    def total_steps(self) -> int | None:
        """Steps in the budget: ``max_steps``; for ``num_epochs`` the exact stopping step for the
        static strategies (computed by replaying the task draws) and the estimate
        ``ceil(num_epochs * steps_per_epoch())`` from the starting distribution for ``dynamic``
        (whose draws depend on the loss feed); ``None`` without a budget."""
        if not self._total_known:
            self._total_steps = self._compute_total_steps()
            self._total_known = True
        return self._total_steps

    @property
    def finished(self) -> bool:
        """True once the budget is spent."""
        if self.max_steps is not None:
            return self._step >= self.max_steps
        if self._quota is None:
            return False
        return self._done(self._consumed_now())

    def metrics(self, prefix: str = "sampler") -> dict[str, float]:
        """Flat ``{f"{prefix}/p/{task}": p_t, f"{prefix}/epoch/{task}": e_t}`` for a metrics logger."""
        seen = self._consumed_now() / self.task_sizes
        out = {f"{prefix}/p/{n}": float(p) for n, p in zip(self.task_names, self._probs)}
        out.update({f"{prefix}/epoch/{n}": float(e) for n, e in zip(self.task_names, seen)})
        return out

    # ------------------------------------------------------------------------------------------
    # drawing
    # ------------------------------------------------------------------------------------------
    def next_batch(self) -> list[tuple[int, int]]:
        """This rank's micro-batch ``[(task_id, example_index)] * batch_size``; advances ``step``."""
        s = self._step
        chunk = self._chunk
        if chunk is None or s >= chunk.stop or s < chunk.start:
            chunk = self._build_chunk(s)
        i = s - chunk.start
        self._step = s + 1
        return list(zip(chunk.tasks[i], chunk.index[i]))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self

    def __next__(self) -> list[tuple[int, int]]:
        if self.finished:
            raise StopIteration
        return self.next_batch()

    def update(self, task_losses: Sequence[float], step: int | None = None, conflict: np.ndarray | None = None) -> None:
        """Feed the ``dynamic`` strategy (no-op for the others).

        ``task_losses[t]``: mean loss of task ``t`` over the last step, already reduced across
        ranks (NaN when absent); ``step``: the step it belongs to (default: ``self.step``);
        ``conflict``: optional ``[T, T]`` gradient-cosine matrix, used when
        ``cfg.dynamic_signal == "loss_ratio+conflict"``. Re-weights every ``dynamic_interval``
        steps; the new probabilities apply from the next drawn step on.
        """
        if self._dynamic is None:
            return
        changed = self._dynamic.observe(task_losses, self._step if step is None else step, conflict)
        if changed:
            self._rebase()
            self._probs = self._dynamic.probabilities.copy()
            self._set_cdf()

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {
            "task_sizes": self.task_sizes.tolist(),
            "task_names": list(self.task_names),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
            "config": self.cfg.model_dump(mode="json"),
            "task_weights": self.task_weights,
        }

    def state_dict(self) -> dict:
        """JSON-serialisable state: step, per-task epochs and cursors, dynamic history."""
        consumed = self._consumed_now()
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "epochs": (consumed // self.task_sizes).tolist(),
            "cursors": (consumed % self.task_sizes).tolist(),
            "dynamic": None if self._dynamic is None else self._dynamic.state_dict(),
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from :meth:`state_dict`; the sampler then continues exactly as the
        saved one would have. The setup (sizes, names, batch, world size, seed, config) must match."""
        if not isinstance(state, dict):
            raise SamplerError(f"sampler state must be a dict from state_dict(), got {type(state).__name__}")
        for key in ("version", "step", "epochs", "cursors", "dynamic", "fingerprint"):
            if key not in state:
                raise SamplerError(f"sampler state is missing {key!r}: pass the dict returned by state_dict()")
        if state["version"] != STATE_VERSION:
            raise SamplerError(f"sampler state version {state['version']!r} is not {STATE_VERSION}: start a fresh sampler")
        mine = self._fingerprint()
        theirs = state["fingerprint"]
        for key, value in mine.items():
            if not isinstance(theirs, dict) or theirs.get(key) != value:
                got = theirs.get(key) if isinstance(theirs, dict) else None
                raise SamplerError(
                    f"sampler state was saved with {key}={got!r}, this sampler has {key}={value!r}: "
                    "resume with the same setting or start a fresh sampler"
                )
        try:
            step = _int_arg("step", state["step"], 0)
            epochs = np.asarray(state["epochs"], dtype=np.int64)
            cursors = np.asarray(state["cursors"], dtype=np.int64)
        except (TypeError, ValueError, SamplerError) as err:
            raise SamplerError(f"sampler state is malformed ({err}): pass the dict from state_dict()") from None
        if (epochs.shape != (self.num_tasks,) or cursors.shape != (self.num_tasks,) or (epochs < 0).any()
                or (cursors < 0).any() or (cursors >= self.task_sizes).any()):
            raise SamplerError("sampler state has epochs/cursors out of range: pass the dict from state_dict()")
        if self._dynamic is not None:
            if not isinstance(state["dynamic"], dict):
                raise SamplerError("sampler state has no 'dynamic' section: it was saved by a non-dynamic sampler")
            self._dynamic.load_state_dict(state["dynamic"])
            self._probs = self._dynamic.probabilities.copy()
            self._set_cdf()
        self._step = step
        self._base_step = step
        self._base_consumed = epochs * self.task_sizes + cursors
        self._chunk = None

    # ------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------
    def _task_id(self, task_id) -> int:
        if isinstance(task_id, str):
            if task_id not in self.task_names:
                raise SamplerError(f"unknown task {task_id!r}: use one of {self.task_names}")
            return self.task_names.index(task_id)
        t = _int_arg("task_id", task_id, 0)
        if t >= self.num_tasks:
            raise SamplerError(f"task_id {t} is out of range: there are {self.num_tasks} tasks")
        return t

    def _set_cdf(self) -> None:
        cdf = np.cumsum(self._probs)
        self._cdf = cdf / cdf[-1]
        probs = self._probs.tolist()
        self._last_task = max(t for t, p in enumerate(probs) if p > 0)  # never drawn past it

    def _consumed_now(self) -> np.ndarray:
        c = self._chunk
        if c is not None and c.start <= self._step <= c.stop:
            return c.consumed[self._step - c.start]
        if self._step != self._base_step:  # pragma: no cover - internal invariant
            raise RuntimeError("sampler cursors are out of sync with its step")
        return self._base_consumed

    def _rebase(self) -> None:
        """Drop the precomputed chunk after the current step (probabilities are about to change)."""
        self._base_consumed = self._consumed_now().copy()
        self._base_step = self._step
        self._chunk = None

    def _done(self, consumed: np.ndarray) -> bool:
        done = consumed[self._active] >= self._quota[self._active]
        return bool(done.any() if self.cfg.stopping_strategy == "first_exhausted" else done.all())

    def _draw_tasks(self, start: int, count: int) -> np.ndarray:
        """Global task ids ``[count, S]`` of steps ``start .. start+count-1`` (within one block)."""
        w, b, t = self.world_size, self.batch_size, self.num_tasks
        per_step = w if self.homogeneous else w * b
        if self.strategy == "round_robin":
            ids = (np.arange(start * per_step, (start + count) * per_step, dtype=np.int64) % t)
            ids = ids.reshape(count, per_step)
        else:
            u = self._stream.rows(start, count)
            ids = np.searchsorted(self._cdf, u, side="right")
            np.minimum(ids, self._last_task, out=ids)
        if self.homogeneous:
            ids = np.repeat(ids, b, axis=1)
        return ids

    def _per_step_counts(self, flat: np.ndarray, steps: int) -> np.ndarray:
        """``[steps, T]`` slots per task of each step, from the flat ``[steps * S]`` task ids."""
        n = steps * self.global_batch_size
        keys = self._row_keys[:n] + flat
        return np.bincount(keys, minlength=steps * self.num_tasks).reshape(steps, self.num_tasks)

    def _chunk_len(self, s: int) -> int:
        n = BLOCK_STEPS - s % BLOCK_STEPS
        if self._dynamic is not None:
            n = min(n, self._dynamic.interval)
        if self.max_steps is not None and s < self.max_steps:
            n = min(n, self.max_steps - s)
        return n

    def _build_chunk(self, s: int) -> _Chunk:
        base = self._consumed_now().copy()
        self._base_step, self._base_consumed = s, base
        p, t_n, gs = self._chunk_len(s), self.num_tasks, self.global_batch_size
        ids = self._draw_tasks(s, p)  # [P, S]
        flat = ids.ravel()
        per_step = self._per_step_counts(flat, p)
        per_step[0] += base
        consumed = np.empty((p + 1, t_n), dtype=np.int64)
        consumed[0] = base
        np.cumsum(per_step, axis=0, out=consumed[1:])
        totals = consumed[-1] - base
        order = np.argsort(flat, kind="stable")  # slots grouped by task, in global slot order
        parts = []
        sizes, perms = self._sizes_list, self._perms
        for t, start, k in zip(range(t_n), base.tolist(), totals.tolist()):
            if k:
                epoch, off = divmod(start, sizes[t])
                if off + k <= sizes[t]:  # common case: inside the current epoch
                    parts.append(perms.perm(t, epoch)[off : off + k])
                else:
                    parts.append(perms.take(t, start, k))
        picked = np.concatenate(parts)  # grouped by task, like `order`
        index = np.empty_like(picked)
        index[order] = picked
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        chunk = _Chunk(
            start=s,
            stop=s + p,
            tasks=ids[:, lo:hi].tolist(),
            index=index.reshape(p, gs)[:, lo:hi].tolist(),
            consumed=consumed,
        )
        self._chunk = chunk
        return chunk

    def _compute_total_steps(self) -> int | None:
        if self.max_steps is not None:
            return self.max_steps
        if self._quota is None:
            return None
        if self._dynamic is not None:
            start = self._dynamic.start_probabilities()  # the task weights are part of the prior
            spe = steps_per_epoch(self.task_sizes, start, self.global_batch_size, self.cfg.stopping_strategy)
            return max(1, math.ceil(self.num_epochs * spe - 1e-9))
        # replay the task draws from step 0 (they do not depend on the examples)
        consumed = np.zeros(self.num_tasks, dtype=np.int64)
        s = 0
        quota, active = self._quota, self._active
        while True:
            p = BLOCK_STEPS - s % BLOCK_STEPS
            per_step = self._per_step_counts(self._draw_tasks(s, p).ravel(), p)
            per_step[0] += consumed
            cum = np.cumsum(per_step, axis=0)  # consumed after steps s .. s+p-1
            done = cum[:, active] >= quota[active]
            hit = done.any(axis=1) if self.cfg.stopping_strategy == "first_exhausted" else done.all(axis=1)
            if hit.any():
                return s + int(np.argmax(hit)) + 1
            consumed = cum[-1]
            s += p
