"""PNG plots of the diagnostics (matplotlib, Agg canvas; pyplot and its global state are not used).

Each function takes plain arrays (as returned by :mod:`rlora.tracking.diagnostics`), writes one PNG
and returns its path.  Cosines always use the same diverging scale −1 (blue) .. 0 (white) .. +1 (red),
so at a glance: red head panels = heads collapsed into one; blue task cells = tasks in conflict.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .metric_names import top_pairs

PathLike = Union[str, Path]
COS_CMAP = "RdBu_r"
PROB_CMAP = "viridis"
_DEPTH = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


class PlotError(ValueError):
    """Bad input to a plot function (one line, names the argument and the fix)."""


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    return path


def _matrix(value, name: str) -> np.ndarray:
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise PlotError(f"{name} must be a numeric 2-d array") from None
    if m.ndim != 2:
        raise PlotError(f"{name} must be 2-d, got shape {m.shape}")
    return m


def _check_tasks(m: np.ndarray, task_names: Sequence[str], name: str) -> list[str]:
    names = [str(t) for t in task_names]
    if m.shape[0] != len(names):
        raise PlotError(f"{name} has {m.shape[0]} rows but {len(names)} task names were given: pass one name per row")
    return names


MAX_INCHES = 16.0      # figures stay this size at any task count
MAX_TICK_LABELS = 40   # more tasks than this: no per-task tick labels (unreadable), the data files name them


def _task_ticks(ax, names: Sequence[str], axis: str) -> None:
    """One tick label per task up to :data:`MAX_TICK_LABELS` tasks; beyond, index ticks only."""
    n = len(names)
    if n > MAX_TICK_LABELS:
        (ax.set_xlabel if axis == "x" else ax.set_ylabel)(f"task index (0..{n - 1}; names in the .csv beside)")
        return
    if axis == "x":
        ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    else:
        ax.set_yticks(range(n), names, fontsize=8)


def write_csv(path: PathLike, header: Sequence[str], rows) -> Path:
    """A small CSV file (values as written; task names quoted by the csv module where needed)."""
    import csv

    path = Path(path)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(header))
        w.writerows(rows)
    return path


def _annotate(ax, m: np.ndarray, fmt: str, dark_if) -> None:
    if m.size > 400:
        return
    for (i, j), v in np.ndenumerate(m):
        if np.isfinite(v):
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8,
                    color="white" if dark_if(v) else "black")


# --------------------------------------------------------------------------------------------
def _layout(names: list[str]) -> tuple[list, list, dict]:
    """(row labels, column labels, {layer: (row, col)}): rows = module types, columns = depth when
    every name carries a layer index; otherwise a square grid in name order."""
    depths = [_DEPTH.findall(n) for n in names]
    if names and all(depths):
        types = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
        cols = sorted({int(d[0]) for d in depths})
        col_of = {c: k for k, c in enumerate(cols)}
        where = {n: (types.index(n.rsplit(".", 1)[-1]), col_of[int(d[0])]) for n, d in zip(names, depths)}
        if len(set(where.values())) == len(names):
            return types, [str(c) for c in cols], where
    ncols = max(1, math.ceil(math.sqrt(len(names))))
    nrows = max(1, math.ceil(len(names) / ncols))
    where = {n: divmod(k, ncols) for k, n in enumerate(names)}
    return [str(r * ncols) for r in range(nrows)], [str(c) for c in range(ncols)], where


def plot_head_similarity(matrices: Mapping[str, np.ndarray], path: PathLike, kind: str = "BA") -> Path:
    """Grid of per-layer N x N head cosine matrices (rows: module type, columns: layer index), shared
    scale −1..1.  ``matrices``: {layer name: [N, N]} from ``head_similarity_matrices``; ``kind``
    names what they compare (``B``, ``BA``, ``learned``, ``effective``) in the title."""
    if not matrices:
        raise PlotError("plot_head_similarity got no matrices: the adapter needs num_heads >= 2")
    names = list(matrices)
    mats = {n: _matrix(matrices[n], f"matrices['{n}']") for n in names}
    N = max(m.shape[0] for m in mats.values())
    rows, cols, where = _layout(names)
    cell = N + 1                                        # one blank line between panels
    mosaic = np.full((len(rows) * cell - 1, len(cols) * cell - 1), np.nan)
    diagonal = np.full_like(mosaic, np.nan)             # i = j cells (always 1) are drawn black
    for n, m in mats.items():
        r, c = where[n]
        k = m.shape[0]
        mosaic[r * cell:r * cell + k, c * cell:c * cell + m.shape[1]] = m
        idx = np.arange(k)
        diagonal[r * cell + idx, c * cell + idx] = 1.0
    off = [m[np.triu_indices(m.shape[0], k=1)] for m in mats.values() if m.shape[0] >= 2]
    mean = float(np.mean(np.concatenate(off))) if off else float("nan")
    width = min(30.0, max(6.0, 0.32 * len(cols) * cell / 3 + 2.5))
    height = max(2.8, 0.32 * len(rows) * cell / 3 + 1.8)
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot()
    cmap = _cmap(COS_CMAP)
    im = ax.imshow(mosaic, cmap=cmap, norm=Normalize(-1.0, 1.0), interpolation="nearest", aspect="equal")
    ax.imshow(diagonal, cmap=ListedColormap(["black"]), interpolation="nearest", aspect="equal")
    ax.set_xticks([c * cell + (N - 1) / 2 for c in range(len(cols))], cols, fontsize=7)
    ax.set_yticks([r * cell + (N - 1) / 2 for r in range(len(rows))], rows, fontsize=8)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    what = {"B": "cos(B_i, B_j)", "BA": "cos(B_i A, B_j A)", "learned": "of the learned updates (B_i − B_i⁰) A",
            "effective": "of the effective updates B_i A − B̄⁰A⁰"}.get(kind, kind)
    ax.set_xlabel("layer index (each panel: heads i x j)")
    ax.set_ylabel("module")
    ax.set_title(f"Head similarity {what}, mean over pairs {mean:+.3f}\n"
                 "red ≈ +1: heads collapsed into one   white ≈ 0: independent heads   blue < 0: opposing heads\n"
                 "(black: a head with itself; grey: no layer)",
                 fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.02, shrink=0.8, label="cosine")
    return _save(fig, path)


def _off_diagonal_mean(m: np.ndarray) -> float:
    iu = np.triu_indices(m.shape[0], k=1)
    return float(np.mean(m[iu])) if iu[0].size else float("nan")


def plot_head_similarity_summary(matrices: Mapping[str, Mapping[str, np.ndarray]], path: PathLike,
                                 kinds: Sequence[str] = ("BA", "learned")) -> Path:
    """One panel per kind: the mean pairwise head cosine of each layer (off-diagonal mean of its
    [N, N] matrix) against depth, one line per module type, on the fixed scale −1..1.  ``matrices``:
    {layer: {kind: [N, N]}} (``Diagnostics.matrices``); kinds absent from every layer are left out."""
    kinds = [k for k in kinds if any(k in v for v in matrices.values())]
    if not kinds:
        raise PlotError("plot_head_similarity_summary got no matrices: the adapter needs num_heads >= 2")
    what = {"B": "cos(B_i, B_j)", "BA": "raw updates cos(B_i A, B_j A)",
            "learned": "learned updates cos((B_i − B_i⁰)A, (B_j − B_j⁰)A)",
            "effective": "effective updates cos(B_i A − B̄⁰A⁰, ...)"}
    fig = Figure(figsize=(6.5 * len(kinds), 3.8))
    for k, kind in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), k + 1)
        series: dict[str, list[tuple[int, float]]] = {}
        for pos, (name, mats) in enumerate(matrices.items()):
            if kind not in mats:
                continue
            depth = _DEPTH.findall(name)
            series.setdefault(name.rsplit(".", 1)[-1], []).append(
                (int(depth[0]) if depth else pos, _off_diagonal_mean(_matrix(mats[kind], name))))
        for mtype, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, linewidth=1.5, label=mtype)
        allv = [v for pts in series.values() for _, v in pts if np.isfinite(v)]
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("layer index")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("mean cosine between heads")
        ax.set_title(f"Head similarity, {what.get(kind, kind)}\nmean over layers "
                     f"{np.mean(allv) if allv else float('nan'):+.3f} (1: heads collapsed, 0: independent)",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def head_similarity_data(matrices: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """The full per-layer matrices as JSON-ready lists: {layer: {kind: [[...], ...]}}."""
    return {name: {kind: np.asarray(m, dtype=float).round(6).tolist() for kind, m in mats.items()}
            for name, mats in matrices.items()}


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="#d9d9d9")


def plot_interference(matrix: np.ndarray, task_names: Sequence[str], path: PathLike) -> Path:
    """Task x task gradient cosine heatmap (−1..1); NaN (task not probed) in grey."""
    m = _matrix(matrix, "matrix")
    names = _check_tasks(m, task_names, "matrix")
    if m.shape[0] != m.shape[1]:
        raise PlotError(f"matrix must be square (T x T), got shape {m.shape}")
    T = len(names)
    fig = Figure(figsize=(min(MAX_INCHES, max(4.5, 0.6 * T + 2.5)), min(MAX_INCHES, max(3.8, 0.55 * T + 1.8))))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap=_cmap(COS_CMAP), norm=Normalize(-1.0, 1.0), interpolation="nearest")
    _annotate(ax, m, ".2f", lambda v: abs(v) > 0.6)
    _task_ticks(ax, names, "x")
    _task_ticks(ax, names, "y")
    off = m[~np.eye(T, dtype=bool)]
    off = off[np.isfinite(off)]
    mean = f"{off.mean():+.3f}" if off.size else "n/a"
    ax.set_title(f"Task gradient cosine (mean off-diagonal {mean})\n"
                 "blue < 0: the tasks pull the shared adapter in opposite directions (conflict)"
                 + ("\n(grey: task not in the probe)" if np.isnan(m).any() else ""), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine of task gradients")
    return _save(fig, path)


MANY_LINES = 10  # more tasks than this: the task-weights plot draws a band and the 5 highest + 5 lowest


def plot_task_weights(history: Sequence[Mapping], task_names: Sequence[str], path: PathLike) -> Path:
    """Sampling probability of each task over training steps: ``history`` = [{"step", "probabilities"}],
    one entry per logged step (the trainer's) or per re-weighting (``TaskSampler.history``)."""
    if not history:
        raise PlotError("plot_task_weights got an empty history: pass TaskSampler.history")
    try:
        steps = np.array([int(h["step"]) for h in history])
        probs = np.array([[float(p) for p in h["probabilities"]] for h in history])
    except (KeyError, TypeError, ValueError):
        raise PlotError("history entries must be {'step': int, 'probabilities': [T floats]}") from None
    names = [str(t) for t in task_names]
    if probs.ndim != 2 or probs.shape[1] != len(names):
        raise PlotError(f"history has {probs.shape[-1]} probabilities per entry but {len(names)} task names")
    fig = Figure(figsize=(8, 4.2))
    ax = fig.add_subplot()
    marker = "o" if len(steps) <= 40 else None
    shown = range(len(names))
    if len(names) > MANY_LINES:  # a band for all tasks; lines for the highest and lowest at the last step
        ax.fill_between(steps, probs.min(axis=1), probs.max(axis=1), step="post", color="0.85",
                        label=f"all {len(names)} tasks (min..max)")
        ax.plot(steps, np.median(probs, axis=1), color="0.4", linewidth=1, drawstyle="steps-post", label="median")
        last = np.argsort(-probs[-1], kind="stable")
        shown = list(last[:MANY_LINES // 2]) + list(last[-(MANY_LINES // 2):])
    for k in shown:
        ax.plot(steps, probs[:, k], marker=marker, markersize=3, linewidth=1.5, label=names[k],
                drawstyle="steps-post")
    ax.axhline(1.0 / len(names), color="black", linestyle="--", linewidth=1, label="uniform 1/T")
    ax.set_xlabel("training step")
    ax.set_ylabel("sampling probability")
    ax.set_ylim(0, min(1.0, max(probs.max(), 1.0 / len(names)) * 1.15))
    ax.set_title("Task sampling probabilities (a rising line: that task gets more of the batch)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def _prob_heatmap(m: np.ndarray, row_labels: list[str], path: PathLike, title: str, xlabel: str,
                  cbar: str) -> Path:
    T, N = m.shape
    fig = Figure(figsize=(max(4.5, 0.7 * N + 3.0), min(MAX_INCHES, max(3.0, 0.45 * T + 1.8))))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap=PROB_CMAP, norm=Normalize(0.0, 1.0), interpolation="nearest", aspect="auto")
    _annotate(ax, m, ".2f", lambda v: v < 0.5)
    ax.set_xticks(range(N), [f"head {i}" for i in range(N)], fontsize=8)
    _task_ticks(ax, row_labels, "y")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=cbar)
    return _save(fig, path)


def plot_router_usage(usage: np.ndarray, task_names: Sequence[str], path: PathLike,
                      entropy: Optional[Sequence[float]] = None,
                      per_layer: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None) -> Path:
    """Left: each task's (rows) mean gate per head (columns), coloured by its deviation from uniform
    routing u_ti − 1/N on a scale fitted to the largest deviation (so a router that moved 0.004 from
    uniform is visible, and the annotations say how far); optional normalised entropy per task.
    Right (with ``per_layer`` = ``{layer: {"usage": [T, N]}}``): how far each layer's routing of each
    task is from uniform, the total variation ½·Σ_i |u_ti − 1/N| (0: uniform; 1 − 1/N: one head), since
    layers that route oppositely cancel in the mean over layers."""
    m = _matrix(usage, "usage")
    names = _check_tasks(m, task_names, "usage")
    if entropy is not None:
        names = [f"{n}  (H={float(h):.3f})" for n, h in zip(names, entropy)]
    T, N = m.shape
    dev = m - 1.0 / N
    scale = max(float(np.nanmax(np.abs(dev))) if dev.size else 0.0, 1e-3)
    layers = list(per_layer or {})
    fig = Figure(figsize=(max(4.5, 0.8 * N + 3.2) + (min(MAX_INCHES, max(4.0, 0.35 * len(layers) + 2.5)) if layers else 0),
                          min(MAX_INCHES, max(3.2, 0.45 * T + 2.0))))
    ax = fig.add_subplot(1, 2 if layers else 1, 1)
    im = ax.imshow(dev, cmap=_cmap(COS_CMAP), norm=Normalize(-scale, scale), interpolation="nearest", aspect="auto")
    if m.size <= 400:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(dev[i, j]) > 0.6 * scale else "black")
    ax.set_xticks(range(N), [f"head {i}" for i in range(N)], fontsize=8)
    _task_ticks(ax, names, "y")
    ax.set_xlabel("head")
    ax.set_title(f"Router usage: mean gate per head (uniform 1/N = {1 / N:.3f});\ncolour: deviation from uniform, "
                 f"largest {scale:.3g}" + ("\nH: normalised router entropy (1 uniform, 0 one head per token)"
                                            if entropy is not None else ""), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="mean gate − 1/N")
    if layers:
        tv = np.stack([0.5 * np.abs(_matrix(per_layer[l]["usage"], f"per_layer['{l}']") - 1.0 / N).sum(axis=1)
                       for l in layers], axis=1)                      # [T, layers]
        ax2 = fig.add_subplot(1, 2, 2)
        im2 = ax2.imshow(tv, cmap=PROB_CMAP, norm=Normalize(0.0, max(float(tv.max()), 1e-3)),
                         interpolation="nearest", aspect="auto")
        short = [".".join(p for p in l.split(".") if p.isdigit() or p.endswith("proj"))[-14:] or l[-14:]
                 for l in layers]
        ax2.set_xticks(range(len(layers)), short, rotation=90, fontsize=6)
        _task_ticks(ax2, [str(t) for t in task_names], "y")
        ax2.set_title(f"Per layer: distance of the routing from uniform\n(total variation, max {tv.max():.3g}; "
                      f"one head only = {1 - 1 / N:.2f})", fontsize=9)
        fig.colorbar(im2, ax=ax2, fraction=0.046, pad=0.04, label="½ Σ|gate − 1/N|")
    fig.tight_layout()
    return _save(fig, path)


