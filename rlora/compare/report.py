"""The summary of :func:`summarize` as a markdown table, a forest plot (PNG) and a JSON dict.

All three read only plain keys of the summary, so they work as well on a summary read back from the
JSON file. Accuracies are printed in percent and differences in points (1 point = 0.01).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .cells import CompareError
from .summary import summarize
from .tune import edge_phrases

__all__ = ["forest_plot", "markdown_table", "pooled_forest_plot", "pooled_markdown", "summarize", "to_json"]

PathLike = Union[str, Path]
VERDICT_COLOURS = {"better": "#1a9850", "worse": "#d73027", "no detectable difference": "#555555"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _pts(x: float) -> str:
    points = round(100 * x, 1)
    return f"{points if points != 0 else 0.0:+.1f}"       # no "-0.0"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _row(values: Sequence[Any]) -> str:
    return "| " + " | ".join(_cell(v) for v in values) + " |"


def _statistic_name(statistic: str) -> str:
    return {"mean": "macro mean", "worst": "worst task"}.get(statistic, f"task {statistic}")


def _results(comparison: Mapping, statistics: Sequence[str]) -> list[dict]:
    out = []
    for s in statistics:
        result = comparison[s] if s in ("mean", "worst") else comparison["tasks"].get(s)
        if result is None:
            raise CompareError(f"unknown statistic {s!r}: use 'mean', 'worst' or one of the tasks "
                               f"{list(comparison['tasks'])}")
        out.append(result)
    return out


def _results_of_all(comparisons: Sequence[Mapping], statistic: str) -> list[dict]:
    return [_results(c, [statistic])[0] for c in comparisons]


def _comparison_name(comparison: Mapping) -> str:
    return comparison["label"] + ("" if comparison["seeds_resampled"] else " *")


# --------------------------------------------------------------------------------------------
def _arm_table(summary: Mapping) -> list[str]:
    tasks = summary["tasks"]
    lines = ["**Dev accuracy per arm** (%, mean over seeds; worst = the lowest task)", "",
             _row(["method", "sampler", "seeds", *tasks, "mean", "worst"]),
             _row(["---", "---", "---:", *["---:"] * len(tasks), "---:", "---"])]
    for arm in summary["arms"]:
        lines.append(_row([arm["method"], arm["sampler"], arm["n_seeds"],
                           *[_pct(arm["tasks"][t]["acc"]) for t in tasks], _pct(arm["mean"]),
                           f"{_pct(arm['worst'])} ({arm['worst_task']})"]))
    return lines


def _difference_table(summary: Mapping, per_task: bool) -> list[str]:
    level = f"{100 * summary['level']:g} %"
    statistics = ["mean", "worst", *(summary["tasks"] if per_task else [])]
    lines = [f"**Paired differences A − B** (points; {level} percentile interval of a paired bootstrap of "
             f"seeds and dev rows, crossed, {summary['n_boot']} resamples)", "",
             _row(["comparison (A vs B)", "statistic", "seeds", "A", "B", "A − B", f"{level} CI", "verdict",
                   "seeds for ±1 pt"]),
             _row(["---", "---", "---:", "---:", "---:", "---:", "---", "---", "---:"])]
    for comparison in summary["comparisons"]:
        for s, r in zip(statistics, _results(comparison, statistics)):
            need = r["seeds_to_resolve_1pt"]
            lines.append(_row([_comparison_name(comparison), _statistic_name(s), comparison["n_seeds"],
                               _pct(r["a"]), _pct(r["b"]), _pts(r["diff"]), f"[{_pts(r['lo'])}, {_pts(r['hi'])}]",
                               r["verdict"], "–" if need is None else need]))
    return lines


def _footnotes(summary: Mapping) -> list[str]:
    notes = []
    if any(not c["seeds_resampled"] for c in summary["comparisons"]):
        notes.append("\\* one seed: only dev rows were resampled, so the interval leaves out seed-to-seed variance.")
    if any(c[s]["seeds_to_resolve_1pt"] is not None for c in summary["comparisons"] for s in ("mean", "worst")):
        notes.append("Seeds for ±1 pt: seeds at which the interval's half-width would be 1 point, assuming it "
                     "shrinks as 1/sqrt(seeds) (seed variance dominating).")
    for c in summary["comparisons"]:
        for side in ("a", "b"):
            if c["dropped_seeds"][side]:
                arm = c[side]
                notes.append(f"{c['label']}: seeds {c['dropped_seeds'][side]} of {arm['method']}/{arm['sampler']} "
                             "have no partner and were left out.")
    notes += list(summary.get("notes", []))
    return notes


def _budget_lines(budget: Mapping) -> list[str]:
    ranks = ", ".join(f"{arm} {r}" for arm, r in budget["ranks"].items())
    lora = budget.get("lora_rank")
    lead = f"**Budget** `{budget['mode']}`: " + (f"LoRA rank {lora}; " if lora is not None else "")
    return [lead + f"ranks {ranks}."]


def _tuning_table(tuning: Mapping) -> list[str]:
    """The picks of ``--tune`` (see :mod:`rlora.compare.tune`): one row per arm, a column per candidate."""
    picks = tuning["picks"]
    labels = list(picks[0]["scores"]) if picks else []
    steps = f"{tuning['steps']} step" + ("" if tuning["steps"] == 1 else "s")
    lines = [f"**Tuning** (per arm: one cell per candidate, seed {tuning['seed']}, {steps}, scored on "
             f"{tuning['val_rows']} validation rows per task carved from the training rows; macro-mean validation "
             "accuracy in %; the verdict's cells train on the same carved rows with the pick)", "",
             _row(["method", "sampler", *labels, "pick"]), _row(["---", "---", *["---:"] * len(labels), "---"])]
    for p in picks:
        lines.append(_row([p["method"], p["sampler"], *[_pct(p["scores"][lb]) for lb in labels], p["picked"]]))
    edges = [f"{p['method']}/{p['sampler']} {phrase}" for p in picks for phrase in edge_phrases(p)]
    if edges:
        lines += ["", f"**Picks at the edge of the range tried:** {'; '.join(edges)}. The best value may lie beyond "
                      "it: widen the range to know whether these arms were tuned."]
    return lines


def markdown_table(summary: Mapping, per_task: bool = False) -> str:
    """Markdown: one row per arm (per-task accuracy, mean, worst), then one row per comparison and
    statistic (macro mean and worst task; every task too when ``per_task``) with the difference in
    points, its interval and the verdict, then footnotes."""
    lines = _arm_table(summary)
    if summary["comparisons"]:
        lines += ["", *_difference_table(summary, per_task)]
    if summary.get("budget"):
        lines += ["", *_budget_lines(summary["budget"])]
    if summary.get("tuning"):
        lines += ["", *_tuning_table(summary["tuning"])]
    for note in _footnotes(summary):
        lines += ["", note]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
def forest_plot(summary: Mapping, path: PathLike, statistics: Sequence[str] = ("mean", "worst")) -> Path:
    """Write a PNG forest plot and return its path: one panel per statistic, one row per comparison
    (top to bottom in summary order), a dot at the difference in points, a whisker over its interval,
    coloured by verdict, and a vertical line at 0. Raises :class:`CompareError` when the summary has
    no comparison."""
    comparisons = summary["comparisons"]
    if not comparisons:
        raise CompareError("the summary has no comparison to plot: it needs the baseline and at least one more arm")
    statistics = list(statistics)
    if not statistics:
        raise CompareError("statistics is empty: pass e.g. ['mean', 'worst'] or task names")
    rows = np.arange(len(comparisons))[::-1]
    fig = Figure(figsize=(4.2 * len(statistics) + 2.5, 1.5 + 0.42 * len(comparisons)))
    axes = fig.subplots(1, len(statistics), sharey=True, squeeze=False)[0]
    for k, (ax, s) in enumerate(zip(axes, statistics)):
        for y, r in zip(rows, _results_of_all(comparisons, s)):
            colour = VERDICT_COLOURS[r["verdict"]]
            ax.hlines(y, 100 * r["lo"], 100 * r["hi"], color=colour, linewidth=2)
            ax.plot([100 * r["diff"]], [y], "o", color=colour, markersize=6)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(_statistic_name(s), fontsize=10)
        ax.set_xlabel("A − B (points)")
        ax.grid(axis="x", alpha=0.3)
        if k == 0:
            ax.set_yticks(rows, [_comparison_name(c) for c in comparisons])
    ax.set_ylim(-0.7, len(comparisons) - 0.3)
    level = f"{100 * summary['level']:g} %"
    title = f"Paired differences A − B with {level} bootstrap intervals (green: better, red: worse, grey: neither)"
    if any(not c["seeds_resampled"] for c in comparisons):
        title += "\n* one seed: dev rows resampled, seed-to-seed variance left out"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110)
    return path


# --------------------------------------------------------------------------------------------
def pooled_markdown(pooled: Mapping) -> str:
    """Markdown of :func:`~rlora.compare.pooled.pool_sets`: each arm's macro mean per set and pooled, then
    per comparison one row per set and the pooled row (difference in points, interval, verdict), with the
    set weights and the heterogeneity of the per-set differences (Cochran's Q, its p-value, I²)."""
    sets, level = pooled["sets"], f"{100 * pooled['level']:g} %"
    weights = ", ".join(f"{k} {v:.3g}" for k, v in pooled["weights"].items())
    lines = [f"**Dev accuracy per arm and set** (%, macro mean over the set's tasks, mean over seeds; pooled: "
             f"weights {weights})", "", _row(["method", "sampler", *sets, "pooled"]),
             _row(["---", "---", *["---:"] * len(sets), "---:"])]
    for arm in pooled["arms"]:
        lines.append(_row([arm["method"], arm["sampler"], *[_pct(arm["sets"][k]) if k in arm["sets"] else "–"
                                                           for k in sets], _pct(arm["mean"])]))
    lines += ["", f"**Paired differences A − B pooled over sets** (points; {level} percentile interval of a "
              f"stratified bootstrap: within each set seeds and dev rows, crossed; {pooled['n_boot']} "
              "resamples)", "", _row(["comparison (A vs B)", "set", "weight", "seeds", "A", "B", "A − B",
                                       f"{level} CI", "verdict"]),
              _row(["---", "---", "---:", "---:", "---:", "---:", "---:", "---", "---"])]
    for c in pooled["comparisons"]:
        p = c["pooled"]
        for name, r in p["sets"].items():
            lines.append(_row([c["label"], name, f"{r['weight']:.3g}", r["n_seeds"], _pct(r["a"]), _pct(r["b"]),
                               _pts(r["diff"]), f"[{_pts(r['lo'])}, {_pts(r['hi'])}]", r["verdict"]]))
        tag = " (sets disagree)" if p["sets_disagree"] else ""
        lines.append(_row([c["label"], "**pooled**", "1", sum(r["n_seeds"] for r in p["sets"].values()),
                           _pct(p["a"]), _pct(p["b"]), f"**{_pts(p['diff'])}**", f"[{_pts(p['lo'])}, {_pts(p['hi'])}]",
                           p["verdict"] + tag]))
    het = [c for c in pooled["comparisons"] if c["pooled"]["heterogeneity"]["q"] is not None]
    if het:
        lines += ["", "Heterogeneity of the per-set differences (Cochran's Q on the bootstrap variances, "
                  "chi-square p-value, I²): " + "; ".join(
                      f"{c['label']}: Q {h['q']:.2f} (df {h['df']}, p {h['p']:.3f}), I² {100 * h['i2']:.0f} %"
                      for c in het for h in [c["pooled"]["heterogeneity"]]) + "."]
    for note in pooled.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def pooled_forest_plot(pooled: Mapping, path: PathLike) -> Path:
    """PNG forest plot of :func:`~rlora.compare.pooled.pool_sets`: one panel per comparison, one row per set
    (dot and interval) and the pooled row (a diamond) at the bottom, coloured by verdict; a line at 0.

    Set ``i`` of ``pooled["sets"]`` (of ``S``) is always drawn at ``y = S - i`` and the pooled row at ``y = 0``
    in every panel, so a comparison without cells on some set leaves that row empty."""
    comparisons = pooled["comparisons"]
    if not comparisons:
        raise CompareError("the pooled summary has no comparison to plot: it needs the baseline and another method")
    rows = len(pooled["sets"]) + 1
    fig = Figure(figsize=(4.2 * len(comparisons) + 2.5, 1.6 + 0.45 * rows))
    axes = fig.subplots(1, len(comparisons), sharey=True, squeeze=False)[0]
    names = [*pooled["sets"], "pooled"]
    ys = dict(zip(names, range(rows - 1, -1, -1)))
    for k, (ax, c) in enumerate(zip(axes, comparisons)):
        p = c["pooled"]
        entries = [(name, r, "o") for name, r in p["sets"].items()] + [("pooled", p, "D")]
        for name, r, marker in entries:
            if name not in ys:
                raise CompareError(f"comparison {c['label']} has a line for set {name!r}, which is not among the "
                                   f"pooled sets {list(pooled['sets'])}")
            y, colour = ys[name], VERDICT_COLOURS[r["verdict"]]
            ax.hlines(y, 100 * r["lo"], 100 * r["hi"], color=colour, linewidth=2 if marker == "o" else 3.5)
            ax.plot([100 * r["diff"]], [y], marker, color=colour, markersize=6 if marker == "o" else 9)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(c["label"], fontsize=10)
        ax.set_xlabel("A − B (points)")
        ax.grid(axis="x", alpha=0.3)
        if k == 0:
            ax.set_yticks(list(ys.values()), names)
    ax.set_ylim(-0.7, rows - 0.3)
    level = f"{100 * pooled['level']:g} %"
    fig.suptitle(f"Per set and pooled (diamond) paired differences with {level} stratified bootstrap intervals",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110)
    return path


# --------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset, np.ndarray)):
        return [_plain(v) for v in (sorted(value, key=str) if isinstance(value, (set, frozenset)) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def to_json(summary: Mapping) -> dict:
    """A copy of the summary made of JSON types only: numpy scalars and arrays become numbers and
    lists, tuples and sets lists, non-finite floats None, keys strings, anything else its ``str``
    (e.g. a path in an arm's ``params``)."""
    return _plain(summary)
