"""The pooled difference over data sets (rlora/compare/pooled.py): exact small cases, the per-set lines equal to
each set's own paired bootstrap, Cochran's Q, and the simulated coverage of the pooled 95 % interval.

The simulated suite (``suites``): ``K = 3`` sets with different true macro-mean differences ``d_k = 0.02, 0.05,
0.08`` (so the equal-weight pooled difference is exactly ``D = 0.05``), each set drawn as in
tests/compare/test_coverage.py: ``T = 3`` tasks of ``n = 100`` dev rows, ``S = 3`` seeds, row base accuracy
``q ~ U(0.3, 0.7)``, arm a right when ``u < q + d_k/2 + e^a``, arm b when ``u < q - d_k/2 + e^b`` (the same ``u``:
paired rows), seed effects ``e ~ U(-w, w)`` per arm, seed and task. Measured with this code over 1000 suites
(1000 resamples each): ``w = 0.02`` covers 97.4 % at 1.15 x the exact width (2 x 1.96 x the sd of the observed
pooled difference over the suites); ``w = 0`` 97.7 % at 1.27 x (rows counted twice inside each set, as in the
one-set interval). The test runs 150 suites (about 3 s).
"""
import math

import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.image import imread

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


def test_a_set_keeps_its_own_seed_when_an_earlier_set_lacks_an_arm():
    """hydra has no cells on s0: its s1 line still bootstraps with seed + 1 (s1's index), as s1's own report."""
    sets = {"s0": grid({"lora": 0.5, "mtl": 0.55}, samplers=("p",), seed=3),
            "s1": grid({"lora": 0.5, "mtl": 0.55, "hydra": 0.6}, samplers=("p",), seed=4)}
    pooled = pool_sets(sets, "lora", "p", n_boot=200, seed=5)
    hydra = next(c for c in pooled["comparisons"] if c["a"]["method"] == "hydra")["pooled"]["sets"]["s1"]
    cells = sets["s1"]
    own = paired_differences([c for c in cells if c["method"] == "hydra"], [c for c in cells if c["method"] == "lora"],
                             ["mean"], n_boot=200, seed=6)["results"]["mean"]
    assert (hydra["diff"], hydra["lo"], hydra["hi"], hydra["rng_seed"]) == (own["diff"], own["lo"], own["hi"], 6)


def test_set_index_keeps_a_set_s_seed_when_a_run_pools_only_some_sets():
    """Pooling s0 and s2 of a three-set suite with set_index {s0: 0, s2: 2}: s2 bootstraps with seed + 2, as in
    the whole suite's pooling (without set_index it would be seed + 1, another interval)."""
    sets = {f"s{k}": grid({"lora": 0.5, "mtl": 0.53 + 0.01 * k}, samplers=("p",), seed=20 + k) for k in range(3)}
    whole = pool_sets(sets, "lora", "p", n_boot=300, seed=9)["comparisons"][0]["pooled"]["sets"]["s2"]
    some = {k: sets[k] for k in ("s0", "s2")}
    kept = pool_sets(some, "lora", "p", n_boot=300, seed=9, set_index={"s0": 0, "s2": 2})
    line = kept["comparisons"][0]["pooled"]["sets"]["s2"]
    assert (line["lo"], line["hi"], line["rng_seed"]) == (whole["lo"], whole["hi"], 11)
    moved = pool_sets(some, "lora", "p", n_boot=300, seed=9)["comparisons"][0]["pooled"]["sets"]["s2"]
    assert moved["rng_seed"] == 10 and (moved["lo"], moved["hi"]) != (whole["lo"], whole["hi"])


def test_pool_sets_with_weights_missing_a_set_is_a_one_line_error():
    sets = {f"s{k}": grid({"lora": 0.5, "mtl": 0.55}, samplers=("p",), seed=k) for k in range(2)}
    with pytest.raises(CompareError) as err:
        pool_sets(sets, "lora", "p", weights={"s0": 1.0}, n_boot=100)
    assert str(err.value) == ("weights name the sets ['s0'] but cells_by_set has ['s0', 's1']: give one weight per set")


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


