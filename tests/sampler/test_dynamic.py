"""The dynamic (DWA-style) balancer."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from rlora.config import SamplerConfig
from rlora.sampler import DynamicBalancer, SamplerError

from .conftest import loss_feed, make

EQUAL = [100, 100, 100]


def _feed_plateau(s, steps, stalled=0):
    for step in range(1, steps + 1):
        losses = [2.0 * 0.95 ** step] * 3
        losses[stalled] = 2.0
        s.update(losses, step=step)


def test_weight_moves_to_the_task_whose_loss_stops_falling():
    s = make("dynamic", sizes=EQUAL, names=None, cfg_kw={"dynamic_interval": 5, "dynamic_window": 5})
    np.testing.assert_allclose(s.probabilities, [1 / 3] * 3)
    _feed_plateau(s, 60, stalled=1)
    p = s.probabilities
    assert p[1] > 0.38 and p[1] > p[0] + 0.07 and p[1] > p[2] + 0.07
    assert p[0] == pytest.approx(p[2])
    # exact value: r = (1, 0.95^5, 1) ... the two decaying tasks share the same ratio
    r = 0.95 ** 5
    w = np.exp(np.array([r, 1.0, r]))
    np.testing.assert_allclose(p, 0.95 * w / w.sum() + 0.05 / 3, rtol=1e-12)
    np.testing.assert_allclose(s.loss_ratios, [r, 1.0, r], rtol=1e-12)


def test_reweighting_happens_every_interval_and_is_logged():
    s = make("dynamic", sizes=EQUAL, names=None, cfg_kw={"dynamic_interval": 4, "dynamic_window": 1})
    _feed_plateau(s, 12)
    assert [h["step"] for h in s.history] == [0, 4, 8, 12]
    assert s.history[-1]["probabilities"] == s.probabilities.tolist()


def test_floor_keeps_every_task_alive():
    cfg_kw = {"dynamic_interval": 1, "dynamic_window": 1, "dynamic_tau": 0.01, "dynamic_floor": 0.3}
    s = make("dynamic", sizes=EQUAL, names=None, cfg_kw=cfg_kw)
    _feed_plateau(s, 20, stalled=2)
    p = s.probabilities
    assert p[2] > 0.75
    assert p.min() >= 0.3 / 3 - 1e-12
    assert p.sum() == pytest.approx(1.0)


def test_starts_from_proportional_with_floor():
    s = make("dynamic", sizes=[100, 300], names=None, cfg_kw={"dynamic_floor": 0.2})
    np.testing.assert_allclose(s.probabilities, 0.8 * np.array([0.25, 0.75]) + 0.1)


def test_nan_means_absent_and_too_little_history_is_neutral():
    s = make("dynamic", sizes=EQUAL, names=None, cfg_kw={"dynamic_interval": 1, "dynamic_window": 2})
    for step in range(1, 6):
        s.update([1.0 / step, float("nan"), 1.0 / step], step=step)
    r = s.loss_ratios
    assert r[1] == 1.0 and r[0] < 1.0  # task 1 never observed: counted as not improving
    assert s.probabilities[1] > s.probabilities[0]


def test_conflict_signal_boosts_the_task_against_the_rest():
    c = np.array([[1.0, 0.5, -0.6], [0.5, 1.0, -0.4], [-0.6, -0.4, 1.0]])
    cfg_kw = {"dynamic_interval": 1, "dynamic_window": 1, "dynamic_signal": "loss_ratio+conflict",
              "dynamic_conflict_weight": 1.0, "dynamic_floor": 0.0}
    s = make("dynamic", sizes=EQUAL, names=None, cfg_kw=cfg_kw)
    s.update([1.0, 1.0, 1.0], step=1, conflict=c)
    p = s.probabilities
    cbar = np.array([(0.5 - 0.6) / 2, (0.5 - 0.4) / 2, (-0.6 - 0.4) / 2])
    w = np.exp(1.0 - cbar)
    np.testing.assert_allclose(p, w / w.sum(), rtol=1e-12)
    assert p.argmax() == 2
    # loss_ratio alone ignores the matrix
    s2 = make("dynamic", sizes=EQUAL, names=None, cfg_kw={**cfg_kw, "dynamic_signal": "loss_ratio"})
    s2.update([1.0, 1.0, 1.0], step=1, conflict=c)
    np.testing.assert_allclose(s2.probabilities, [1 / 3] * 3)


def test_conflict_nan_entries_are_skipped():
    cfg = SamplerConfig(strategy="dynamic", dynamic_signal="loss_ratio+conflict")
    b = DynamicBalancer(np.array([1, 1, 1]), cfg)
    m = b._conflict_means(np.array([[1, np.nan, -0.5], [np.nan, 1, np.nan], [-0.5, np.nan, 1]]))
    np.testing.assert_allclose(m, [-0.5, -0.5, -0.5])  # task 1 has no pair: the mean of the known row means
    m = b._conflict_means(np.array([[1, 0.2, np.nan], [0.2, 1, np.nan], [np.nan, np.nan, 1]]))
    np.testing.assert_allclose(m, [0.2, 0.2, 0.2])
    np.testing.assert_array_equal(b._conflict_means(np.full((3, 3), np.nan)), [0.0, 0.0, 0.0])


@pytest.mark.parametrize("probed", [200, 8, 2])
def test_a_constant_conflict_matrix_leaves_the_probabilities_as_without_conflict(probed):
    """T=200, every off-diagonal cosine 0.3, the first ``probed`` tasks probed (the rest NaN, as
    after the first budgeted pass): every task gets the same c_t, so the probabilities equal
    the loss_ratio-only ones (before the fix the 8 probed tasks were drawn 0.754x as often)."""
    sizes = np.arange(1, 201) * 3
    kw = {"dynamic_interval": 1, "dynamic_window": 1, "dynamic_conflict_weight": 1.0, "dynamic_floor": 0.1}
    with_c = DynamicBalancer(sizes, SamplerConfig(strategy="dynamic", dynamic_signal="loss_ratio+conflict", **kw))
    without = DynamicBalancer(sizes, SamplerConfig(strategy="dynamic", dynamic_signal="loss_ratio", **kw))
    c = np.full((200, 200), np.nan)
    c[:probed, :probed] = 0.3
    np.fill_diagonal(c, 1.0)
    losses = [1.0 + 0.01 * (t % 7) for t in range(200)]
    for step in (1, 2):
        with_c.observe(losses, step=step, conflict=c)
        without.observe(losses, step=step)
        losses = [v * (0.9 + 0.001 * t) for t, v in enumerate(losses)]
    np.testing.assert_allclose(with_c.conflict, np.full(200, 0.3), rtol=0, atol=1e-15)
    np.testing.assert_allclose(with_c.probabilities, without.probabilities, rtol=1e-12, atol=0)
    assert not np.allclose(with_c.probabilities, with_c.start_probabilities())  # the loss ratios did move them


def test_same_feed_same_probabilities_and_draws():
    a = make("dynamic", cfg_kw={"dynamic_interval": 3, "dynamic_window": 2})
    b = make("dynamic", cfg_kw={"dynamic_interval": 3, "dynamic_window": 2})
    for step in range(100):
        assert a.next_batch() == b.next_batch()
        a.update(loss_feed(step, 4), step=step + 1)
        b.update(loss_feed(step, 4), step=step + 1)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    assert not np.allclose(a.probabilities, a.history[0]["probabilities"])


def test_update_is_a_no_op_for_static_strategies():
    s = make("proportional")
    p = s.probabilities
    s.update([math.nan, 1.0, 2.0, 3.0], step=100)
    np.testing.assert_array_equal(s.probabilities, p)
    assert s.loss_ratios is None and len(s.history) == 1


def test_bad_update_input():
    s = make("dynamic", cfg_kw={"dynamic_signal": "loss_ratio+conflict"})
    with pytest.raises(SamplerError, match=r"^update: task_losses has 2 values but there are 4 tasks: "
                                           r"give one mean loss per task \(NaN when absent\)$"):
        s.update([1.0, 2.0])
    with pytest.raises(SamplerError, match=r"^update: conflict has shape \(2, 2\), expected \(4, 4\)"):
        s.update([1.0] * 4, conflict=np.eye(2))
    with pytest.raises(SamplerError, match=r"^update: step must be a non-negative integer, got -1$"):
        s.update([1.0] * 4, step=-1)
    with pytest.raises(SamplerError, match=r"^update: task_losses must be a sequence of floats"):
        s.update(["a", "b", "c", "d"])


def _two_step_probabilities(**cfg_kw):
    """Equal sizes, window 1: step 1 gives one loss per task, step 2 the ratios r = (1, 0.5, 0.25)."""
    s = make("dynamic", sizes=EQUAL, names=None,
             cfg_kw={"dynamic_interval": 1, "dynamic_window": 1, "dynamic_floor": 0.0, **cfg_kw})
    s.update([1.0, 1.0, 1.0], step=1)
    s.update([1.0, 0.5, 0.25], step=2)
    np.testing.assert_allclose(s.loss_ratios, [1.0, 0.5, 0.25])
    return s.probabilities


@pytest.mark.parametrize("tau", [0.25, 1.0, 4.0])
def test_tau_divides_the_signal(tau):
    """p_t ~ exp(r_t / tau): a small tau concentrates the weight on the stalled task, a large one flattens it."""
    p = _two_step_probabilities(dynamic_tau=tau)
    w = np.exp(np.array([1.0, 0.5, 0.25]) / tau)
    np.testing.assert_allclose(p, w / w.sum(), rtol=1e-12)


def test_tau_orders_the_spread():
    cold, hot = _two_step_probabilities(dynamic_tau=0.25), _two_step_probabilities(dynamic_tau=4.0)
    assert cold[0] > hot[0] and cold[2] < hot[2]


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_conflict_weight_scales_the_conflict_term(beta):
    """s_t = r_t - beta * c_t: beta 0 ignores the matrix, larger beta moves more weight to the conflicting task."""
    c = np.array([[1.0, 0.5, -0.6], [0.5, 1.0, -0.4], [-0.6, -0.4, 1.0]])
    s = make("dynamic", sizes=EQUAL, names=None, cfg_kw={
        "dynamic_interval": 1, "dynamic_window": 1, "dynamic_floor": 0.0, "dynamic_signal": "loss_ratio+conflict",
        "dynamic_conflict_weight": beta})
    s.update([1.0, 1.0, 1.0], step=1, conflict=c)
    cbar = np.array([(0.5 - 0.6) / 2, (0.5 - 0.4) / 2, (-0.6 - 0.4) / 2])
    w = np.exp(1.0 - beta * cbar)
    np.testing.assert_allclose(s.probabilities, w / w.sum(), rtol=1e-12)
    if beta == 0.0:
        np.testing.assert_allclose(s.probabilities, [1 / 3] * 3, rtol=1e-12)


def _balancer(sizes, **cfg_kw):
    return DynamicBalancer(np.array(sizes), SamplerConfig(strategy="dynamic", **cfg_kw))


def test_fresh_balancer_has_neutral_ratios():
    np.testing.assert_array_equal(make("dynamic").loss_ratios, np.ones(4))


def test_observe_reports_whether_it_reweighted():
    b = _balancer([1, 1], dynamic_interval=2)
    assert [b.observe([1.0, 1.0], step) for step in (1, 2, 3, 4)] == [False, True, False, True]


def test_zero_old_window_gives_a_neutral_ratio():
    """r_t = 1 when the older window's mean is not positive (no division by 0)."""
    b = _balancer([1, 1], dynamic_interval=1, dynamic_window=1)
    b.observe([0.0, 1.0], 1)
    b.observe([0.5, 0.5], 2)
    assert b.loss_ratios().tolist() == [1.0, 0.5]
    assert b.ratios.tolist() == [1.0, 0.5]


