"""Arm accuracies, paired bootstrap differences, verdicts and the seed-count helper."""
import math
import time
from statistics import NormalDist

import numpy as np
import pytest

from rlora.compare import CompareError, arm_summary, paired_difference, paired_differences, seeds_needed, verdict

from .grid import arm, cell, paired_vector


def test_ci_matches_the_analytic_normal_interval_for_one_seed_and_task():
    """One seed, one task, n = 400 rows whose paired difference a - b is 60 x (+1), 20 x (-1), 320 x 0.

    The bootstrap replicate is then the mean of n rows drawn from that vector, so its distribution is
    close to normal with sd = sd(d) / sqrt(n) and the percentile interval should be
    mean(d) +- 1.96 sd(d) / sqrt(n). Tolerance on each end, in units of se = sd(d, ddof=1) / sqrt(n):
      * Monte-Carlo error of a 2.5 % quantile from B replicates: sqrt(p (1 - p) / B) / phi(1.96) se
        (0.019 se at B = 20000), allowed 4 times;
      * the replicated mean lives on a grid of step 1 / n;
      * ddof: the bootstrap uses the plug-in sd (ddof 0): 1.96 se (1 - sqrt((n - 1) / n));
      * skewness g of d shifts a percentile end by about g / (6 sqrt(n)) (z^2 - 1) se (Edgeworth).
    """
    n, n_boot = 400, 20000
    a, b = paired_vector(60, 20, 100, n, np.random.default_rng(0))
    d = (a - b).astype(float)
    res = paired_difference(arm("x", "p", {0: {"t": a}}), arm("y", "p", {0: {"t": b}}), "mean", n_boot=n_boot)

    assert res["diff"] == a.mean() - b.mean()                       # the exact observed difference
    se = d.std(ddof=1) / math.sqrt(n)
    z = NormalDist().inv_cdf(0.975)
    mc = math.sqrt(0.025 * 0.975 / n_boot) / NormalDist().pdf(z)
    skew = abs(((d - d.mean()) ** 3).mean() / d.std() ** 3)
    tol = 4 * mc * se + 1 / n + z * se * (1 - math.sqrt((n - 1) / n)) + skew / (6 * math.sqrt(n)) * (z ** 2 - 1) * se
    assert tol < 0.25 * se                                          # the check is still sharp
    assert res["lo"] == pytest.approx(d.mean() - z * se, abs=tol)
    assert res["hi"] == pytest.approx(d.mean() + z * se, abs=tol)
    assert (res["lo"] + res["hi"]) / 2 == pytest.approx(res["diff"], abs=tol)
    assert res["verdict"] == "better" and res["seeds_resampled"] is False and res["n_seeds"] == 1


def test_identical_arms_give_exactly_zero():
    rng = np.random.default_rng(1)
    scores = {s: {t: rng.integers(0, 2, 150) for t in ("qa", "nli")} for s in range(4)}
    out = paired_differences(arm("x", "p", scores), arm("y", "p", scores), n_boot=500)
    assert set(out["results"]) == {"mean", "worst", "qa", "nli"}
    for r in out["results"].values():
        assert (r["diff"], r["lo"], r["hi"]) == (0.0, 0.0, 0.0)
        assert r["verdict"] == "no detectable difference"


def test_an_arm_better_on_every_row_is_better_and_the_reverse_is_worse():
    rng = np.random.default_rng(2)
    base = {s: {t: rng.integers(0, 2, 200) for t in ("qa", "nli", "sum")} for s in range(3)}
    # a >= b on every row; a fixes 10 % of b's wrong rows in every seed and task
    better = {s: {t: np.where((v == 0) & (rng.random(200) < 0.2), 1, v) for t, v in tasks.items()}
              for s, tasks in base.items()}
    cells_a, cells_b = arm("x", "p", better), arm("y", "p", base)
    for r in paired_differences(cells_a, cells_b, n_boot=1000)["results"].values():
        assert r["lo"] > 0 and r["verdict"] == "better", r
    for r in paired_differences(cells_b, cells_a, n_boot=1000)["results"].values():
        assert r["hi"] < 0 and r["verdict"] == "worse", r


