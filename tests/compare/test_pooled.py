"""The pooled difference over data sets (rlora/compare/pooled.py): exact small cases, the per-set lines equal to
each set's own paired bootstrap, Cochran's Q, and the simulated coverage of the pooled 95 % interval.

The simulated suite (``suites``): ``K = 3`` sets with different true macro-mean differences ``d_k = 0.02, 0.05,
0.08`` (so the equal-weight pooled difference is exactly ``D = 0.05``), each set drawn as in
tests/compare/test_coverage.py: ``T = 3`` tasks of ``n = 100`` dev rows, ``S = 3`` seeds, row base accuracy
``q ~ U(0.3, 0.7)``, arm a right when ``u < q + d_k/2 + e^a``, arm b when ``u < q - d_k/2 + e^b`` (the same ``u``:
paired rows), seed effects ``e ~ U(-w, w)`` per arm, seed and task. Measured with this code over 1000 suites
(1000 resamples each): ``w = 0.02`` covers 96.5 % at 1.14 x the exact width (2 x 1.96 x the sd of the observed
pooled difference over the suites); ``w = 0`` 98.3 % at 1.31 x (rows counted twice inside each set, as in the
one-set interval). The test runs 150 suites (about 3 s).
"""
import math

import numpy as np
import pytest

from rlora.compare import CompareError
from rlora.compare.pooled import chi2_sf, heterogeneity, pool_sets, pooled_difference, set_weights
from rlora.compare.report import pooled_forest_plot, pooled_markdown, to_json
from rlora.compare.stats import paired_differences

from .grid import arm, grid

K_DIFFS, S, T, N = (0.02, 0.05, 0.08), 3, 3, 100


def constant_arms(value_a: int, value_b: int, tasks: int, seeds=(0, 1), rows: int = 5):
    """Arms a and b whose every score is ``value_a`` / ``value_b``: the difference is exact in every replicate."""
    scores = lambda v: {s: {f"t{t}": [v] * rows for t in range(tasks)} for s in seeds}  # noqa: E731
    return arm("a", "p", scores(value_a)), arm("b", "p", scores(value_b))


def test_exact_small_case_with_each_weighting():
    """Set x: a always right, b always wrong (d = 1 in every replicate), 3 tasks; set y: a = b (d = 0), 1 task.
    Equal set weights give 0.5, task weights 3/4, explicit {x: 1, y: 3} 1/4, each with a zero-width interval."""
    per = {"x": constant_arms(1, 0, tasks=3), "y": constant_arms(1, 1, tasks=1)}
    for weights, expected in [("sets", 0.5), ("tasks", 0.75), ({"x": 1, "y": 3}, 0.25)]:
        r = pooled_difference(per, weights, n_boot=200, seed=4)
        assert r["diff"] == pytest.approx(expected) and r["lo"] == pytest.approx(expected)
        assert r["hi"] == pytest.approx(expected) and r["verdict"] == "better"
        assert r["a"] == 1.0 and r["b"] == pytest.approx(1 - expected)
    r = pooled_difference(per, n_boot=200, seed=4)
    assert r["weights"] == {"x": 0.5, "y": 0.5} and r["weighting"] == "sets"
    assert r["sets"]["x"]["diff"] == 1.0 and r["sets"]["y"]["diff"] == 0.0 and r["sets"]["x"]["n_tasks"] == 3
    assert r["heterogeneity"]["q"] is None          # zero bootstrap variance: Q is undefined, not infinite


def test_each_set_line_is_that_set_s_own_paired_bootstrap_with_seed_plus_k():
    sets = {f"s{k}": grid({"lora": 0.5, "mtl": 0.52 + 0.02 * k}, samplers=("p",), seed=10 + k) for k in range(3)}
    split = {k: ([c for c in v if c["method"] == "mtl"], [c for c in v if c["method"] == "lora"])
             for k, v in sets.items()}
    r = pooled_difference(split, n_boot=300, seed=7)
    reps = []
    for k, (name, (a, b)) in enumerate(split.items()):
        own = paired_differences(a, b, ["mean"], n_boot=300, seed=7 + k)["results"]["mean"]
        line = r["sets"][name]
        assert (line["diff"], line["lo"], line["hi"], line["rng_seed"]) == (own["diff"], own["lo"], own["hi"], 7 + k)
        reps.append(own["diff"])
    assert r["diff"] == pytest.approx(np.mean(reps))
    assert r["lo"] < r["diff"] < r["hi"]
    # the pooled interval is narrower than the sets' (three independent sets averaged): about 1/sqrt(3)
    widths = [line["hi"] - line["lo"] for line in r["sets"].values()]
    assert r["hi"] - r["lo"] < 0.8 * np.mean(widths)