def test_array_losses_are_read_like_a_list():
    """Any array of per-task losses is flattened; numeric text is read with float() on both paths."""
    feeds = [[1.0, 2.0, 3.0, 4.0], [0.5, 2.0, 1.5, 4.0], [0.25, 2.5, 1.0, 4.0]]
    kw = {"dynamic_interval": 1, "dynamic_window": 1}
    ref, square, text = make("dynamic", cfg_kw=kw), make("dynamic", cfg_kw=kw), make("dynamic", cfg_kw=kw)
    for step, losses in enumerate(feeds, start=1):
        ref.update(losses, step=step)
        square.update(np.array(losses).reshape(2, 2), step=step)
        text.update(np.array([repr(x) for x in losses]), step=step)
    assert square.state_dict() == ref.state_dict() and text.state_dict() == ref.state_dict()
    assert ref.loss_ratios.tolist() == [0.5, 1.25, 2 / 3, 1.0]


def test_conflict_means_for_one_and_two_tasks():
    cfg = {"dynamic_signal": "loss_ratio+conflict"}
    np.testing.assert_array_equal(_balancer([5], **cfg)._conflict_means(np.array([[1.0]])), np.zeros(1))
    # an integer matrix is read as floats: c_t = C[t, 1 - t]
    np.testing.assert_array_equal(_balancer([5, 5], **cfg)._conflict_means(np.array([[1, -1], [0, 1]])), [-1.0, 0.0])


