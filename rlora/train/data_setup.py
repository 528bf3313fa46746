"""The "set up data and sampler" phase: the tasks in task-id order, their tokenised training rows, the
dev rows, and the sampler that gives this rank its slice of every global batch. The driver's
preflight and every training process build them with the same functions."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, RunConfig

log = logging.getLogger(__name__)


def resolve_tasks(cfg: RunConfig, data_names: list[str]) -> list[str]:
    """The task names in task-id order; an empty ``adapter.tasks`` is filled from the data (in place)."""
    if not cfg.adapter.tasks:
        cfg.adapter.tasks = list(data_names)
    elif list(cfg.adapter.tasks) != list(data_names):
        raise ConfigError(f"adapter.tasks {list(cfg.adapter.tasks)} differ from the data's tasks {list(data_names)}: "
                          "remove adapter.tasks or list the same tasks in the same order")
    return list(cfg.adapter.tasks)


def sampler_config(cfg: RunConfig):
    """``cfg.sampler`` for a sampler that draws micro-batches: ``dynamic_interval`` is given in
    optimizer steps, the sampler counts micro-batches, so it is scaled by the accumulation steps
    (the loss window counts ``update`` calls, once per optimizer step, and needs no change)."""
    ga = cfg.trainer.gradient_accumulation_steps
    if ga == 1:
        return cfg.sampler
    return cfg.sampler.model_copy(update={"dynamic_interval": cfg.sampler.dynamic_interval * ga})


def build_sampler(cfg: RunConfig, sizes: list[int], names: list[str], rank: int, world_size: int):
    """The run's :class:`~rlora.sampler.TaskSampler` for one rank (micro-batches; the budget in them)."""
    from ..sampler import TaskSampler

    t = cfg.trainer
    ga = t.gradient_accumulation_steps
    return TaskSampler(sizes, sampler_config(cfg), batch_size=t.per_device_train_batch_size, rank=rank,
                       world_size=world_size, seed=t.seed, task_names=names,
                       max_steps=t.max_steps * ga if t.max_steps else None, num_epochs=t.num_train_epochs,
                       task_weights=task_weights(cfg, names))


def task_weights(cfg: RunConfig, names: list[str]) -> list[float] | None:
    """``data.tasks[].weight`` in task order (1 where unset); ``None`` when no task sets one."""
    given = {s.name: s.weight for s in cfg.data.tasks if s.weight is not None}
    if not given:
        return None
    return [float(given.get(n, 1.0)) for n in names]


def optimizer_steps(cfg: RunConfig, sampler) -> int:
    """Optimizer steps of the run: ``max_steps``, or the sampler's epoch budget in whole optimizer steps."""
    t = cfg.trainer
    return t.max_steps or max(1, math.ceil(sampler.total_steps / t.gradient_accumulation_steps))


@dataclass
class TrainData:
    names: list[str]
    tokenized: dict[str, list]
    dev: dict[str, list]
    pad_id: int
    truncated: dict[str, Any]
    sampler: Any
    total_steps: int
    cache_note: str = ""

    @property
    def rows(self) -> int:
        return sum(map(len, self.tokenized.values()))


def load_train_data(cfg: RunConfig, tokenizer, rank: int, world_size: int) -> TrainData:
    """The training rows come from the on-disk token cache (:mod:`rlora.data.token_cache`): built by the
    first process of the node that needs it, memory-mapped by all; ``tokenized[task][i]`` reads row ``i``
    from the map. The dev rows are read whole (evaluation scores every one of them)."""
    from ..data import load_tasks
    from ..data.token_cache import open_or_build

    cache = open_or_build(cfg.data, tokenizer)
    names = resolve_tasks(cfg, cache.names)
    dev = load_tasks(cfg.data, cfg.eval.split) if cfg.eval.max_examples_per_task != 0 else {}
    tokenized = cache.tasks
    truncated = {n: t.num_truncated for n, t in tokenized.items()}
    cut = {n: c for n, c in truncated.items() if c}
    if len(cut) > 10:  # many tasks: one line (the counts per task are in the run's record)
        worst = sorted(cut, key=lambda n: -cut[n] / len(tokenized[n]))[:3]
        log.warning("%d of %d tasks have rows longer than max_length=%d (%d rows in all, truncated from the left of "
                    "the prompt); most: %s", len(cut), len(names), cfg.data.max_length, sum(cut.values()),
                    ", ".join(f"{n} {cut[n]}/{len(tokenized[n])}" for n in worst))
    else:
        for name, count in cut.items():
            log.warning("task %s: %d of %d rows longer than max_length=%d were truncated from the left of the prompt",
                        name, count, len(tokenized[name]), cfg.data.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampler = build_sampler(cfg, [len(tokenized[n]) for n in names], names, rank, world_size)
    return TrainData(names, tokenized, dev, pad_id, truncated, sampler, optimizer_steps(cfg, sampler), cache.note())
