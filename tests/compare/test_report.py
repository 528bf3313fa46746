"""summarize -> markdown table, forest plot PNG and JSON."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
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