def test_pairing_narrows_the_interval():
    """Two arms right on the same rows except for 8 of 200 (4 each way): the paired interval is far
    narrower than the unpaired normal interval of two independent 50 % accuracies, and breaking the
    row alignment (same accuracies, rows shuffled) widens it to about the unpaired width."""
    n = 200
    a, b = paired_vector(4, 4, 96, n, np.random.default_rng(3))
    paired = paired_difference(arm("x", "p", {0: {"t": a}}), arm("y", "p", {0: {"t": b}}), n_boot=4000)
    unpaired_width = 2 * 1.96 * math.sqrt(a.mean() * (1 - a.mean()) / n + b.mean() * (1 - b.mean()) / n)
    paired_width = paired["hi"] - paired["lo"]
    assert paired_width < 0.4 * unpaired_width

    shuffled = np.random.default_rng(4).permutation(b)
    broken = paired_difference(arm("x", "p", {0: {"t": a}}), arm("y", "p", {0: {"t": shuffled}}), n_boot=4000)
    assert broken["diff"] == paired["diff"]
    assert broken["hi"] - broken["lo"] > 2.5 * paired_width
    assert broken["hi"] - broken["lo"] == pytest.approx(unpaired_width, rel=0.15)


def test_seed_to_seed_variance_widens_the_interval():
    """Same pooled rows (150 x +1, 50 x -1 over 5 seeds x 200 rows), once spread evenly over the seeds
    and once unevenly: the per-seed differences then range from -0.15 to +0.30, and the interval,
    which resamples seeds, is much wider."""
    rng = np.random.default_rng(5)

    def cells_for(plus_minus):
        pairs = {s: paired_vector(p, m, 60, 200, rng) for s, (p, m) in enumerate(plus_minus)}
        return (arm("x", "p", {s: {"t": a} for s, (a, _) in pairs.items()}),
                arm("y", "p", {s: {"t": b} for s, (_, b) in pairs.items()}))

    steady = paired_difference(*cells_for([(30, 10)] * 5), n_boot=2000)
    varying = paired_difference(*cells_for([(60, 0), (0, 30), (50, 0), (0, 20), (40, 0)]), n_boot=2000)
    assert steady["diff"] == pytest.approx(0.1) and varying["diff"] == pytest.approx(0.1)
    assert steady["seeds_resampled"] and varying["seeds_resampled"]
    assert varying["hi"] - varying["lo"] > 2 * (steady["hi"] - steady["lo"])
    assert steady["verdict"] == "better" and varying["verdict"] == "no detectable difference"


def test_deterministic_given_the_rng_seed():
    rng = np.random.default_rng(6)
    a = arm("x", "p", {s: {"t": rng.integers(0, 2, 100), "u": rng.integers(0, 2, 100)} for s in range(3)})
    b = arm("y", "p", {s: {"t": rng.integers(0, 2, 100), "u": rng.integers(0, 2, 100)} for s in range(3)})
    first = paired_differences(a, b, n_boot=300, seed=11)
    assert paired_differences(a, b, n_boot=300, seed=11) == first
    other = paired_differences(a, b, n_boot=300, seed=12)["results"]["mean"]
    assert (other["lo"], other["hi"]) != (first["results"]["mean"]["lo"], first["results"]["mean"]["hi"])
    # one statistic alone comes from the same draws as all of them together
    alone = paired_difference(a, b, "worst", n_boot=300, seed=11)
    assert (alone["lo"], alone["hi"]) == (first["results"]["worst"]["lo"], first["results"]["worst"]["hi"])


def test_worst_and_task_statistics_are_the_observed_values():
    # arm a: qa 0.8, nli 0.4 (worst nli); arm b: qa 0.3, nli 0.6 (worst qa); 2 seeds with equal scores
    a = {s: {"qa": [1] * 8 + [0] * 2, "nli": [1] * 4 + [0] * 6} for s in (0, 1)}
    b = {s: {"qa": [1] * 3 + [0] * 7, "nli": [1] * 6 + [0] * 4} for s in (0, 1)}
    out = paired_differences(arm("x", "p", a), arm("y", "p", b), n_boot=200)["results"]
    assert (out["worst"]["a"], out["worst"]["b"]) == pytest.approx((0.4, 0.3))
    assert out["worst"]["diff"] == pytest.approx(0.1)
    assert out["mean"]["diff"] == pytest.approx(0.6 - 0.45)
    assert out["qa"]["diff"] == pytest.approx(0.5) and out["nli"]["diff"] == pytest.approx(-0.2)