def test_the_last_conflict_matrix_is_kept_until_the_next():
    c = np.array([[1.0, 0.5, -0.6], [0.5, 1.0, -0.4], [-0.6, -0.4, 1.0]])
    s = make("dynamic", sizes=EQUAL, names=None, cfg_kw={
        "dynamic_interval": 1, "dynamic_window": 1, "dynamic_signal": "loss_ratio+conflict", "dynamic_floor": 0.0})
    s.update([1.0, 1.0, 1.0], step=1, conflict=c)
    s.update([1.0, 1.0, 1.0], step=2)  # no matrix this step
    cbar = np.array([(0.5 - 0.6) / 2, (0.5 - 0.4) / 2, (-0.6 - 0.4) / 2])
    w = np.exp(1.0 - cbar)
    np.testing.assert_allclose(s.probabilities, w / w.sum(), rtol=1e-12)


def test_loss_ratio_signal_ignores_stored_cosines():
    """beta = 0 for loss_ratio: cosines in a loaded state do not move the probabilities."""
    src = _balancer([1, 3], dynamic_signal="loss_ratio+conflict", dynamic_interval=1, dynamic_floor=0.0)
    src.observe([1.0, 1.0], 1, conflict=np.array([[1.0, -0.5], [-0.5, 1.0]]))
    assert src.conflict.tolist() == [-0.5, -0.5]
    b = _balancer([1, 3], dynamic_interval=1, dynamic_floor=0.0)
    state = src.state_dict()
    state["conflict"] = [-0.5, 0.5]
    b.load_state_dict(state)
    b.reweight(2)
    np.testing.assert_allclose(b.probabilities, [0.25, 0.75], rtol=1e-12)


