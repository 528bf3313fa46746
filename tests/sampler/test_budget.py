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