def test_one_seed_is_flagged_and_has_no_seed_projection():
    rng = np.random.default_rng(7)
    one = paired_difference(arm("x", "p", {0: {"t": rng.integers(0, 2, 50)}}),
                            arm("y", "p", {0: {"t": rng.integers(0, 2, 50)}}), n_boot=200)
    assert one["seeds_resampled"] is False and one["seeds_to_resolve_1pt"] is None
    two = paired_difference(arm("x", "p", {s: {"t": rng.integers(0, 2, 50)} for s in (0, 1)}),
                            arm("y", "p", {s: {"t": rng.integers(0, 2, 50)} for s in (0, 1)}), n_boot=200)
    assert two["seeds_resampled"] is True
    assert two["seeds_to_resolve_1pt"] == seeds_needed(two["half_width"], 2)


def test_arms_are_paired_on_common_seeds():
    rng = np.random.default_rng(8)
    a = arm("x", "p", {s: {"t": rng.integers(0, 2, 40)} for s in (0, 1, 2)})
    b = arm("y", "p", {s: {"t": rng.integers(0, 2, 40)} for s in (1, 2, 3)})
    res = paired_difference(a, b, n_boot=100)
    assert res["seeds"] == [1, 2] and res["dropped_seeds"] == {"a": [0], "b": [3]}
    expected = np.mean([np.mean(c["correct"]["t"]) for c in a[1:]]) - np.mean([np.mean(c["correct"]["t"]) for c in b[:2]])
    assert res["diff"] == pytest.approx(expected)
    with pytest.raises(CompareError, match="share no seed"):
        paired_difference(a[:1], b[2:], n_boot=100)


def test_verdict_words():
    assert verdict(0.001, 0.02) == "better"
    assert verdict(-0.02, -0.001) == "worse"
    assert verdict(0.0, 0.02) == verdict(-0.01, 0.0) == verdict(0.0, 0.0) == "no detectable difference"


def test_seeds_needed_scales_with_the_square_of_the_half_width():
    assert seeds_needed(0.02, 5) == 20            # 5 * (2 / 1)^2
    assert seeds_needed(0.01, 5) == 5
    assert seeds_needed(0.011, 4) == 5            # ceil(4 * 1.21)
    assert seeds_needed(0.005, 8) == 2
    assert seeds_needed(0.0, 3) == 1
    assert seeds_needed(3.0, 5, resolve=1.0) == 45  # in points
    for bad in [dict(half_width=-1, n_seeds=3), dict(half_width=0.1, n_seeds=0),
                dict(half_width=0.1, n_seeds=3, resolve=0)]:
        with pytest.raises(CompareError):
            seeds_needed(**bad)


def test_arm_summary():
    cells = [cell("lora", "p", 1, {"qa": [1, 1, 0, 0], "nli": [1, 0, 0, 0]}, wall_s=10.0, params={"r": 8}),
             cell("lora", "p", 0, {"qa": [1, 1, 1, 0], "nli": [1, 1, 0, 0]}, wall_s=20.0)]
    s = arm_summary(cells)
    assert s["seeds"] == [0, 1] and s["n_seeds"] == 2
    assert s["tasks"]["qa"]["acc"] == pytest.approx(0.625) and s["tasks"]["nli"]["acc"] == pytest.approx(0.375)
    assert s["tasks"]["qa"]["sd_seeds"] == pytest.approx(np.std([0.75, 0.5], ddof=1))
    assert s["tasks"]["qa"]["n_rows"] == 4
    assert s["mean"] == pytest.approx(0.5) and s["worst"] == pytest.approx(0.375) and s["worst_task"] == "nli"
    assert s["wall_s"] == 15.0 and s["params"] is None       # params of the first seed (0) after sorting
    with pytest.raises(CompareError, match="pass the cells of one"):
        arm_summary(cells + [cell("hydra", "p", 0, {"qa": [1, 1, 0, 0], "nli": [1, 0, 0, 0]})])


def test_the_realistic_grid_size_is_fast():
    """6 tasks x 200 rows x 5 seeds x 2000 resamples: well under a few seconds (about 0.1 s here)."""
    rng = np.random.default_rng(9)
    tasks = [f"t{k}" for k in range(6)]
    a = arm("x", "p", {s: {t: rng.integers(0, 2, 200) for t in tasks} for s in range(5)})
    b = arm("y", "p", {s: {t: rng.integers(0, 2, 200) for t in tasks} for s in range(5)})
    start = time.perf_counter()
    out = paired_differences(a, b, n_boot=2000)
    assert time.perf_counter() - start < 3.0
    assert len(out["results"]) == 8
