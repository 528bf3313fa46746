"""Exact values, defaults, boundaries and error messages of rlora.compare.stats and .bootstrap (each one a
change a reader would not see in the interval tests of test_stats.py; `make mutate` found them untested)."""
import re

import numpy as np
import pytest

import rlora.compare.bootstrap as engine
from rlora.compare import CompareError, arm_summary, paired_difference, paired_differences, seeds_needed
from rlora.compare.stats import check_bootstrap_args

from .grid import arm, cell


def small_arms(seeds=(0, 1, 2), rows=40):
    rng = np.random.default_rng(21)
    a = arm("x", "p", {s: {"qa": rng.integers(0, 2, rows), "nli": rng.integers(0, 2, rows)} for s in seeds})
    b = arm("y", "p", {s: {"qa": rng.integers(0, 2, rows), "nli": rng.integers(0, 2, rows)} for s in seeds})
    return a, b


# ---------------------------------------------------------------------------------------- arm_summary
def test_arm_summary_takes_the_mean_over_seeds_per_task():
    """3 seeds x 2 tasks (not square, not symmetric): acc_t is the column mean of the [S, T] per-seed table.

    per seed (qa, nli): seed 0 (1.0, 0.25), seed 1 (0.5, 0.0), seed 2 (0.75, 0.5)."""
    cells = [cell("lora", "p", 0, {"qa": [1, 1, 1, 1], "nli": [1, 0, 0, 0]}, wall_s=None),
             cell("lora", "p", 1, {"qa": [1, 1, 0, 0], "nli": [0, 0, 0, 0]}, wall_s=None),
             cell("lora", "p", 2, {"qa": [1, 1, 1, 0], "nli": [1, 1, 0, 0]}, wall_s=None)]
    s = arm_summary(cells)
    assert (s["method"], s["sampler"]) == ("lora", "p")
    assert s["tasks"]["qa"]["acc"] == pytest.approx(0.75) and s["tasks"]["nli"]["acc"] == pytest.approx(0.25)
    assert s["mean"] == pytest.approx(0.5)
    assert s["mean_sd_seeds"] == pytest.approx(np.std([0.625, 0.25, 0.625], ddof=1))
    assert s["wall_s"] is None                       # no cell reports a wall time


def test_arm_summary_of_one_seed_has_no_seed_sd():
    s = arm_summary([cell("hydra", "dyn", 4, {"qa": [1, 0, 1], "nli": [0, 0, 1]}, wall_s=3.0, params={"r": 4})])
    assert (s["method"], s["sampler"], s["seeds"], s["n_seeds"]) == ("hydra", "dyn", [4], 1)
    assert s["tasks"]["qa"] == {"acc": pytest.approx(2 / 3), "sd_seeds": None, "n_rows": 3}
    assert s["mean_sd_seeds"] is None and s["wall_s"] == 3.0 and s["params"] == {"r": 4}


def test_arm_summary_errors_name_the_argument_and_the_fix():
    with pytest.raises(CompareError, match="^arm must be a non-empty list"):
        arm_summary([])
    mixed = [cell("lora", "p", 0, {"qa": [1]}), cell("hydra", "p", 1, {"qa": [0]})]
    with pytest.raises(CompareError, match=re.escape("pass the cells of one (method, sampler)")):
        arm_summary(mixed)


# ---------------------------------------------------------------------------------------- paired_differences
def test_defaults_are_2000_resamples_seed_0_and_95_percent():
    a, b = small_arms()
    explicit = paired_difference(a, b, "mean", n_boot=2000, seed=0, level=0.95)
    assert paired_difference(a, b) == explicit
    assert (explicit["n_boot"], explicit["rng_seed"], explicit["level"]) == (2000, 0, 0.95)
    assert paired_differences(a, b) == paired_differences(a, b, None, n_boot=2000, seed=0, level=0.95)


def test_result_fields_and_the_half_width():
    a, b = small_arms()
    out = paired_differences(a, b, ["nli", "mean"], n_boot=300, seed=3, level=0.8)
    assert set(out["results"]) == {"nli", "mean"}                   # only the statistics asked for
    assert (out["n_boot"], out["level"], out["rng_seed"]) == (300, 0.8, 3)
    for name, r in out["results"].items():
        assert r["statistic"] == name
        assert r["half_width"] == (r["hi"] - r["lo"]) / 2
    # the level reaches the quantiles: an 80 % interval is inside the 95 % one from the same draws
    one = paired_difference(a, b, "mean", n_boot=300, seed=3, level=0.8)
    wide = paired_difference(a, b, "mean", n_boot=300, seed=3, level=0.95)
    assert one["level"] == 0.8 and (one["lo"], one["hi"]) == (out["results"]["mean"]["lo"], out["results"]["mean"]["hi"])
    assert wide["lo"] < one["lo"] and one["hi"] < wide["hi"]


