"""Ranks share one global draw: no example repeats across ranks within a task epoch."""
from __future__ import annotations

import numpy as np
import pytest

from .conftest import ALL, SIZES, loss_feed, make


def _global_sequence(strategy, world, composition, steps, bs=5, seed=3):
    ranks = [make(strategy, batch_size=bs, world_size=world, rank=r, seed=seed,
                  cfg_kw={"batch_composition": composition}) for r in range(world)]
    seq = []
    for step in range(steps):
        for s in ranks:  # global slot order = rank order
            seq.extend(s.next_batch())
        for s in ranks:
            s.update(loss_feed(step, 4), step=step + 1)
    return seq, ranks


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("composition", ["mixed", "homogeneous"])
def test_each_task_epoch_is_a_permutation_across_ranks(strategy, world, composition):
    seq, ranks = _global_sequence(strategy, world, composition, steps=120)
    per_task = [[i for t, i in seq if t == task] for task in range(4)]
    epochs_done = 0
    for task, idx in enumerate(per_task):
        n = SIZES[task]
        full = len(idx) // n
        for e in range(full):  # every complete epoch holds each example exactly once
            assert sorted(idx[e * n:(e + 1) * n]) == list(range(n))
        tail = idx[full * n:]
        assert len(set(tail)) == len(tail)  # the running epoch has no repeats either
        epochs_done += full
        assert ranks[0].epochs[task] == full
        assert ranks[0].examples_seen[task] == len(idx)
    assert epochs_done >= 4  # the check crossed epoch boundaries


def test_ranks_agree_on_global_state_and_disjoint_slices():
    # tasks far larger than the 30 * 15 slots drawn: no epoch ends, so no example may appear twice
    # anywhere, and in particular no two ranks may hold the same example
    sizes = [4000, 1200, 3000, 750]
    ranks = [make("temperature", sizes=sizes, batch_size=5, world_size=3, rank=r, seed=3) for r in range(3)]
    held = [set() for _ in ranks]
    for step in range(30):
        slices = [s.next_batch() for s in ranks]
        for r, b in enumerate(slices):
            assert len(b) == 5 and len(set(b)) == 5
            held[r].update(b)
        for s in ranks:
            s.update(loss_feed(step, 4), step=step + 1)
    assert all(len(h) == 30 * 5 for h in held)                  # no rank repeats itself across steps
    for a in range(3):
        for b in range(a + 1, 3):
            assert held[a].isdisjoint(held[b]), (a, b)
    assert len({r.step for r in ranks}) == 1
    assert all(r.epochs == ranks[0].epochs for r in ranks)
    for r in ranks[1:]:
        np.testing.assert_array_equal(ranks[0].examples_seen, r.examples_seen)
        np.testing.assert_array_equal(ranks[0].probabilities, r.probabilities)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("strategy", ALL)
def test_rank_slices_are_the_single_process_global_batch(strategy, world):
    """The module's contract: each step draws one global batch of world_size * batch_size slots and
    rank r keeps slots [r * batch_size, (r + 1) * batch_size). So the ranks' slices, concatenated in
    rank order, equal what one process with the global batch size draws (mixed batches)."""
    ranks = [make(strategy, batch_size=4, world_size=world, rank=r, seed=11) for r in range(world)]
    single = make(strategy, batch_size=4 * world, world_size=1, rank=0, seed=11)
    for step in range(300):
        union = [slot for s in ranks for slot in s.next_batch()]
        assert union == single.next_batch(), step
        for s in ranks + [single]:
            s.update(loss_feed(step, 4), step=step + 1)
    assert list(single.epochs) == list(ranks[0].epochs) and sum(single.epochs) >= 4  # crossed epoch boundaries


@pytest.mark.parametrize("strategy", ["proportional", "uniform", "round_robin", "dynamic"])
def test_homogeneous_batches_are_single_task(strategy):
    # sizes are multiples of the batch, so no micro-batch straddles an epoch boundary and the
    # examples inside one micro-batch are distinct as well
    ranks = [make(strategy, sizes=[36, 120, 300, 72], batch_size=6, world_size=2, rank=r,
                  cfg_kw={"batch_composition": "homogeneous"}) for r in range(2)]
    seen = set()
    for _ in range(300):
        for s in ranks:
            b = s.next_batch()
            assert len(b) == 6 and len({t for t, _ in b}) == 1
            assert len({i for _, i in b}) == 6
            seen.add(b[0][0])
    assert seen == {0, 1, 2, 3}


def test_mixed_batches_mix_tasks_and_have_batch_size():
    s = make("uniform", batch_size=8)
    batches = [s.next_batch() for _ in range(50)]
    assert all(len(b) == 8 for b in batches)
    assert max(len({t for t, _ in b}) for b in batches) >= 3


def test_seed_changes_the_draw_and_same_seed_repeats_it():
    a, b, c = make("uniform", seed=1), make("uniform", seed=1), make("uniform", seed=2)
    sa = [a.next_batch() for _ in range(20)]
    assert sa == [b.next_batch() for _ in range(20)]
    assert sa != [c.next_batch() for _ in range(20)]


def test_each_epoch_is_reshuffled():
    s = make("uniform", sizes=[20, 20], names=None, batch_size=10)
    seq = [b for _ in range(40) for b in s.next_batch()]
    task0 = [i for t, i in seq if t == 0]
    epochs = [tuple(task0[e * 20:(e + 1) * 20]) for e in range(len(task0) // 20)]
    assert len(epochs) >= 5 and len(set(epochs)) == len(epochs)
