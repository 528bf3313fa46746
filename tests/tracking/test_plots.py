"""Every plot writes a readable PNG; bad input is a one-line PlotError."""
import numpy as np
import pytest
from matplotlib.image import imread

from diag_models import TASKS, adapter_model, probe_for, randomise
from rlora.tracking import diagnostics as D
from rlora.tracking import plots as P

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(path, min_w=300, min_h=200):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    img = imread(path)
    assert img.shape[0] >= min_h and img.shape[1] >= min_w
    assert img[..., :3].std() > 0.05            # not a blank canvas
    return img


def test_head_similarity_grid_by_module_and_depth(tmp_path):
    rng = np.random.default_rng(0)
    mats = {}
    for depth in range(30):
        for mod in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]:
            m = np.clip(rng.normal(depth / 30, 0.1, (3, 3)), -1, 1)
            mats[f"model.layers.{depth}.self_attn.{mod}"] = (m + m.T) / 2
    img = check_png(P.plot_head_similarity(mats, tmp_path / "sub" / "heads.png"), min_w=1000)
    assert img.shape[1] > img.shape[0]          # 30 layer columns, 7 module rows: wide
    rows, cols, where = P._layout(list(mats))
    assert rows[0] == "q_proj" and cols == [str(d) for d in range(30)]
    assert where["model.layers.29.self_attn.down_proj"] == (6, 29)


def test_head_similarity_falls_back_to_a_square_grid(tmp_path):
    mats = {f"blk_{c}": np.eye(2) for c in "abcde"}
    rows, cols, where = P._layout(list(mats))
    assert len(cols) == 3 and len(rows) == 2 and where["blk_e"] == (1, 1)
    check_png(P.plot_head_similarity(mats, tmp_path / "h.png"), min_w=200, min_h=150)
    with pytest.raises(P.PlotError, match="num_heads >= 2"):
        P.plot_head_similarity({}, tmp_path / "x.png")


def test_interference_router_mixing_and_task_weight_plots(tmp_path):
    names = ["arithmetic", "date_understanding", "navigate", "sports"]
    c = np.array([[1, 0.4, -0.5, np.nan], [0.4, 1, 0.1, np.nan], [-0.5, 0.1, 1, np.nan], [np.nan] * 4])
    check_png(P.plot_interference(c, names, tmp_path / "int.png"))
    usage = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [1 / 3] * 3])
    check_png(P.plot_router_usage(usage, names, tmp_path / "router.png", entropy=[0.7, 0.5, 0.99, 1.0]))
    check_png(P.plot_mtl_mixing(usage, names, tmp_path / "mix.png", lambda_dev=[0.1, 0.2, 0.0, 1.5]))
    history = [{"step": s, "probabilities": [0.25 + 0.001 * s, 0.25, 0.25, 0.25 - 0.001 * s]}
               for s in range(0, 100, 10)]
    check_png(P.plot_task_weights(history, names, tmp_path / "weights.png"))


def test_plot_input_errors(tmp_path):
    with pytest.raises(P.PlotError, match="3 rows but 2 task names"):
        P.plot_interference(np.eye(3), ["a", "b"], tmp_path / "x.png")
    with pytest.raises(P.PlotError, match="must be square"):
        P.plot_interference(np.ones((2, 3)), ["a", "b"], tmp_path / "x.png")
    with pytest.raises(P.PlotError, match="must be 2-d"):
        P.plot_router_usage(np.ones(3), ["a"], tmp_path / "x.png")
    with pytest.raises(P.PlotError, match="empty history"):
        P.plot_task_weights([], ["a"], tmp_path / "x.png")
    with pytest.raises(P.PlotError, match="2 probabilities per entry but 3 task names"):
        P.plot_task_weights([{"step": 0, "probabilities": [0.5, 0.5]}], ["a", "b", "c"], tmp_path / "x.png")
    with pytest.raises(P.PlotError, match="'step': int"):
        P.plot_task_weights([{"probabilities": [1.0]}], ["a"], tmp_path / "x.png")