def test_input_errors_name_the_argument():
    a, b = small_arms()
    with pytest.raises(CompareError, match="^cells_a must be a non-empty list"):
        paired_differences([], b)
    with pytest.raises(CompareError, match="^cells_b must be a non-empty list"):
        paired_differences(a, [])
    short = arm("y", "p", {s: {"qa": [1, 0], "nli": [0, 1]} for s in (0, 1, 2)})
    with pytest.raises(CompareError, match="^cells_b: y/p/seed 0 has 2 rows"):
        paired_differences(a, short)
    with pytest.raises(CompareError, match="^unknown statistic 'bogus': use 'mean', 'worst' or one of the tasks"):
        paired_differences(a, b, ["bogus"])
    with pytest.raises(CompareError, match="share no seed: run both arms with the same seeds$"):
        paired_differences(a[:1], b[1:])


@pytest.mark.parametrize("side", ["cells_a", "cells_b"])
def test_one_seed_twice_in_an_arm_is_an_error(side):
    """Two cells of seed 0 from different arms (so check_cells lets them through) passed as one arm."""
    a, b = small_arms()
    twice = a + [dict(a[0], method="other")]
    args = (twice, b) if side == "cells_a" else (b, twice)
    with pytest.raises(CompareError, match=f"^{side} holds seed 0 twice: pass the cells of one arm, one per seed$"):
        paired_differences(*args)


# ---------------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("n_boot, seed, level", [(1, 0, 0.5), (7, 0, 1e-9), (7, 123, 0.999999)])
def test_bootstrap_args_at_the_boundaries_are_accepted(n_boot, seed, level):
    check_bootstrap_args(n_boot, seed, level)


@pytest.mark.parametrize("n_boot, seed, level, message", [
    (0, 0, 0.95, "n_boot must be a positive integer, got 0"),
    (2.5, 0, 0.95, "n_boot must be a positive integer, got 2.5"),
    (True, 0, 0.95, "n_boot must be a positive integer, got True"),
    (10, -1, 0.95, "seed must be an integer >= 0, got -1"),
    (10, 1.5, 0.95, "seed must be an integer >= 0, got 1.5"),
    (10, True, 0.95, "seed must be an integer >= 0, got True"),
    (10, 0, 0, "level must be a fraction in (0, 1) such as 0.95, got 0"),
    (10, 0, 1, "level must be a fraction in (0, 1) such as 0.95, got 1"),
    (10, 0, 1.5, "level must be a fraction in (0, 1) such as 0.95, got 1.5"),
    (10, 0, "0.9", "level must be a fraction in (0, 1) such as 0.95, got '0.9'"),
])
def test_bad_bootstrap_args(n_boot, seed, level, message):
    with pytest.raises(CompareError, match=f"^{re.escape(message)}$"):
        check_bootstrap_args(n_boot, seed, level)


def test_an_unknown_statistic_is_named_in_the_error_of_paired_difference():
    a, b = small_arms(seeds=(0,), rows=4)
    message = "unknown statistic 'best': use 'mean', 'worst' or one of the tasks ['qa', 'nli']"
    with pytest.raises(CompareError, match=f"^{re.escape(message)}$"):
        paired_difference(a, b, "best", n_boot=5)


def test_seeds_needed_boundaries_and_messages():
    assert seeds_needed(0.02, 1) == 4                     # one seed is a valid n (1 * 2^2)
    for kwargs, message in [(dict(half_width=0.1, n_seeds=True), "n_seeds must be a positive integer, got True"),
                            (dict(half_width=0.1, n_seeds=2.0), "n_seeds must be a positive integer, got 2.0"),
                            (dict(half_width=-0.1, n_seeds=3), "half_width must be a finite number >= 0, got -0.1"),
                            (dict(half_width=0.1, n_seeds=3, resolve=0.0), "resolve must be a finite number > 0, got 0.0")]:
        with pytest.raises(CompareError, match=f"^{re.escape(message)}$"):
            seeds_needed(**kwargs)


# ---------------------------------------------------------------------------------------- bootstrap engine
def test_two_seeds_are_resampled():
    """Seed 0 right on every row, seed 1 wrong on every row: rows add no noise, so every replicate is the
    share of seed-0 draws among 2 draws: 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4."""
    x = [np.array([[1.0] * 6, [0.0] * 6])]
    acc = engine.bootstrap_accuracies(x, x, 4000, np.random.default_rng(0))[0, :, 0]
    values, counts = np.unique(acc, return_counts=True)
    assert values.tolist() == [0.0, 0.5, 1.0]
    assert counts / acc.size == pytest.approx([0.25, 0.5, 0.25], abs=0.03)    # 4 binomial sds at B = 4000
