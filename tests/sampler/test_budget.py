"""Step and epoch budgets."""
from __future__ import annotations

import math

import numpy as np
import pytest

from .conftest import make

SIZES = [30, 90, 12]


def test_max_steps():
    s = make("uniform", sizes=SIZES, names=None, max_steps=17)
    assert len(list(s)) == 17 and s.step == 17 and s.total_steps == 17 and s.finished
    assert len(s.next_batch()) == 4 and s.step == 18  # next_batch itself never stops


def test_no_budget_is_endless():
    s = make("uniform", sizes=SIZES, names=None)
    assert s.total_steps is None
    it = iter(s)
    for _ in range(2000):
        next(it)
    assert not s.finished


@pytest.mark.parametrize("strategy", ["proportional", "uniform", "round_robin", "temperature"])
@pytest.mark.parametrize("epochs", [1, 2.5])
@pytest.mark.parametrize("composition", ["mixed", "homogeneous"])
def test_first_exhausted(strategy, epochs, composition):
    s = make(strategy, sizes=SIZES, names=None, num_epochs=epochs,
             cfg_kw={"stopping_strategy": "first_exhausted", "batch_composition": composition})
    quota = np.ceil(np.array(SIZES) * epochs)
    before = None
    n = 0
    for _ in s:
        n += 1
        if not s.finished:
            before = s.examples_seen
    assert (before < quota).all()  # one step earlier no task had finished
    assert (s.examples_seen >= quota).any()
    assert n == s.total_steps


@pytest.mark.parametrize("strategy", ["proportional", "uniform", "round_robin", "capped"])
def test_all_exhausted_restarts_finished_tasks(strategy):
    s = make(strategy, sizes=SIZES, names=None, num_epochs=2, cfg_kw={"stopping_strategy": "all_exhausted"})
    batches = list(s)
    seen = s.examples_seen
    assert (seen >= 2 * np.array(SIZES)).all()
    assert len(batches) == s.total_steps
    if strategy in ("uniform", "round_robin"):  # the small task kept cycling through extra epochs
        assert s.epochs[2] >= 5
    small = [i for b in batches for t, i in b if t == 2]  # each epoch a fresh permutation
    for e in range(len(small) // 12):
        assert sorted(small[e * 12:(e + 1) * 12]) == list(range(12))
    # one step less would not have been enough
    ref = make(strategy, sizes=SIZES, names=None)
    for _ in range(len(batches) - 1):
        ref.next_batch()
    assert (ref.examples_seen < 2 * np.array(SIZES)).any()


def test_dynamic_epoch_budget_is_data_driven_and_total_steps_estimates_it():
    s = make("dynamic", sizes=SIZES, names=None, num_epochs=3, batch_size=6)
    n = len(list(s))
    assert (s.examples_seen >= 3 * np.array(SIZES)).all()
    est = s.total_steps
    assert est == math.ceil(3 * s.steps_per_epoch())
    assert abs(n - est) <= 0.25 * est


def test_epoch_helpers():
    s = make("round_robin", sizes=[4, 8], names=["a", "b"], batch_size=4)
    s.next_batch(), s.next_batch(), s.next_batch()  # 6 examples each
    assert s.epochs == [1, 0] and s.epoch_of(0) == 1 and s.epoch_of("b") == 0
    assert s.examples_seen.tolist() == [6, 6]
    m = s.metrics()
    assert m["sampler/p/a"] == 0.5 and m["sampler/epoch/a"] == 1.5 and m["sampler/epoch/b"] == 0.75
    assert s.steps_per_epoch() == pytest.approx(4.0)  # all_exhausted: 8 / (0.5 * 4)


@pytest.mark.parametrize("stopping", ["first_exhausted", "all_exhausted"])
def test_total_steps_replays_across_blocks(stopping):
    """Budgets longer than one 256-step block: the replay carries the counts from block to block."""
    s = make("proportional", sizes=[300, 900, 120], names=None, batch_size=2, num_epochs=2,
             cfg_kw={"stopping_strategy": stopping})
    n = len(list(s))
    assert n > 3 * 256 and s.total_steps == n


def test_total_steps_when_the_budget_ends_on_the_first_step_of_a_block():
    """Seed 9 meets this budget at step 257: the first step of the second block counts the first block's draws."""
    s = make("uniform", sizes=[100, 1000], names=None, batch_size=2, seed=9, num_epochs=2.57,
             cfg_kw={"stopping_strategy": "first_exhausted"})
    n = len(list(s))
    assert n == 257 and s.total_steps == n


# dynamic, floor 1/2, sizes (100, 300), 4 slots: p = (0.375, 0.625), one epoch of each task takes
# 100 / 1.5 = 66.67 and 300 / 2.5 = 120 steps
DYN = dict(sizes=[100, 300], names=None, batch_size=4)


def test_dynamic_total_steps_follows_the_stopping_strategy():
    first = make("dynamic", num_epochs=1, cfg_kw={"dynamic_floor": 0.5, "stopping_strategy": "first_exhausted"}, **DYN)
    assert first.steps_per_epoch() == pytest.approx(200 / 3, rel=1e-12) and first.total_steps == 67
    last = make("dynamic", num_epochs=1, cfg_kw={"dynamic_floor": 0.5}, **DYN)
    assert last.steps_per_epoch() == 120.0 and last.total_steps == 120  # an exact product is not rounded up
    tiny = make("dynamic", num_epochs=0.001, cfg_kw={"dynamic_floor": 0.5}, **DYN)
    assert tiny.total_steps == 1  # ceil(0.12)


def test_dynamic_total_steps_starts_from_the_weighted_prior():
    """With task weights the dynamic start is the weighted prior: (100 * 3, 300 * 1) / 600 = (1/2, 1/2), so one
    epoch of the larger task takes 300 / (0.5 * 4) = 150 steps (the unweighted (1/4, 3/4) would give 100)."""
    s = make("dynamic", num_epochs=1, task_weights=[3.0, 1.0], cfg_kw={"dynamic_floor": 0.0}, **DYN)
    assert s.probabilities.tolist() == [0.5, 0.5]
    assert s.total_steps == 150 == math.ceil(s.steps_per_epoch())