def forest_rows(pooled, tmp_path):
    """The y of every marker per panel of the pooled forest plot; checks the first panel's tick labels."""
    figures = []
    save = Figure.savefig
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
        pooled_forest_plot(pooled, tmp_path / "rows.png")
    ax0 = figures[0].axes[0]
    assert [t.get_text() for t in ax0.get_yticklabels()] == [*pooled["sets"], "pooled"]
    assert list(ax0.get_yticks()) == list(range(len(pooled["sets"]), -1, -1))
    return [[float(l.get_ydata()[0]) for l in ax.lines if l.get_marker() in ("o", "D")] for ax in figures[0].axes]


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
    assert "| mtl vs lora (p) | **pooled** | 1 | 9 |" in text and "stratified bootstrap" in text
    assert "| hydra | p | " in text and " – |" in text       # hydra has no s2 column value
    assert to_json(pooled)["comparisons"][0]["pooled"]["method"] == "stratified two-level bootstrap"
    png = pooled_forest_plot(pooled, tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # rows by set, not by position: hydra has no s2 row (y = 1 stays empty) and its pooled diamond is at y = 0
    assert forest_rows(pooled, tmp_path) == [[3, 2, 1, 0], [3, 2, 0]]
    # the first comparison without a set (hydra first): labelled ticks for every set, hydra's rows at their sets'
    first = dict(pooled, comparisons=pooled["comparisons"][::-1])
    assert forest_rows(first, tmp_path) == [[3, 2, 0], [3, 2, 1, 0]]
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


def _row(name, weight, seeds, a, b, diff, lo, hi, verdict):
    return {"weight": weight, "n_seeds": seeds, "a": a, "b": b, "diff": diff, "lo": lo, "hi": hi, "verdict": verdict}


def _hand_pooled():
    return {
        "sets": ["s0", "s1"], "level": 0.9, "n_boot": 200, "weights": {"s0": 0.25, "s1": 0.75},
        "arms": [{"method": "lora", "sampler": "p", "sets": {"s0": 0.5, "s1": 0.625}, "mean": 0.594},
                 {"method": "mtl", "sampler": "p", "sets": {"s0": 0.55}, "mean": 0.55}],
        "comparisons": [
            {"label": "mtl vs lora (p)",
             "pooled": {"sets": {"s0": _row("s0", 0.25, 3, 0.55, 0.5, 0.05, -0.0004, 0.1234, "no detectable difference"),
                                 "s1": _row("s1", 0.75, 2, 0.71, 0.639, 0.071, 0.013, 0.142, "better")},
                        "a": 0.663, "b": 0.594, "diff": 0.069, "lo": 0.021, "hi": 0.118, "verdict": "better",
                        "sets_disagree": True, "heterogeneity": {"q": 1.2345, "df": 1, "p": 0.26654, "i2": 0.19}}},
            {"label": "hydra vs lora (p)",
             "pooled": {"sets": {"s0": _row("s0", 1.0, 3, 0.4, 0.5, -0.1, -0.2, -0.031, "worse")},
                        "a": 0.4, "b": 0.5, "diff": -0.1, "lo": -0.2, "hi": -0.031, "verdict": "worse",
                        "sets_disagree": False, "heterogeneity": {"q": None, "df": 0, "p": None, "i2": None}}},
            {"label": "rlora vs lora (p)",
             "pooled": {"sets": {"s0": _row("s0", 1.0, 3, 0.5, 0.5, 0.0, -0.05, 0.05, "no detectable difference")},
                        "a": 0.5, "b": 0.5, "diff": 0.0, "lo": -0.05, "hi": 0.05, "verdict": "no detectable difference",
                        "sets_disagree": False, "heterogeneity": {"q": 0.0, "df": 0, "p": 1.0, "i2": 0.6}}}],
        "notes": ["hydra vs lora (p): no cells of both arms on ['s1']; pooled over ['s0'] only"],
    }


def test_pooled_markdown_in_full():
    """Every line of the pooled report from a hand-made summary: per-set and pooled rows, points with one
    decimal (no -0.0), weights with 3 significant digits, heterogeneity only where Q exists, then the notes."""
    without_notes = _hand_pooled()
    del without_notes["notes"]
    assert pooled_markdown(without_notes).endswith("I² 60 %.\n")
    assert pooled_markdown(_hand_pooled()) == "\n".join([
        "**Dev accuracy per arm and set** (%, macro mean over the set's tasks, mean over seeds; pooled: weights "
        "s0 0.25, s1 0.75)",
        "",
        "| method | sampler | s0 | s1 | pooled |",
        "| --- | --- | ---: | ---: | ---: |",
        "| lora | p | 50.0 | 62.5 | 59.4 |",
        "| mtl | p | 55.0 | – | 55.0 |",
        "",
        "**Paired differences A − B pooled over sets** (points; 90 % percentile interval of a stratified bootstrap: "
        "within each set seeds and dev rows, crossed; 200 resamples)",
        "",
        "| comparison (A vs B) | set | weight | seeds | A | B | A − B | 90 % CI | verdict |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        "| mtl vs lora (p) | s0 | 0.25 | 3 | 55.0 | 50.0 | +5.0 | [+0.0, +12.3] | no detectable difference |",
        "| mtl vs lora (p) | s1 | 0.75 | 2 | 71.0 | 63.9 | +7.1 | [+1.3, +14.2] | better |",
        "| mtl vs lora (p) | **pooled** | 1 | 5 | 66.3 | 59.4 | **+6.9** | [+2.1, +11.8] | better (sets disagree) |",
        "| hydra vs lora (p) | s0 | 1 | 3 | 40.0 | 50.0 | -10.0 | [-20.0, -3.1] | worse |",
        "| hydra vs lora (p) | **pooled** | 1 | 3 | 40.0 | 50.0 | **-10.0** | [-20.0, -3.1] | worse |",
        "| rlora vs lora (p) | s0 | 1 | 3 | 50.0 | 50.0 | +0.0 | [-5.0, +5.0] | no detectable difference |",
        "| rlora vs lora (p) | **pooled** | 1 | 3 | 50.0 | 50.0 | **+0.0** | [-5.0, +5.0] | no detectable difference |",
        "",
        "Heterogeneity of the per-set differences (Cochran's Q on the bootstrap variances, chi-square p-value, I²): "
        "mtl vs lora (p): Q 1.23 (df 1, p 0.267), I² 19 %; rlora vs lora (p): Q 0.00 (df 0, p 1.000), I² 60 %.",
        "",
        "hydra vs lora (p): no cells of both arms on ['s1']; pooled over ['s0'] only",
    ]) + "\n"


def test_pooled_forest_plot_content(monkeypatch, tmp_path):
    """A panel per comparison; from the top a row per set (dot, thin whisker) and the pooled row (diamond, thick
    whisker), coloured by verdict; a line at 0; set names on the first panel; the level in the title."""
    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
    path = pooled_forest_plot(_hand_pooled(), tmp_path / "new" / "dir" / "p.svg")  # parents made; PNG always
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = figures[0]
    green, grey, red = "#1a9850", "#555555", "#d73027"
    assert [ax.get_title() for ax in fig.axes] == ["mtl vs lora (p)", "hydra vs lora (p)", "rlora vs lora (p)"]
    expected = [[(2, 0.05, -0.0004, 0.1234, "o", grey, 2.0), (1, 0.071, 0.013, 0.142, "o", green, 2.0),
                 (0, 0.069, 0.021, 0.118, "D", green, 3.5)],
                [(2, -0.1, -0.2, -0.031, "o", red, 2.0), (0, -0.1, -0.2, -0.031, "D", red, 3.5)]]  # no s1 row
    for ax, rows in zip(fig.axes, expected):
        dots = [l for l in ax.lines if l.get_marker() in ("o", "D")]
        assert len(ax.collections) == len(dots) == len(rows)
        for coll, dot, (y, diff, lo, hi, marker, colour, width) in zip(ax.collections, dots, rows):
            (x0, y0), (x1, y1) = coll.get_segments()[0]
            assert (y0, y1) == (y, y) and (x0, x1) == (pytest.approx(100 * lo), pytest.approx(100 * hi))
            assert to_hex(coll.get_colors()[0]) == colour == to_hex(dot.get_color())
            assert coll.get_linewidths()[0] == width
            assert (dot.get_xdata()[0], dot.get_ydata()[0], dot.get_marker()) == (pytest.approx(100 * diff), y, marker)
            assert dot.get_markersize() == (6 if marker == "o" else 9)
        zero = [l for l in ax.lines if list(l.get_xdata()) == [0, 0]]
        assert len(zero) == 1 and ax.get_ylim() == (-0.7, 2.7) and ax.get_xlabel() == "A − B (points)"
        assert to_hex(zero[0].get_color()) == "#000000" and zero[0].get_linewidth() == 0.8
        assert ax.title.get_fontsize() == 10
        assert all(g.get_visible() and g.get_alpha() == 0.3 for g in ax.xaxis.get_gridlines())
        assert not any(g.get_visible() for g in ax.yaxis.get_gridlines())
    assert list(fig.axes[0].get_yticks()) == [2, 1, 0]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["s0", "s1", "pooled"]
    assert fig._suptitle.get_text() == ("Per set and pooled (diamond) paired differences with 90 % stratified "
                                        "bootstrap intervals")
    assert fig._suptitle.get_fontsize() == 10
    assert tuple(fig.get_size_inches()) == pytest.approx((4.2 * 3 + 2.5, 1.6 + 0.45 * 3))
    assert imread(path, format="png").shape[:2] == (int(110 * (1.6 + 0.45 * 3)), int(110 * (4.2 * 3 + 2.5)))
    with pytest.raises(CompareError) as err:
        pooled_forest_plot(dict(_hand_pooled(), comparisons=[]), tmp_path / "q.png")
    assert str(err.value) == "the pooled summary has no comparison to plot: it needs the baseline and another method"


def test_the_pooled_report_is_its_own_mlflow_run_reused_by_a_re_run(tiny_model_dir, tmp_path):
    """log_pooled with real MLflow (sqlite): a `compare-pooled` run with every set's and the pooled difference and
    interval as metrics, the arms' accuracies, the report files as artifacts and the sets' parent runs as tags;
    a second call logs to the same run."""
    import json

    from mlflow.tracking import MlflowClient

    from helpers import run_config
    from rlora.compare.suite import log_pooled

    sets = {f"s{k}": grid({"lora": 0.5, "mtl": 0.55}, samplers=("p",), seed=k) for k in range(2)}
    pooled = json.loads(json.dumps(to_json(pool_sets(sets, "lora", "p", n_boot=200, seed=1))))
    out = tmp_path / "cmp"
    (out / "s0").mkdir(parents=True)
    (out / "s0" / "compare_state.json").write_text(json.dumps({"parent_run_id": "abc"}))
    (out / "pooled.md").write_text(pooled_markdown(pooled))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = run_config(tiny_model_dir, tmp_path, tmp_path, mlflow__tracking_uri=uri)
    run_id = log_pooled(cfg, out, pooled, [out / "pooled.md"])
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.run_name == "compare-pooled" and run.info.status == "FINISHED"
    assert run.data.tags["sets"] == "s0,s1" and run.data.tags["parent_run.s0"] == "abc"
    line = pooled["comparisons"][0]["pooled"]
    key = "diff/mtl-p_vs_lora-p"
    assert run.data.metrics[f"{key}/pooled"] == line["diff"] and run.data.metrics[f"{key}/pooled_lo"] == line["lo"]
    assert run.data.metrics[f"{key}/s1_hi"] == line["sets"]["s1"]["hi"]
    mtl = next(a for a in pooled["arms"] if a["method"] == "mtl")
    assert run.data.metrics["accuracy/mtl-p/pooled"] == mtl["mean"]
    assert run.data.metrics["accuracy/mtl-p/s0"] == mtl["sets"]["s0"]
    assert [a.path for a in MlflowClient(uri).list_artifacts(run_id, "compare")] == ["compare/pooled.md"]
    assert log_pooled(cfg, out, pooled, []) == run_id
    assert json.loads((out / "pooled_state.json").read_text())["run_id"] == run_id
    # other sets (here one renamed to names MLflow refuses in keys, and "pooled"): a new run, keys made legal
    odd = dict(pooled, sets=["a+b", "pooled"], comparisons=[dict(pooled["comparisons"][0], pooled=dict(
        line, sets={"a+b": line["sets"]["s0"], "pooled": line["sets"]["s1"]}))],
        arms=[dict(a, sets={"a+b": a["sets"]["s0"], "pooled": a["sets"]["s1"]}) for a in pooled["arms"]])
    other = log_pooled(cfg, out, odd, [])
    metrics = MlflowClient(uri).get_run(other).data.metrics
    assert other != run_id and metrics[f"{key}/a_b"] == line["sets"]["s0"]["diff"]
    assert metrics[f"{key}/set_pooled"] == line["sets"]["s1"]["diff"] and metrics[f"{key}/pooled"] == line["diff"]
    assert log_pooled(cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"enabled": False})}),
                      tmp_path / "other", pooled, []) is None