def test_cochran_q_and_chi_square_tail():
    # chi-square 95 % points: df 1 3.8415, df 2 5.9915, df 3 7.8147, df 4 9.4877
    for x, df in [(3.841458820694124, 1), (5.991464547107979, 2), (7.814727903251178, 3), (9.487729036781154, 4)]:
        assert chi2_sf(x, df) == pytest.approx(0.05, abs=1e-12)
    assert chi2_sf(0.0, 2) == 1.0 and chi2_sf(2.0, 2) == pytest.approx(math.exp(-1))
    h = heterogeneity([0.0, 0.1], [0.0025, 0.0025])
    assert h["ivw_diff"] == pytest.approx(0.05) and h["q"] == pytest.approx(2.0) and h["df"] == 1
    assert h["p"] == pytest.approx(math.erfc(1.0)) and h["i2"] == pytest.approx(0.5)
    assert heterogeneity([0.01], [0.001])["q"] is None


def test_sets_that_disagree_are_flagged():
    per = {"up": constant_arms(1, 0, tasks=2), "down": constant_arms(0, 1, tasks=2)}
    r = pooled_difference(per, n_boot=100)
    assert r["diff"] == 0.0 and r["sets_disagree"]
    assert not pooled_difference({"up": per["up"]}, n_boot=100)["sets_disagree"]


@pytest.mark.parametrize("weights, match", [
    ({"x": 1}, r"weights name the sets \['x'\] but the input has \['x', 'y'\]"),
    ({"x": 1, "y": -1}, "must be finite, >= 0 and not all 0"),
    ("rows", "use 'sets' \\(equal\\), 'tasks'"),
])
def test_bad_weights(weights, match):
    with pytest.raises(CompareError, match=match):
        set_weights({"x": 2, "y": 3}, weights)


def test_pool_sets_report_json_and_plot(tmp_path):
    """pool_sets compares every method with the baseline on the sets that have both; a set without one arm is
    noted and left out of that comparison; the markdown, JSON and plot are written from the summary."""
    sets = {f"s{k}": grid({"lora": 0.5, "mtl": 0.55, "hydra": 0.5}, samplers=("p",), seed=k) for k in range(2)}
    sets["s2"] = grid({"lora": 0.5, "mtl": 0.55}, samplers=("p",), seed=5)
    pooled = pool_sets(sets, "lora", "p", n_boot=200, seed=1)
    assert [c["label"] for c in pooled["comparisons"]] == ["mtl vs lora (p)", "hydra vs lora (p)"]
    assert list(pooled["comparisons"][1]["pooled"]["sets"]) == ["s0", "s1"]
    assert pooled["notes"] == ["hydra vs lora (p): no cells of both arms on ['s2']; pooled over ['s0', 's1'] only"]
    assert pooled["weights"] == pytest.approx({"s0": 1 / 3, "s1": 1 / 3, "s2": 1 / 3})
    mtl = next(a for a in pooled["arms"] if a["method"] == "mtl")
    assert mtl["mean"] == pytest.approx(np.mean(list(mtl["sets"].values())))
    text = pooled_markdown(pooled)
    assert "| mtl vs lora (p) | **pooled** | 1 | 9 |" in text and "stratified hierarchical bootstrap" in text
    assert "| hydra | p | " in text and " – |" in text       # hydra has no s2 column value
    assert to_json(pooled)["comparisons"][0]["pooled"]["method"] == "stratified hierarchical bootstrap"
    png = pooled_forest_plot(pooled, tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(CompareError, match="baseline_method 'x' has no cells"):
        pool_sets(sets, "x")


def suites(count: int, w: float, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        per = {}
        for k, d in enumerate(K_DIFFS):
            q = rng.uniform(0.3, 0.7, (T, N))
            ea, eb = rng.uniform(-w, w, (2, S, T, 1))
            u = rng.random((S, T, N))
            xa, xb = (u < q + d / 2 + ea).astype(int), (u < q - d / 2 + eb).astype(int)
            per[f"set{k}"] = tuple(arm(name, "p", {s: {f"t{t}": x[s, t] for t in range(T)} for s in range(S)})
                                   for name, x in (("a", xa), ("b", xb)))
        yield per


def test_pooled_interval_covers_the_known_pooled_difference():
    """150 simulated suites with seed effects (w = 0.02): 90 to 99 % of the pooled 95 % intervals hold D = 0.05
    (Monte-Carlo sd about 1.7 points at 95 %); the observed pooled differences centre on D."""
    D = float(np.mean(K_DIFFS))
    hits, diffs = 0, []
    for k, per in enumerate(suites(150, 0.02, seed=3)):
        r = pooled_difference(per, n_boot=1000, seed=k)
        hits += r["lo"] <= D <= r["hi"]
        diffs.append(r["diff"])
    assert 0.90 <= hits / 150 <= 0.99, hits / 150
    assert abs(np.mean(diffs) - D) < 0.005
