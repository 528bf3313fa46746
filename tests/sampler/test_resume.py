"""state_dict / load_state_dict give an exact continuation for every strategy."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from rlora.sampler import SamplerError
from rlora.sampler.streams import BLOCK_STEPS, PermutationStore, UniformStream

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


def _load(state, **kw):
    make("uniform", **kw).load_state_dict(state)


def test_malformed_states_name_the_problem():
    good = make("uniform").state_dict()

    def bad(**changes):
        return {**json.loads(json.dumps(good)), **changes}

    cases = [
        ([1, 2], r"^sampler state must be a dict from state_dict\(\), got list$"),
        (bad(version=2), r"^sampler state version 2 is not 1: start a fresh sampler$"),
        (bad(fingerprint=None), r"^sampler state was saved with task_sizes=None, this sampler has "
                                r"task_sizes=\[40, 120, 300, 75\]: resume with the same setting or start a fresh sampler$"),
        (bad(step=-1), r"^sampler state is malformed \(step must be >= 0, got -1\): pass the dict from state_dict\(\)$"),
        (bad(cursors=["a"] * 4), r"^sampler state is malformed \(.+\): pass the dict from state_dict\(\)$"),
        (bad(epochs=["a"] * 4), r"^sampler state is malformed \(.+\): pass the dict from state_dict\(\)$"),
    ]
    # each range check alone
    for changes in [dict(epochs=[0, 0, 0]), dict(cursors=[0, 0, 0]), dict(epochs=[-1, 0, 0, 0]),
                    dict(cursors=[-1, 0, 0, 0]), dict(cursors=[40, 0, 0, 0])]:
        cases.append((bad(**changes), r"^sampler state has epochs/cursors out of range: pass the dict from state_dict\(\)$"))
    for state, pattern in cases:
        with pytest.raises(SamplerError, match=pattern):
            _load(state)
    s = make("uniform")
    s.load_state_dict(bad(epochs=[2, 0, 0, 0], cursors=[39, 0, 0, 0]))  # the last valid cursor
    assert s.examples_seen.tolist() == [119, 0, 0, 0] and s.epochs == [2, 0, 0, 0]


@pytest.mark.parametrize("key, change", [("task_sizes", dict(sizes=[4, 6])), ("task_names", dict(names=["a", "c"])),
                                         ("batch_size", dict(batch_size=3)), ("seed", dict(seed=4)),
                                         ("task_weights", dict(task_weights=[2.0, 1.0]))])
def test_each_setting_of_the_fingerprint_is_checked(key, change):
    base = dict(sizes=[4, 5], names=["a", "b"], batch_size=2, seed=3)
    state = make("uniform", **base).state_dict()
    mine = make("uniform", **{**base, **change})._fingerprint()[key]
    with pytest.raises(SamplerError, match=rf"^sampler state was saved with {key}=.*, this sampler has "
                                           rf"{key}={re.escape(repr(mine))}: resume with the same setting"):
        _load(state, **{**base, **change})


def test_epochs_and_cursors_are_integer_divisions_for_huge_tasks():
    n = 2**60
    state = make("uniform", sizes=[n, 5], names=None).state_dict()
    state["cursors"] = [n - 1, 4]
    s = make("uniform", sizes=[n, 5], names=None)
    s.load_state_dict(state)
    assert s.epoch_of(0) == 0 and s.epochs == [0, 0]
    assert s.state_dict()["epochs"] == [0, 0] and s.state_dict()["cursors"] == [n - 1, 4]


def test_cursors_out_of_step_are_an_internal_error():
    s = make("uniform")
    s._step = 3  # no chunk and no base at step 3
    with pytest.raises(RuntimeError, match=r"^sampler cursors are out of sync with its step$"):
        s.examples_seen


def test_uniform_stream_rows_are_rows_of_the_keyed_block():
    """Step ``s`` reads row ``s % 256`` of ``default_rng([seed, 0, s // 256]).random((256, D))``."""
    st = UniformStream(5, 3)
    block0 = np.random.default_rng([5, 0, 0]).random((BLOCK_STEPS, 3))
    block1 = np.random.default_rng([5, 0, 1]).random((BLOCK_STEPS, 3))
    np.testing.assert_array_equal(st.rows(BLOCK_STEPS + 10, 4), block1[10:14])
    np.testing.assert_array_equal(st.rows(250, 6), block0[250:])
    assert st.block(0) is st.block(0)  # one generator per block, then reused
    with pytest.raises(ValueError, match=r"^rows\(250, 7\) crosses a block boundary$"):
        st.rows(250, 7)


def test_permutation_store_reads_within_and_across_epochs_and_keeps_two_epochs():
    """Epoch ``e`` of task ``t`` is ``default_rng([seed, 1, t, e]).permutation(n_t)``."""
    sizes = [5, 7]
    ps = PermutationStore(9, sizes)

    def ref(t, e):
        return np.random.default_rng([9, 1, t, e]).permutation(sizes[t])

    np.testing.assert_array_equal(ps.take(1, 7 + 2, 3), ref(1, 1)[2:5])  # inside epoch 1
    np.testing.assert_array_equal(ps.take(1, 7 + 5, 2), ref(1, 1)[5:7])  # up to its last example
    np.testing.assert_array_equal(ps.take(1, 2 * 7 + 5, 10), np.concatenate([ref(1, 2)[5:], ref(1, 3), ref(1, 4)[:1]]))
    assert ps.perm(0, 0) is ps.perm(0, 0)  # computed once
    ps.perm(0, 1)
    ps.perm(0, 2)
    assert sorted(ps._cache[0]) == [1, 2]  # the current and the next epoch only


def test_epoch_quota_is_compared_as_integers_for_huge_tasks():
    """One example short of a 2**60-example epoch is not done (a float comparison would round it up)."""
    n = 2**60
    kw = dict(sizes=[n, 5], names=None, num_epochs=1, cfg_kw={"stopping_strategy": "first_exhausted"})
    state = make("uniform", **kw).state_dict()
    state["cursors"] = [n - 1, 0]
    s = make("uniform", **kw)
    s.load_state_dict(state)
    assert not s.finished
