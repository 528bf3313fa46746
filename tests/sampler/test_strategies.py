"""Target distributions of the static strategies and the empirical task frequencies."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from rlora.config import SamplerConfig
from rlora.sampler import SamplerError, SamplerWarning, TaskSampler, compute_probabilities, steps_per_epoch
from rlora.sampler.strategies import proportional, validate_task_sizes

from .conftest import NAMES, SIZES, make, make_cfg

N = np.array(SIZES, dtype=float)


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("proportional", N / N.sum()),
        ("temperature", N ** 0.5 / (N ** 0.5).sum()),
        ("capped", np.minimum(N, 100) / np.minimum(N, 100).sum()),
        ("uniform", np.full(4, 0.25)),
        ("round_robin", np.full(4, 0.25)),
        ("probabilities", np.array([0.1, 0.2, 0.3, 0.4])),
        ("dynamic", 0.95 * N / N.sum() + 0.05 / 4),
    ],
)
def test_compute_probabilities(strategy, expected):
    p = compute_probabilities(SIZES, make_cfg(strategy), NAMES)
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    assert p.sum() == pytest.approx(1.0)


def test_temperature_limits_and_no_overflow():
    sizes = [10, 10**9]
    p1 = compute_probabilities(sizes, SamplerConfig(strategy="temperature", temperature=1.0))
    np.testing.assert_allclose(p1, np.array(sizes) / sum(sizes))
    p_cold = compute_probabilities(sizes, SamplerConfig(strategy="temperature", temperature=0.01))
    assert np.isfinite(p_cold).all() and p_cold[1] == pytest.approx(1.0)
    p_hot = compute_probabilities(sizes, SamplerConfig(strategy="temperature", temperature=1e6))
    np.testing.assert_allclose(p_hot, [0.5, 0.5], atol=1e-4)


def test_probabilities_not_summing_to_one_are_normalised_with_a_warning():
    cfg = SamplerConfig(strategy="probabilities", probabilities={"qa": 2, "nli": 1, "sum": 1, "code": 0})
    with pytest.warns(SamplerWarning, match=r"sum to 4, not 1: normalised to \[0.5, 0.25, 0.25, 0.0\]"):
        p = compute_probabilities(SIZES, cfg, NAMES)
    np.testing.assert_allclose(p, [0.5, 0.25, 0.25, 0.0])


def test_zero_probability_task_is_never_drawn_and_ignored_by_budget():
    cfg_kw = {"probabilities": {"qa": 0.5, "nli": 0.5, "sum": 0.0, "code": 0.0}}
    s = make("probabilities", cfg_kw=cfg_kw, num_epochs=1)
    batches = list(s)
    tasks = {t for b in batches for t, _ in b}
    assert tasks == {0, 1}
    assert len(batches) == s.total_steps
    assert s.examples_seen[0] >= 40 and s.examples_seen[1] >= 120


@pytest.mark.parametrize("strategy", ["proportional", "temperature", "capped", "uniform", "probabilities", "dynamic"])
@pytest.mark.parametrize("composition", ["mixed", "homogeneous"])
def test_empirical_frequencies_within_4_sigma(strategy, composition):
    world, bs, steps = 2, 4, 3000
    s = make(strategy, batch_size=bs, world_size=world, rank=0, cfg_kw={"batch_composition": composition})
    others = make(strategy, batch_size=bs, world_size=world, rank=1, cfg_kw={"batch_composition": composition})
    counts = np.zeros(4)
    for _ in range(steps):
        for b in (s.next_batch(), others.next_batch()):
            if composition == "homogeneous":
                counts[b[0][0]] += 1  # one independent draw per (step, rank) group
            else:
                for t, _ in b:
                    counts[t] += 1
    trials = steps * world * (1 if composition == "homogeneous" else bs)
    p = s.probabilities
    sigma = np.sqrt(trials * p * (1 - p))
    assert np.all(np.abs(counts - trials * p) <= 4 * sigma), (counts / trials, p)


def test_dynamic_frequencies_follow_reweighted_probabilities():
    s = make("dynamic", batch_size=8, cfg_kw={"dynamic_interval": 5, "dynamic_window": 2, "dynamic_tau": 0.2})
    for step in range(1, 6):  # task 0 plateaus, the rest halve -> one re-weighting at step 5
        s.update([1.0] + [0.5 ** step] * 3, step=step)
    p = s.probabilities
    assert p[0] > 0.5
    counts, steps = np.zeros(4), 2000
    for _ in range(steps):
        for t, _ in s.next_batch():
            counts[t] += 1
    trials = steps * 8
    assert np.all(np.abs(counts - trials * p) <= 4 * np.sqrt(trials * p * (1 - p)))


@pytest.mark.parametrize("composition", ["mixed", "homogeneous"])
def test_round_robin_order(composition):
    world, bs = 2, 3
    ranks = [make("round_robin", batch_size=bs, world_size=world, rank=r,
                  cfg_kw={"batch_composition": composition}) for r in range(world)]
    for step in range(6):
        for r, s in enumerate(ranks):
            tasks = [t for t, _ in s.next_batch()]
            if composition == "mixed":
                expected = [(step * world * bs + r * bs + j) % 4 for j in range(bs)]
            else:
                expected = [(step * world + r) % 4] * bs
            assert tasks == expected


def test_round_robin_first_batches_literal():
    s = make("round_robin", batch_size=3)
    assert [[t for t, _ in s.next_batch()] for _ in range(3)] == [[0, 1, 2], [3, 0, 1], [2, 3, 0]]


def test_steps_per_epoch_helper():
    p = np.array([0.5, 0.5])
    assert steps_per_epoch([100, 300], p, 10, "first_exhausted") == pytest.approx(20.0)
    assert steps_per_epoch([100, 300], p, 10, "all_exhausted") == pytest.approx(60.0)
    assert steps_per_epoch([100, 300], [1.0, 0.0], 10, "all_exhausted") == pytest.approx(10.0)


W = [3.0, 1.0, 0.5, 2.0]



@pytest.mark.parametrize("strategy", ["proportional", "temperature", "capped", "uniform",
                                      "dynamic"])
def test_task_weights_multiply_the_strategy_probabilities(strategy):
    """p_t = q_t w_t / sum_s q_s w_s with q the strategy's distribution (for dynamic: its prior, then the floor)."""
    q = compute_probabilities(SIZES, make_cfg(strategy), NAMES)
    s = make(strategy, task_weights=W)
    if strategy == "dynamic":
        prior = proportional(np.array(SIZES)) * W
        expected = 0.95 * prior / prior.sum() + 0.05 / 4
    else:
        expected = q * W / (q * W).sum()
    np.testing.assert_allclose(s.probabilities, expected, rtol=1e-12)
    assert not np.allclose(s.probabilities, q)
    # all weights 1 is no weighting
    np.testing.assert_array_equal(make(strategy, task_weights=[1.0] * 4).probabilities, make(strategy).probabilities)


