"""summarize -> markdown table, forest plot PNG and JSON."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.image import imread

from rlora.compare import CompareError, forest_plot, markdown_table, paired_differences, summarize, to_json

from .grid import grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = {"lora": 0.6, "hydra": 0.75, "mtl": 0.45}       # hydra clearly better, mtl clearly worse


@pytest.fixture(scope="module")
def cells():
    return grid(METHODS)


@pytest.fixture(scope="module")
def summary(cells):
    return summarize(cells, "lora", n_boot=400, seed=3)


def test_summary_lists_every_arm_and_the_expected_comparisons(summary, cells):
    assert summary["tasks"] == ["qa", "nli", "sum"]
    assert summary["methods"] == ["lora", "hydra", "mtl"] and summary["samplers"] == ["proportional", "dynamic"]
    assert [(a["method"], a["sampler"]) for a in summary["arms"]] == [
        (m, s) for s in ("proportional", "dynamic") for m in ("lora", "hydra", "mtl")]
    assert [c["label"] for c in summary["comparisons"]] == [
        "hydra vs lora (proportional)", "mtl vs lora (proportional)",
        "hydra vs lora (dynamic)", "mtl vs lora (dynamic)",
        "dynamic vs proportional (lora)", "dynamic vs proportional (hydra)", "dynamic vs proportional (mtl)"]
    assert [c["kind"] for c in summary["comparisons"]] == ["method"] * 4 + ["sampler"] * 3
    assert summary["notes"] == []
    by_label = {c["label"]: c for c in summary["comparisons"]}
    assert by_label["hydra vs lora (dynamic)"]["mean"]["verdict"] == "better"
    assert by_label["mtl vs lora (proportional)"]["worst"]["verdict"] == "worse"
    # every comparison is paired_differences of its two arms with the summary's settings
    dynamic, proportional = ([c for c in cells if c["method"] == "lora" and c["sampler"] == s]
                             for s in ("dynamic", "proportional"))
    direct = paired_differences(dynamic, proportional, n_boot=400, seed=3)
    again = by_label["dynamic vs proportional (lora)"]
    assert again["mean"] == direct["results"]["mean"] and again["tasks"]["nli"] == direct["results"]["nli"]
    # the arm table and the comparisons agree on the observed accuracies
    lora = summary["arms"][0]
    assert by_label["hydra vs lora (proportional)"]["mean"]["b"] == lora["mean"]


def test_markdown_has_a_row_per_arm_and_per_comparison(summary):
    text = markdown_table(summary)
    lines = text.splitlines()
    for arm in summary["arms"]:
        rows = [l for l in lines if l.startswith(f"| {arm['method']} | {arm['sampler']} | 3 |")]
        assert len(rows) == 1
        assert f"| {100 * arm['mean']:.1f} |" in rows[0]
        assert rows[0].endswith(f"| {100 * arm['worst']:.1f} ({arm['worst_task']}) |")
    for c in summary["comparisons"]:
        rows = [l for l in lines if l.startswith(f"| {c['label']} |")]
        assert [r.split(" | ")[1] for r in rows] == ["macro mean", "worst task"]
        for row, stat in zip(rows, ("mean", "worst")):
            r = c[stat]
            assert f"| {r['verdict']} |" in row
            assert f"| [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] |" in row
            assert row.endswith(f"| {r['seeds_to_resolve_1pt']} |")
    hydra = next(l for l in lines if l.startswith("| hydra vs lora (proportional) | macro mean"))
    mtl = next(l for l in lines if l.startswith("| mtl vs lora (proportional) | macro mean"))
    assert "| better |" in hydra and "| worse |" in mtl
    assert not re.search(r"\|\s*-0\.0\s*\|", text)
    assert "Seeds for ±1 pt: seeds at which" in text and "one seed" not in text
    per_task = markdown_table(summary, per_task=True).splitlines()
    assert [l.split(" | ")[1] for l in per_task if l.startswith("| mtl vs lora (dynamic) |")] == [
        "macro mean", "worst task", "task qa", "task nli", "task sum"]


def test_one_seed_and_missing_arms_are_footnoted(cells):
    one_seed = [c for c in cells if c["seed"] == 0 and not (c["method"] == "lora" and c["sampler"] == "dynamic")]
    s = summarize(one_seed, "lora", n_boot=200)
    assert [c["label"] for c in s["comparisons"]] == [
        "hydra vs lora (proportional)", "mtl vs lora (proportional)",
        "dynamic vs proportional (hydra)", "dynamic vs proportional (mtl)"]
    assert s["notes"] == ["no 'lora' cells under sampler 'dynamic': ['hydra', 'mtl'] are not compared with it there"]
    assert all(not c["seeds_resampled"] and c["mean"]["seeds_to_resolve_1pt"] is None for c in s["comparisons"])
    text = markdown_table(s)
    assert "| hydra vs lora (proportional) * | macro mean | 1 |" in text
    assert "\\* one seed: only dev rows were resampled" in text and s["notes"][0] in text
    assert "Seeds for ±1 pt:" not in text and "| – |" in text


def test_dropped_seeds_are_footnoted(cells):
    uneven = [c for c in cells if not (c["method"] == "hydra" and c["seed"] == 2)]
    s = summarize(uneven, "lora", n_boot=200)
    c = next(c for c in s["comparisons"] if c["label"] == "hydra vs lora (proportional)")
    assert c["seeds"] == [0, 1] and c["dropped_seeds"] == {"a": [], "b": [2]}
    assert ("hydra vs lora (proportional): seeds [2] of lora/proportional have no partner and were left out."
            in markdown_table(s))


def test_forest_plot_writes_a_png(summary, tmp_path):
    path = forest_plot(summary, tmp_path / "sub" / "forest.png")
    assert path == tmp_path / "sub" / "forest.png"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert b"Software" in data and b"matplotlib" in data          # PNG text chunk written by matplotlib
    img = imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 600                # two panels side by side
    assert img[..., :3].std() > 0.05                                # not a blank canvas
    taller = forest_plot(summary, tmp_path / "tasks.png", statistics=["mean", "worst", "qa"])
    assert imread(taller).shape[1] > img.shape[1]                   # a third panel
    with pytest.raises(CompareError, match="unknown statistic 'f1'"):
        forest_plot(summary, tmp_path / "bad.png", statistics=["f1"])


def test_forest_plot_needs_a_comparison(cells, tmp_path):
    only_lora = summarize([c for c in cells if c["method"] == "lora" and c["sampler"] == "proportional"], "lora",
                          n_boot=50)
    assert only_lora["comparisons"] == []
    with pytest.raises(CompareError, match="no comparison to plot"):
        forest_plot(only_lora, tmp_path / "f.png")
    assert "Paired differences" not in markdown_table(only_lora)


def test_json_round_trips_and_regenerates_the_report(summary, cells):
    data = to_json(summary)
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text) == data == summary                      # the summary is plain JSON already
    assert markdown_table(json.loads(text), per_task=True) == markdown_table(summary, per_task=True)


def test_to_json_converts_numpy_paths_and_non_finite_values():
    odd = {"arms": [{"params": {"lr": np.float32(0.5), "dims": np.arange(3), "out": Path("/tmp/x"),
                                "tags": ("a", "b"), "bad": float("nan"), 3: np.int64(7), "ok": np.bool_(True)}}]}
    assert to_json(odd) == {"arms": [{"params": {"lr": 0.5, "dims": [0, 1, 2], "out": "/tmp/x", "tags": ["a", "b"],
                                                 "bad": None, "3": 7, "ok": True}}]}
    json.dumps(to_json(odd), allow_nan=False)


def test_markdown_budget_and_tuning_sections(summary):
    """The budget line and the tuning table come after the differences and before the footnotes."""
    tuned = dict(summary)
    tuned["budget"] = {"mode": "total", "ranks": {"lora/proportional": 7, "hydra/proportional": 4}, "lora_rank": 7}
    tuned["tuning"] = {"seed": 7, "steps": 2, "val_rows": 6, "picks": [
        {"method": "lora", "sampler": "proportional", "picked": "lr=3e-3", "scores": {"lr=1e-3": 0.5, "lr=3e-3": 0.625}},
        {"method": "hydra", "sampler": "proportional", "picked": "lr=1e-3", "scores": {"lr=1e-3": 0.75, "lr=3e-3": 0.7}},
    ]}
    lines = markdown_table(tuned).splitlines()
    budget = lines.index("**Budget** `total`: LoRA rank 7; ranks lora/proportional 7, hydra/proportional 4.")
    head = ("**Tuning** (per arm: one cell per candidate, seed 7, 2 steps, scored on 6 validation rows per task carved "
            "from the training rows; macro-mean validation accuracy in %; the verdict's cells train on the same carved "
            "rows with the pick)")
    tuning = lines.index(head)
    assert lines[tuning + 1:tuning + 6] == ["", "| method | sampler | lr=1e-3 | lr=3e-3 | pick |",
                                            "| --- | --- | ---: | ---: | --- |",
                                            "| lora | proportional | 50.0 | 62.5 | lr=3e-3 |",
                                            "| hydra | proportional | 75.0 | 70.0 | lr=1e-3 |"]
    assert lines[budget - 1] == "" and lines[tuning - 1] == ""
    last_difference = max(i for i, l in enumerate(lines) if l.startswith("| mtl vs lora (dynamic) |"))
    footnote = lines.index(next(l for l in lines if l.startswith("Seeds for ±1 pt")))
    assert last_difference < budget < tuning < footnote
    # without a LoRA arm the budget line names the ranks only; no picks: no candidate columns
    tuned["budget"] = {"mode": "ab", "ranks": {"hydra/proportional": 4}, "lora_rank": None}
    tuned["tuning"] = {"seed": 1, "steps": 1, "val_rows": 5, "picks": []}
    lines = markdown_table(tuned).splitlines()
    assert "**Budget** `ab`: ranks hydra/proportional 4." in lines
    head = next(l for l in lines if l.startswith("**Tuning**"))
    assert "seed 1, 1 step, scored on 5 validation rows" in head
    assert lines[lines.index(head) + 2] == "| method | sampler | pick |"
    tuned["tuning"]["picks"] = [{"method": "lora", "sampler": "p", "picked": "lr=1", "scores": {"lr=1": 0.5}}]
    assert "| lora | p | 50.0 | lr=1 |" in markdown_table(tuned).splitlines()  # one pick: its candidates


def test_summary_with_another_baseline_and_a_missing_baseline_arm(cells):
    """Baselines (hydra, dynamic): A vs B labels and the a/b arms follow them; the summary carries its settings."""
    s = summarize(cells, "hydra", "dynamic", n_boot=50, seed=1, level=0.9)
    assert [(c["kind"], c["label"]) for c in s["comparisons"]] == [
        ("method", "lora vs hydra (proportional)"), ("method", "mtl vs hydra (proportional)"),
        ("method", "lora vs hydra (dynamic)"), ("method", "mtl vs hydra (dynamic)"),
        ("sampler", "proportional vs dynamic (lora)"), ("sampler", "proportional vs dynamic (hydra)"),
        ("sampler", "proportional vs dynamic (mtl)")]
    first, last = s["comparisons"][0], s["comparisons"][-1]
    assert (first["a"], first["b"]) == ({"method": "lora", "sampler": "proportional"},
                                        {"method": "hydra", "sampler": "proportional"})
    assert (last["a"], last["b"]) == ({"method": "mtl", "sampler": "proportional"},
                                      {"method": "mtl", "sampler": "dynamic"})
    assert s["baseline"] == {"method": "hydra", "sampler": "dynamic"}
    assert (s["n_boot"], s["level"], s["rng_seed"]) == (50, 0.9, 1) and s["notes"] == []
    assert set(first["tasks"]) == {"qa", "nli", "sum"} and first["seeds"] == [0, 1, 2] and first["n_seeds"] == 3
    assert first["seeds_resampled"] is True and first["dropped_seeds"] == {"a": [], "b": []}
    # without hydra's arm under the baseline sampler, hydra's other sampler is listed as not compared
    s = summarize([c for c in cells if (c["method"], c["sampler"]) != ("hydra", "proportional")], "lora", n_boot=50)
    assert s["notes"] == ["no 'hydra' cells under the baseline sampler 'proportional': samplers ['dynamic'] are not "
                          "compared"]
    assert "dynamic vs proportional (hydra)" not in [c["label"] for c in s["comparisons"]]


def test_summary_defaults_levels_and_messages(cells):
    two = [c for c in cells if c["sampler"] == "proportional" and c["method"] in ("lora", "hydra")]
    s = summarize(two, "lora")
    assert (s["n_boot"], s["rng_seed"], s["level"]) == (2000, 0, 0.95) and s["baseline"]["sampler"] == "proportional"
    hydra = [c for c in two if c["method"] == "hydra"]
    lora = [c for c in two if c["method"] == "lora"]
    assert s["comparisons"][0]["mean"] == paired_differences(hydra, lora)["results"]["mean"]
    # the level reaches the bootstrap
    s90 = summarize(two, "lora", n_boot=300, seed=2, level=0.9)
    assert s90["comparisons"][0]["worst"] == paired_differences(hydra, lora, n_boot=300, seed=2,
                                                                level=0.9)["results"]["worst"]
    with pytest.raises(CompareError) as err:
        summarize(two, "mtl")
    assert str(err.value) == ("baseline_method 'mtl' has no cells (methods present: ['lora', 'hydra']): pass one of "
                              "them or run the baseline too")
    with pytest.raises(CompareError) as err:
        summarize(["lora"], "lora")
    assert str(err.value) == "cells[0] is a str: each cell must be a dict with method, sampler, seed and correct"


def _res(a, b, diff, lo, hi, verdict, need):
    return {"a": a, "b": b, "diff": diff, "lo": lo, "hi": hi, "verdict": verdict, "seeds_to_resolve_1pt": need}


def _hand_summary():
    return {
        "tasks": ["qa", "nli"], "level": 0.95, "n_boot": 300, "notes": ["a note"],
        "arms": [{"method": "lora", "sampler": "p", "n_seeds": 2, "tasks": {"qa": {"acc": 0.5}, "nli": {"acc": 0.7}},
                  "mean": 0.6, "worst": 0.5, "worst_task": "qa"},
                 {"method": "hy|dra", "sampler": "p", "n_seeds": 2, "tasks": {"qa": {"acc": 0.6}, "nli": {"acc": 0.8}},
                  "mean": 0.7, "worst": 0.6, "worst_task": "qa"}],
        "comparisons": [{
            "label": "hy|dra vs lora (p)", "seeds_resampled": False, "n_seeds": 2,
            "a": {"method": "hy|dra", "sampler": "p"}, "b": {"method": "lora", "sampler": "p"},
            "dropped_seeds": {"a": [], "b": [3]},
            "mean": _res(0.7, 0.6, 0.1, 0.02, 0.181, "better", 12),
            "worst": _res(0.6, 0.5, 0.1, -0.0004, 0.2, "no detectable difference", None),
            "tasks": {"qa": _res(0.6, 0.5, 0.1, -0.1, 0.3, "no detectable difference", None),
                      "nli": _res(0.8, 0.7, 0.1, 0.01, 0.19, "better", 3)}}],
    }


def test_markdown_table_in_full(tmp_path):
    """Every line from a hand-made summary: '|' escaped in cells, one decimal, no -0.0, '–' for no seed count,
    the one-seed star, and the footnotes in order (one seed, seeds for ±1 pt, dropped seeds, notes)."""
    summary = _hand_summary()
    name = "| hy\\|dra vs lora (p) * |"
    expected = [
        "**Dev accuracy per arm** (%, mean over seeds; worst = the lowest task)",
        "",
        "| method | sampler | seeds | qa | nli | mean | worst |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        "| lora | p | 2 | 50.0 | 70.0 | 60.0 | 50.0 (qa) |",
        "| hy\\|dra | p | 2 | 60.0 | 80.0 | 70.0 | 60.0 (qa) |",
        "",
        "**Paired differences A − B** (points; 95 % percentile interval of a paired bootstrap of seeds and dev rows, "
        "crossed, 300 resamples)",
        "",
        "| comparison (A vs B) | statistic | seeds | A | B | A − B | 95 % CI | verdict | seeds for ±1 pt |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: |",
        f"{name} macro mean | 2 | 70.0 | 60.0 | +10.0 | [+2.0, +18.1] | better | 12 |",
        f"{name} worst task | 2 | 60.0 | 50.0 | +10.0 | [+0.0, +20.0] | no detectable difference | – |",
        "TASKS",
        "",
        "\\* one seed: only dev rows were resampled, so the interval leaves out seed-to-seed variance.",
        "",
        "Seeds for ±1 pt: seeds at which the interval's half-width would be 1 point, assuming it shrinks as "
        "1/sqrt(seeds) (seed variance dominating).",
        "",
        "hy|dra vs lora (p): seeds [3] of lora/p have no partner and were left out.",
        "",
        "a note",
    ]
    tasks = [f"{name} task qa | 2 | 60.0 | 50.0 | +10.0 | [-10.0, +30.0] | no detectable difference | – |",
             f"{name} task nli | 2 | 80.0 | 70.0 | +10.0 | [+1.0, +19.0] | better | 3 |"]
    at = expected.index("TASKS")
    assert markdown_table(summary) == "\n".join(expected[:at] + expected[at + 1:]) + "\n"
    assert markdown_table(summary, per_task=True) == "\n".join(expected[:at] + tasks + expected[at + 1:]) + "\n"
    del summary["notes"]  # a summary without notes (older JSON) is fine
    assert markdown_table(summary) == "\n".join(expected[:at] + expected[at + 1:-2]) + "\n"
    with pytest.raises(CompareError) as err:
        forest_plot(summary, tmp_path / "f.png", statistics=["f1"])
    assert str(err.value) == "unknown statistic 'f1': use 'mean', 'worst' or one of the tasks ['qa', 'nli']"
    with pytest.raises(CompareError) as err:
        forest_plot(summary, tmp_path / "f.png", statistics=[])
    assert str(err.value) == "statistics is empty: pass e.g. ['mean', 'worst'] or task names"


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib figures the report functions save (captured at savefig)."""
    figures = []
    save = Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def _marks(ax):
    """(segments, colour) of each whisker and (x, y, marker, colour) of each dot, in drawing order."""
    whiskers = [(c.get_segments()[0].tolist(), to_hex(c.get_colors()[0])) for c in ax.collections]
    dots = [(l.get_xdata()[0], l.get_ydata()[0], l.get_marker(), to_hex(l.get_color())) for l in ax.lines
            if l.get_marker() not in ("None", None, "")]
    return whiskers, dots


