"""state_dict / load_state_dict give an exact continuation for every strategy."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rlora.sampler import SamplerError

from .conftest import ALL, loss_feed, make


def _run(sampler, start, stop, feed):
    out = []
    for step in range(start, stop):
        out.append(sampler.next_batch())
        if feed:
            sampler.update(loss_feed(step, 4), step=step + 1)
    return out


@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("composition", ["mixed", "homogeneous"])
def test_resume_at_random_steps_reproduces_the_rest(strategy, composition, rng):
    kw = dict(batch_size=5, world_size=2, rank=1, seed=5, cfg_kw={
        "batch_composition": composition, "dynamic_interval": 3, "dynamic_window": 2})
    total = 700  # crosses block (256-step) boundaries and several epochs
    reference = _run(make(strategy, **kw), 0, total, feed=True)
    cut_points = sorted(set(rng.integers(1, total, size=3).tolist()) | {256, 513})
    for cut in cut_points:
        first = make(strategy, **kw)
        head = _run(first, 0, cut, feed=True)
        state = json.loads(json.dumps(first.state_dict()))  # survives JSON
        resumed = make(strategy, **kw)
        resumed.load_state_dict(state)
        assert resumed.step == cut and resumed.epochs == first.epochs
        np.testing.assert_array_equal(resumed.probabilities, first.probabilities)
        tail = _run(resumed, cut, total, feed=True)
        assert head + tail == reference, f"diverged after resuming at step {cut}"


def test_dynamic_state_carries_history_and_weights():
    kw = dict(batch_size=4, cfg_kw={"dynamic_interval": 2, "dynamic_window": 2})
    a = make("dynamic", **kw)
    _run(a, 0, 40, feed=True)
    b = make("dynamic", **kw)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.history == a.history and len(a.history) > 10
    np.testing.assert_array_equal(b.loss_ratios, a.loss_ratios)
    # the state stays small: no permutations inside
    assert len(json.dumps(a.state_dict())) < 8000


def test_state_is_small_for_large_tasks():
    s = make("proportional", sizes=[10**6, 2 * 10**6, 5, 7])
    s.next_batch()
    assert len(json.dumps(s.state_dict())) < 2000


def test_resume_after_a_budget_keeps_the_budget():
    a = make("uniform", max_steps=10)
    list(a)
    b = make("uniform", max_steps=10)
    b.load_state_dict(a.state_dict())
    assert b.finished and list(b) == []


def test_mismatched_state_is_rejected():
    state = make("uniform", world_size=2).state_dict()
    with pytest.raises(SamplerError, match=r"^sampler state was saved with world_size=2, this sampler has world_size=4: "
                                           r"resume with the same setting or start a fresh sampler$"):
        make("uniform", world_size=4).load_state_dict(state)
    with pytest.raises(SamplerError, match=r"saved with config=.*this sampler has config="):
        make("proportional").load_state_dict(make("uniform").state_dict())
    with pytest.raises(SamplerError, match=r"^sampler state is missing 'cursors': pass the dict returned by state_dict\(\)$"):
        make("uniform").load_state_dict({k: v for k, v in state.items() if k != "cursors"})
    bad = make("uniform").state_dict()
    bad["cursors"] = [10**6, 0, 0, 0]
    with pytest.raises(SamplerError, match="epochs/cursors out of range"):
        make("uniform").load_state_dict(bad)
    with pytest.raises(SamplerError, match="must be a dict from state_dict"):
        make("uniform").load_state_dict([1, 2])