@pytest.mark.parametrize("method,expected", [
    ("rlora", {"head_similarity.png", "interference.png", "router_usage.png", "task_weights.png",
               "router_usage.csv"}),
    ("mtl", {"head_similarity.png", "interference.png", "mtl_mixing.png", "task_weights.png", "mtl_mixing.csv"}),
])
def test_save_diagnostic_plots_from_a_real_pass(tmp_path, method, expected):
    import json

    model = randomise(adapter_model(method), std=0.1)
    diag = D.run_diagnostics(model, probe_for(), TASKS)
    history = [{"step": 0, "probabilities": [1 / 3] * 3}, {"step": 10, "probabilities": [0.5, 0.25, 0.25]}]
    paths = P.save_diagnostic_plots(diag, tmp_path, history=history, prefix="")
    assert {p.name for p in paths} == expected | {"head_similarity.json", "task_weights.json", "interference.csv",
                                                  "interference_top.csv"}
    import csv

    pairs = list(csv.DictReader(open(tmp_path / "interference.csv")))
    assert [(r["task_a"], r["task_b"]) for r in pairs] == [("alpha", "beta"), ("alpha", "gamma"), ("beta", "gamma")]
    c = diag.interference
    assert [float(r["cosine"]) for r in pairs] == pytest.approx([c[0, 1], c[0, 2], c[1, 2]], abs=1e-6)
    top = list(csv.DictReader(open(tmp_path / "interference_top.csv")))
    assert [float(r["cosine"]) for r in top] == sorted(float(r["cosine"]) for r in pairs)
    for p in paths:
        if p.suffix == ".png":
            check_png(p, min_w=200, min_h=150)
    grid = json.loads((tmp_path / "head_similarity.json").read_text())
    assert grid.keys() == diag.matrices.keys()
    name = next(iter(grid))
    assert np.allclose(grid[name]["BA"], diag.matrices[name]["BA"], atol=1e-6)
    assert json.loads((tmp_path / "task_weights.json").read_text())["history"] == history


def test_head_similarity_summary_is_one_point_per_layer(tmp_path):
    """The summary plots the off-diagonal mean of each layer's matrix against depth (readable at 30 layers)."""
    mats = {f"model.layers.{d}.self_attn.{m}": {"BA": np.array([[1, d / 30, 0], [d / 30, 1, 0], [0, 0, 1.0]])}
            for d in range(30) for m in ("q_proj", "v_proj")}
    assert P._off_diagonal_mean(mats["model.layers.15.self_attn.q_proj"]["BA"]) == pytest.approx(0.5 / 3)
    img = check_png(P.plot_head_similarity_summary(mats, tmp_path / "s.png"), min_w=500, min_h=300)
    assert img.shape[1] < 1200  # one panel per kind, not one column per layer
    with pytest.raises(P.PlotError, match="num_heads >= 2"):
        P.plot_head_similarity_summary({}, tmp_path / "x.png")


def test_router_usage_colours_small_deviations_and_shows_layers(tmp_path):
    """A router 0.004 away from uniform is visibly coloured (the scale follows the largest deviation)."""
    usage = np.array([[0.504, 0.496], [0.498, 0.502]])
    per_layer = {"model.layers.0.self_attn.q_proj": {"usage": np.array([[0.6, 0.4], [0.5, 0.5]])},
                 "model.layers.1.self_attn.q_proj": {"usage": np.array([[0.408, 0.592], [0.496, 0.504]])}}
    img = check_png(P.plot_router_usage(usage, ["a", "b"], tmp_path / "r.png", [0.99, 0.99], per_layer))
    rgb = img[..., :3]
    saturated = ((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.5).mean()
    assert saturated > 0.05  # strongly coloured cells, not a uniform 0.50 field


def test_figures_stay_bounded_at_200_tasks(tmp_path, monkeypatch):
    """At T = 200 the task figures keep a bounded size (no per-task tick labels) and the task-weights plot draws
    a band plus the 5 highest and 5 lowest tasks instead of 200 lines with a 200-entry legend."""
    rng = np.random.default_rng(0)
    T = 200
    names = [f"task{t:03d}" for t in range(T)]
    m = rng.uniform(-1, 1, (T, T))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    limit = P.MAX_INCHES * 110 + 200  # px: the figure's inches at 110 dpi, plus what bbox 'tight' may add
    img = check_png(P.plot_interference(m, names, tmp_path / "i.png"))
    assert max(img.shape[:2]) <= limit
    mix = rng.dirichlet(np.ones(3), T)
    img = check_png(P.plot_mtl_mixing(mix, names, tmp_path / "m.png"), min_w=200)
    assert img.shape[0] <= limit
    probs = rng.dirichlet(np.ones(T), 5)
    history = [{"step": 10 * i, "probabilities": p.tolist()} for i, p in enumerate(probs)]
    fig_lines = []
    real_plot = P.Figure.add_subplot

    def spy(self, *a, **k):
        ax = real_plot(self, *a, **k)
        fig_lines.append(ax)
        return ax

    monkeypatch.setattr(P.Figure, "add_subplot", spy)
    check_png(P.plot_task_weights(history, names, tmp_path / "w.png"))
    labels = [ln.get_label() for ln in fig_lines[0].get_lines()]
    last = np.argsort(-probs[-1], kind="stable")
    shown = [names[k] for k in list(last[:5]) + list(last[-5:])]
    assert labels == ["median"] + shown + ["uniform 1/T"]