def _assert_style(ax, whisker_widths, marker_sizes):
    """Line widths and marker sizes of the marks, 10 pt titles, a faint grid on x only."""
    assert {c.get_linewidths()[0] for c in ax.collections} == whisker_widths
    assert {l.get_markersize() for l in ax.lines if l.get_marker() in ("o", "D")} == marker_sizes
    assert ax.title.get_fontsize() == 10
    assert all(g.get_visible() and g.get_alpha() == 0.3 for g in ax.xaxis.get_gridlines())
    assert not any(g.get_visible() for g in ax.yaxis.get_gridlines())


def test_forest_plot_content(drawn, tmp_path):
    """A panel per statistic, a row per comparison from the top, dot at the difference, whisker over the interval in
    points, the verdict's colour, a line at 0, labels and titles; 110 dpi."""
    summary = _hand_summary()
    second = dict(summary["comparisons"][0], label="lora vs lora (p)", seeds_resampled=True)
    second["mean"] = _res(0.6, 0.7, -0.1, -0.2, -0.05, "worse", None)
    summary["comparisons"].append(second)
    path = forest_plot(summary, tmp_path / "new" / "dir" / "f.svg")  # parents made; PNG whatever the suffix
    assert path.read_bytes()[:8] == PNG_MAGIC
    fig = drawn[0]
    assert [ax.get_title() for ax in fig.axes] == ["macro mean", "worst task"]
    assert all(ax.get_xlabel() == "A − B (points)" for ax in fig.axes)
    green, grey, red = "#1a9850", "#555555", "#d73027"
    whiskers, dots = _marks(fig.axes[0])
    assert [c for _, c in whiskers] == [green, red] and [d[2:] for d in dots] == [("o", green), ("o", red)]
    assert [w for w, _ in whiskers] == [[[2.0, 1.0], [pytest.approx(18.1), 1.0]], [[-20.0, 0.0], [-5.0, 0.0]]]
    assert [d[:2] for d in dots] == [(pytest.approx(10.0), 1), (pytest.approx(-10.0), 0)]
    whiskers, dots = _marks(fig.axes[1])
    assert whiskers[0] == ([[pytest.approx(-0.04), 1.0], [20.0, 1.0]], grey)
    assert dots[0] == (pytest.approx(10.0), 1, "o", grey)
    for ax in fig.axes:
        zero = [l for l in ax.lines if list(l.get_xdata()) == [0, 0]]
        assert len(zero) == 1 and to_hex(zero[0].get_color()) == "#000000" and zero[0].get_linewidth() == 0.8
        assert ax.get_ylim() == (-0.7, 1.7)
        _assert_style(ax, whisker_widths={2.0}, marker_sizes={6.0})
    assert list(fig.axes[0].get_yticks()) == [1, 0]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["hy|dra vs lora (p) *", "lora vs lora (p)"]
    assert fig._suptitle.get_text() == ("Paired differences A − B with 95 % bootstrap intervals (green: better, red: "
                                        "worse, grey: neither)\n* one seed: dev rows resampled, seed-to-seed "
                                        "variance left out")
    assert fig._suptitle.get_fontsize() == 10
    assert tuple(fig.get_size_inches()) == pytest.approx((4.2 * 2 + 2.5, 1.5 + 0.42 * 2))
    assert imread(path, format="png").shape[:2] == (int(110 * (1.5 + 0.42 * 2)), int(110 * (4.2 * 2 + 2.5)))
    # every comparison with seeds resampled: no star line in the title
    summary["comparisons"] = [second]
    forest_plot(summary, tmp_path / "g.png", statistics=["qa"])
    assert drawn[1]._suptitle.get_text().count("\n") == 0 and drawn[1].axes[0].get_title() == "task qa"
    assert [t.get_text() for t in drawn[1].axes[0].get_yticklabels()] == ["lora vs lora (p)"]
    with pytest.raises(CompareError) as err:
        forest_plot(dict(summary, comparisons=[]), tmp_path / "h.png")
    assert str(err.value) == ("the summary has no comparison to plot: it needs the baseline and at least one more "
                              "arm")


def test_to_json_sorts_sets_by_their_text():
    assert to_json({"s": {10, 9, "a"}, "f": frozenset({2.5}), "n": None, "i": -np.inf}) == {
        "s": [10, 9, "a"], "f": [2.5], "n": None, "i": None}