def plot_mtl_mixing(mixing: np.ndarray, task_names: Sequence[str], path: PathLike,
                    lambda_dev: Optional[Sequence[float]] = None) -> Path:
    """MTL-LoRA softmax(w_t/τ) per task (rows) over the up-projections (columns), mean over layers."""
    m = _matrix(mixing, "mixing")
    names = _check_tasks(m, task_names, "mixing")
    if lambda_dev is not None:
        names = [f"{n}  (‖Λ−I‖={float(d):.2f})" for n, d in zip(names, lambda_dev)]
    return _prob_heatmap(
        m, names, path,
        "MTL-LoRA mixing weights softmax(w_t/τ) per task\n"
        "identical rows: tasks share the same up-projections; distinct rows: task-specific heads",
        "up-projection", "mixing weight")


def save_diagnostic_plots(diag, out_dir: PathLike, history: Optional[Sequence[Mapping]] = None,
                          prefix: str = "", figures: bool = True) -> list[Path]:
    """Write every plot that applies to a :class:`rlora.tracking.diagnostics.Diagnostics` into
    ``out_dir`` (``head_similarity.png``: the per-layer summary, with a panel for the learned updates
    where they differ from the raw ones (R-LoRA), and ``head_similarity.json``: every layer's N x N
    matrices; ``interference.png`` (the probed tasks) with ``interference.csv`` (every probed pair's
    cosine) and ``interference_top.csv`` (the pairs behind ``diag/interference/top/NN``),
    ``router_usage.png`` + ``.csv``, ``mtl_mixing.png`` + ``.csv``, and with a history of the task weights
    (one entry per logged step) ``task_weights.png`` + ``task_weights.json``); returns the paths. Figures
    keep a bounded size at any task count (:data:`MAX_INCHES`; per-task labels up to
    :data:`MAX_TICK_LABELS` tasks). ``figures=False`` writes the data files only (.json, .csv: cheap; the
    PNGs are most of a pass's fixed cost, and the training loop leaves them out of passes its time budget
    cannot afford)."""
    out, paths = Path(out_dir), []
    out.mkdir(parents=True, exist_ok=True)
    names = list(diag.task_names)
    if diag.matrices:
        learned = {k: v["learned"] for k, v in diag.matrices.items() if "learned" in v}
        differs = any(not np.array_equal(m, diag.matrices[k]["BA"]) for k, m in learned.items())
        if figures:
            paths.append(plot_head_similarity_summary(diag.matrices, out / f"{prefix}head_similarity.png",
                                                      ("BA", "learned") if differs else ("BA",)))
        data = out / f"{prefix}head_similarity.json"  # the full per-layer N x N grid, as data
        data.write_text(json.dumps(head_similarity_data(diag.matrices)))
        paths.append(data)
    c = np.asarray(diag.interference if diag.interference is not None else np.zeros((0, 0)), dtype=np.float64)
    probed = [t for t in range(c.shape[0]) if np.isfinite(c[t, t])]
    if probed:  # the probed tasks only: at many tasks a pass probes a subset (rlora.tracking.probe_budget)
        sub = c[np.ix_(probed, probed)]
        if figures:
            paths.append(plot_interference(sub, [names[t] for t in probed], out / f"{prefix}interference.png"))
        paths.append(write_csv(out / f"{prefix}interference.csv", ["task_a", "task_b", "cosine"],
                               [(names[a], names[b], f"{c[a, b]:.6f}") for i, a in enumerate(probed)
                                for b in probed[i + 1:]]))
        paths.append(write_csv(out / f"{prefix}interference_top.csv", ["slot", "task_a", "task_b", "cosine"],
                               [(f"{r:02d}", names[a], names[b], f"{v:.6f}")
                                for r, (a, b, v) in enumerate(top_pairs(c), start=1)]))
    if diag.router is not None:
        if figures:
            paths.append(plot_router_usage(diag.router["usage"], diag.router["tasks"],
                                           out / f"{prefix}router_usage.png", diag.router["entropy"],
                                           diag.router.get("per_layer")))
        usage = np.asarray(diag.router["usage"], dtype=np.float64)
        paths.append(write_csv(out / f"{prefix}router_usage.csv",
                               ["task", "entropy"] + [f"head{i}" for i in range(usage.shape[1])],
                               [[t, f"{float(h):.6f}"] + [f"{u:.6f}" for u in row]
                                for t, h, row in zip(diag.router["tasks"], diag.router["entropy"], usage)]))
    if diag.mtl is not None:
        mix = diag.mtl["mixing"]
        labels = names if len(names) == mix.shape[0] else [f"task{k}" for k in range(mix.shape[0])]
        if figures:
            paths.append(plot_mtl_mixing(mix, labels, out / f"{prefix}mtl_mixing.png", diag.mtl["lambda_dev"]))
        paths.append(write_csv(out / f"{prefix}mtl_mixing.csv",
                               ["task", "lambda_dev"] + [f"head{i}" for i in range(mix.shape[1])],
                               [[t, f"{float(d):.6f}"] + [f"{u:.6f}" for u in row]
                                for t, d, row in zip(labels, diag.mtl["lambda_dev"], mix)]))
    if history:
        if figures:
            paths.append(plot_task_weights(history, names, out / f"{prefix}task_weights.png"))
        data = out / f"{prefix}task_weights.json"  # the plotted points: one per logged step
        data.write_text(json.dumps({"tasks": names, "history": [
            {"step": int(h["step"]), "probabilities": [float(p) for p in h["probabilities"]]} for h in history]}))
        paths.append(data)
    return paths


__all__ = ["PlotError", "plot_head_similarity", "plot_head_similarity_summary", "head_similarity_data", "plot_interference", "plot_task_weights", "plot_router_usage",
           "plot_mtl_mixing", "save_diagnostic_plots"]
