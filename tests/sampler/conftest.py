"""Shared helpers for the sampler tests."""
from __future__ import annotations

import numpy as np
import pytest

from rlora.config import SamplerConfig
from rlora.sampler import TaskSampler

STATIC = ["proportional", "temperature", "capped", "uniform", "probabilities"]
ALL = STATIC + ["round_robin", "dynamic"]
SIZES = [40, 120, 300, 75]
NAMES = ["qa", "nli", "sum", "code"]


def make_cfg(strategy: str, **kw) -> SamplerConfig:
    if strategy == "probabilities" and "probabilities" not in kw:
        kw["probabilities"] = {"qa": 0.1, "nli": 0.2, "sum": 0.3, "code": 0.4}
    if strategy == "capped" and "cap" not in kw:
        kw["cap"] = 100
    return SamplerConfig(strategy=strategy, **kw)


def make(strategy: str, *, sizes=SIZES, names=NAMES, batch_size=4, rank=0, world_size=1, seed=7, cfg_kw=None, **kw):
    return TaskSampler(sizes, make_cfg(strategy, **(cfg_kw or {})), batch_size=batch_size, rank=rank,
                       world_size=world_size, seed=seed, task_names=names, **kw)


def loss_feed(step: int, num_tasks: int) -> list[float]:
    """Deterministic synthetic per-task losses: task 0 plateaus, the others decay; one task
    is absent (NaN) each step."""
    out = []
    for t in range(num_tasks):
        if step % (num_tasks + 1) == t:
            out.append(float("nan"))
        elif t == 0:
            out.append(2.0 + 0.01 * ((step * 7) % 3))
        else:
            out.append(2.0 * 0.97 ** step + 0.1 * t)
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
