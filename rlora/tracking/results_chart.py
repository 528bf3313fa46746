"""The run's before/after picture: per-task dev accuracy of the base model and of the trained adapter."""
from __future__ import annotations

from pathlib import Path


def before_after_chart(summary: dict, path: Path, title: str = "") -> Path | None:
    """Grouped bars per task (accuracy before and after training, in %) plus the mean; ``None`` when the
    run has no evaluation after training."""
    after = summary.get("results_after") or {}
    if not after:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    before = summary.get("results_before") or {}
    tasks = list(after)
    a = [100 * after[t]["accuracy"] for t in tasks]
    b = [100 * before[t]["accuracy"] if t in before else np.nan for t in tasks]
    tasks, a, b = tasks + ["mean"], a + [float(np.mean(a))], b + [float(np.nanmean(b)) if before else np.nan]
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(tasks) + 2), 4.2))
    if before:
        ax.bar(x - 0.2, b, 0.4, label="before training", color="#9aa5b1")
    ax.bar(x + (0.2 if before else 0.0), a, 0.4, label="after training", color="#2f6fb0")
    for xi, v in zip(x, a):
        ax.text(xi + (0.2 if before else 0.0), v + 1, f"{v:.0f}", ha="center", fontsize=8)
    ax.set_xticks(x, tasks, rotation=20, ha="right")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or "per-task dev accuracy", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
