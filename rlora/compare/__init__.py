"""Statistics and report of a (method, sampler, seed) comparison grid.

``cells`` (one trained and evaluated model each, see :mod:`rlora.compare.cells`) go into
:func:`summarize`; its summary feeds :func:`markdown_table`, :func:`forest_plot` and :func:`to_json`.
Differences between arms are paired (same seeds, same dev rows) with intervals from a two-level
bootstrap of seeds and dev rows (:mod:`rlora.compare.bootstrap`); over several data sets, :func:`pool_sets` pools them
(:mod:`rlora.compare.pooled`) for :func:`pooled_markdown` and :func:`pooled_forest_plot`.
"""
from .cells import CompareError, check_cells, group_arms
from .pooled import pool_sets, pooled_difference
from .report import forest_plot, markdown_table, pooled_forest_plot, pooled_markdown, to_json
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
    "pool_sets",
    "pooled_difference",
    "pooled_forest_plot",
    "pooled_markdown",
    "seeds_needed",
    "summarize",
    "to_json",
    "verdict",
]
