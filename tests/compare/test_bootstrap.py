"""The count-based draw of the bootstrap engine against plain index resampling, and its crossed rows."""
import numpy as np
import pytest

import rlora.compare.bootstrap as engine

from .grid import paired_vector


def index_resampling(xa, xb, n_boot, rng):
    """Reference, written from the module docstring with plain indices: per replicate draw S seeds, and per task
    n_t row indices once for all seeds and both arms; the accuracy is the drawn rows' mean of seed-mean scores
    plus the drawn seeds' mean deviation from the observed accuracy."""
    num_seeds = xa[0].shape[0]
    acc = np.empty((2, n_boot, len(xa)))
    for b in range(n_boot):
        seeds = rng.integers(0, num_seeds, num_seeds)
        for t, (a, c) in enumerate(zip(xa, xb)):
            rows = rng.integers(0, a.shape[1], a.shape[1])
            for arm, x in enumerate((a, c)):
                acc[arm, b, t] = x.mean(axis=0)[rows].mean() + (x.mean(axis=1)[seeds] - x.mean()).mean()
    return acc


def scores(rng):
    """3 seeds, two tasks: 0/1 scores (50 rows, correlated arms) and partial-credit scores (80 rows)."""
    a0 = (rng.random((3, 50)) < 0.6).astype(float)
    b0 = np.where(rng.random((3, 50)) < 0.8, a0, 1 - a0)
    a1 = rng.random((3, 80))
    b1 = np.clip(a1 + rng.normal(0, 0.1, (3, 80)), 0, 1)
    return [a0, a1], [b0, b1]


def test_counts_match_index_resampling_in_distribution():
    """Mean and sd of the replicated accuracies and differences agree with the reference within
    Monte-Carlo error: with B = 3000 replicates each, the sd of a sample mean is sd / sqrt(B) and the
    relative sd of a sample sd about 1 / sqrt(2 B) = 1.3 %; 5 combined sds are allowed."""
    rng = np.random.default_rng(0)
    xa, xb = scores(rng)
    n_boot = 3000
    fast = engine.bootstrap_accuracies(xa, xb, n_boot, np.random.default_rng(1))
    slow = index_resampling(xa, xb, n_boot, np.random.default_rng(2))
    assert fast.shape == slow.shape == (2, n_boot, 2)
    for name, f, s in [("a", fast[0], slow[0]), ("b", fast[1], slow[1]), ("a - b", fast[0] - fast[1], slow[0] - slow[1])]:
        sd = s.std(axis=0)
        assert np.all(np.abs(f.mean(axis=0) - s.mean(axis=0)) < 5 * np.sqrt(2) * sd / np.sqrt(n_boot)), name
        assert np.all(np.abs(f.std(axis=0) / sd - 1) < 5 * np.sqrt(2) / np.sqrt(2 * n_boot)), name
    # the replicates centre on the observed accuracy (the bootstrap is unbiased for a mean)
    observed = np.array([[x.mean() for x in xa], [x.mean() for x in xb]])
    assert np.abs(fast.mean(axis=1) - observed).max() < 0.01


def test_a_row_difference_repeated_in_every_seed_is_not_averaged_away():
    """Three seeds with the same scores (every row's a - b persists over seeds): the seeds add nothing, so the
    replicates are those of one seed, rows drawn once. Drawing rows afresh per seed would shrink their sd by
    sqrt(3) (0.58 x); the sd ratio is held to 1 within 5 Monte-Carlo sds at B = 4000 (relative sd 1.1 %)."""
    rng = np.random.default_rng(8)
    a, b = paired_vector(30, 10, 40, 120, rng)
    one = engine.bootstrap_accuracies([a[None] * 1.0], [b[None] * 1.0], 4000, np.random.default_rng(1))
    three = engine.bootstrap_accuracies([np.tile(a, (3, 1)) * 1.0], [np.tile(b, (3, 1)) * 1.0], 4000,
                                        np.random.default_rng(2))
    sd_one, sd_three = (np.std(x[0] - x[1]) for x in (one, three))
    assert abs(sd_three / sd_one - 1) < 5 * np.sqrt(2) / np.sqrt(2 * 4000), (sd_one, sd_three)
    assert sd_one == pytest.approx(np.std(a - b) / np.sqrt(120), rel=0.06)    # the plain row bootstrap of a - b


def test_identical_scores_give_identical_replicates():
    xa, _ = scores(np.random.default_rng(3))
    acc = engine.bootstrap_accuracies(xa, xa, 200, np.random.default_rng(0))
    assert np.array_equal(acc[0], acc[1])


def test_one_seed_resamples_rows_only():
    x = [np.array([[1.0, 0.0, 1.0, 1.0]])]
    acc = engine.bootstrap_accuracies(x, x, 500, np.random.default_rng(0))
    assert set(np.unique(acc[0])) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert acc[0].std() > 0


def test_chunking_does_not_change_the_numbers(monkeypatch):
    """Chunks bound the memory; the multinomial rows are drawn in order, so chunk size is invisible."""
    xa, xb = scores(np.random.default_rng(4))
    whole = engine.bootstrap_accuracies(xa, xb, 1001, np.random.default_rng(5))
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 7)
    chunked = engine.bootstrap_accuracies(xa, xb, 1001, np.random.default_rng(5))
    assert np.array_equal(whole, chunked)


@pytest.mark.parametrize("num_seeds", [1, 4])
def test_accuracies_stay_in_range(num_seeds):
    rng = np.random.default_rng(6)
    x = [rng.integers(0, 2, (num_seeds, 30)).astype(float)]
    acc = engine.bootstrap_accuracies(x, [1 - x[0]], 300, rng)
    assert acc.min() >= 0 and acc.max() <= 1
    assert np.allclose(acc[0] + acc[1], 1.0)      # b = 1 - a row by row, so every replicate sums to 1
