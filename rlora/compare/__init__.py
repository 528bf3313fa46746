"""Statistics and report of a (method, sampler, seed) comparison grid.

``cells`` (one trained and evaluated model each, see :mod:`rlora.compare.cells`) go into
:func:`summarize`; its summary feeds :func:`markdown_table`, :func:`forest_plot` and :func:`to_json`.
Differences between arms are paired (same seeds, same dev rows) with intervals from a hierarchical
bootstrap (:mod:`rlora.compare.bootstrap`).
"""
from .cells import CompareError, check_cells, group_arms
from .report import forest_plot, markdown_table, to_json
from .stats import VERDICTS, arm_summary, paired_difference, paired_differences, seeds_needed, verdict
from .summary import summarize

__all__ = [
    "CompareError",
    "VERDICTS",
    "arm_summary",
    "check_cells",
    "forest_plot",
    "group_arms",
    "markdown_table",
    "paired_difference",
    "paired_differences",
    "seeds_needed",
    "summarize",
    "to_json",
    "verdict",
]