def test_tiny_tau_does_not_overflow():
    """exp(s_t / tau - max): tau = 1e-3 puts logits near 1000 without overflow."""
    s = make("dynamic", sizes=EQUAL, names=None, cfg_kw={
        "dynamic_interval": 1, "dynamic_window": 1, "dynamic_floor": 0.0, "dynamic_tau": 1e-3})
    s.update([1.0, 1.0, 1.0], step=1)
    s.update([1.0, 0.5, 0.25], step=2)
    w = np.exp((np.array([1.0, 0.5, 0.25]) - 1.0) / 1e-3)
    np.testing.assert_allclose(s.probabilities, w / w.sum(), rtol=1e-12)


def test_history_keeps_the_last_1000_reweightings():
    b = _balancer([1, 1], dynamic_interval=1, dynamic_window=1)
    for step in range(1, 1006):
        b.observe([1.0, 1.0], step)
    assert len(b.history) == 1000
    assert b.history[0]["step"] == 6 and b.history[-1]["step"] == 1005


def test_zero_weight_task_has_only_the_floor_and_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = make("dynamic", sizes=EQUAL, names=None, task_weights=[0.0, 1.0, 1.0],
                 cfg_kw={"dynamic_interval": 1, "dynamic_window": 1})
        s.update([1.0, 1.0, 1.0], step=1)
    np.testing.assert_allclose(s.probabilities, [0.05 / 3, 0.95 / 2 + 0.05 / 3, 0.95 / 2 + 0.05 / 3], rtol=1e-12)


def test_balancer_state_round_trip_is_exact():
    kw = {"dynamic_interval": 3, "dynamic_window": 2}
    a = make("dynamic", cfg_kw=kw)
    for step in range(7):
        a.update(loss_feed(step, 4), step=step + 1)
    b = make("dynamic", cfg_kw=kw)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict()
    assert all(len(h) == 4 for h in b.state_dict()["dynamic"]["losses"])


def test_malformed_dynamic_state_is_rejected():
    good = make("dynamic").state_dict()
    for key, value in [("conflict", ["x"] * 4), ("ratios", ["x"] * 4), ("probabilities", ["x"] * 4), ("losses", 5)]:
        state = json.loads(json.dumps(good))
        state["dynamic"][key] = value
        with pytest.raises(SamplerError, match=r"^sampler state 'dynamic' is malformed \(.+\): "
                                               r"pass the dict from state_dict\(\)$"):
            make("dynamic").load_state_dict(state)
    for key, value in [("losses", [[]] * 3), ("conflict", [0.0] * 3), ("ratios", [1.0] * 3),
                       ("probabilities", [0.25] * 3)]:
        state = json.loads(json.dumps(good))
        state["dynamic"][key] = value
        with pytest.raises(SamplerError, match=r"^sampler state 'dynamic' is for a different number of tasks than 4$"):
            make("dynamic").load_state_dict(state)
    state = json.loads(json.dumps(good))
    state["dynamic"] = None
    with pytest.raises(SamplerError, match=r"^sampler state has no 'dynamic' section: "
                                           r"it was saved by a non-dynamic sampler$"):
        make("dynamic").load_state_dict(state)