def test_dynamic_reweighting_keeps_the_weighted_prior():
    """Equal loss signals give back the weighted prior (not the plain proportional one) at every re-weighting."""
    s = make("dynamic", task_weights=W, cfg_kw={"dynamic_interval": 2, "dynamic_window": 1})
    for step in range(1, 5):
        s.update([1.0] * 4, step=step)
    assert [h["step"] for h in s.history] == [0, 2, 4]
    prior = proportional(np.array(SIZES)) * W
    expected = 0.95 * prior / prior.sum() + 0.05 / 4
    np.testing.assert_allclose(s.probabilities, expected, rtol=1e-12)
    assert all(np.allclose(h["probabilities"], expected, rtol=1e-12) for h in s.history)


def test_weighted_draws_follow_the_weighted_probabilities():
    s = make("uniform", batch_size=8, task_weights=W)
    counts, steps = np.zeros(4), 2000
    for _ in range(steps):
        for t, _ in s.next_batch():
            counts[t] += 1
    p, trials = np.array(W) / sum(W), steps * 8
    np.testing.assert_allclose(s.probabilities, p, rtol=1e-12)
    assert np.all(np.abs(counts - trials * p) <= 4 * np.sqrt(trials * p * (1 - p)))


@pytest.mark.parametrize("strategy", ["round_robin", "probabilities"])
def test_task_weights_are_refused_where_there_is_nothing_to_weight(strategy):
    with pytest.raises(SamplerError,
                       match=rf"^data.tasks\[\].weight does not combine with sampler.strategy={strategy}"):
        make(strategy, task_weights=W)
    make(strategy, task_weights=[1.0] * 4)  # all ones: no weighting, accepted


def test_defaults_are_one_rank_and_seed_0():
    cfg = make_cfg("uniform")
    s = TaskSampler(SIZES, cfg, batch_size=4)
    assert (s.world_size, s.rank, s.seed) == (1, 0, 0)
    ref = TaskSampler(SIZES, cfg, batch_size=4, rank=0, world_size=1, seed=0)
    assert [s.next_batch() for _ in range(5)] == [ref.next_batch() for _ in range(5)]


def test_probabilities_summing_to_one_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = compute_probabilities(SIZES, make_cfg("probabilities"), NAMES)
    np.testing.assert_allclose(p, [0.1, 0.2, 0.3, 0.4], rtol=1e-12)


def _normalisation_warning():
    cfg = SamplerConfig(strategy="probabilities", probabilities={"a": 1.0, "b": 2.0})
    with pytest.warns(SamplerWarning) as record:
        compute_probabilities([5, 5], cfg, ["a", "b"])
    assert len(record) == 1
    return record[0]


def test_normalisation_warning_text():
    """The normalised probabilities are rounded to 6 decimals."""
    w = _normalisation_warning()
    assert str(w.message) == "sampler.probabilities sum to 3, not 1: normalised to [0.333333, 0.666667]"


@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ,
                    reason="under mutmut every call passes through extra trampoline frames, so stacklevel points there")
def test_normalisation_warning_points_at_the_caller():
    assert _normalisation_warning().filename == __file__


def test_task_cdf_ends_at_exactly_one():
    """Ten tasks of 1/10 sum to 0.9999999999999999; the CDF is divided by its last entry so no uniform can
    fall past the last task."""
    s = make("uniform", sizes=[3] * 10, names=None)
    assert np.cumsum(s.probabilities)[-1] < 1.0 and s._cdf[-1] == 1.0
    np.testing.assert_array_equal(s._cdf, np.cumsum(s.probabilities) / np.cumsum(s.probabilities)[-1])


def test_task_sizes_are_int64_whatever_integers_they_came_as():
    for given in ([np.int8(5), np.int8(7)], [np.uint64(5), np.uint64(7)], (5, 7)):
        sizes, names = validate_task_sizes(given)
        assert sizes.dtype == np.int64 and sizes.tolist() == [5, 7] and names == ["0", "1"]
