"""What a training run writes into its MLflow record besides the step metrics: evaluation metric
names, the resolved config and the command line.

Evaluation metrics share one key per quantity and task, so MLflow's run page (which groups charts by
the name up to its last ``/`` and titles each with the rest) shows before and after training on one
chart: the base model's results at step 0, mid-run evaluations at their steps, the final results at
the last step::

    eval/accuracy/<task>   eval/accuracy/mean   (macro mean over the tasks: the console's "mean" row)
    eval/loss/<task>       eval/loss/mean       (per-token NLL of the gold answer on the dev rows)
"""
from __future__ import annotations

import shlex
import sys
from typing import Mapping, Optional, Sequence

import yaml

from .metric_names import unique_segments

CONFIG_ARTIFACT = "config.yaml"
SOURCE_ARTIFACT = "config_source.yaml"
COMMAND_TAG = "rlora.command"


def eval_metrics(results: Optional[Mapping[str, Mapping]]) -> dict[str, float]:
    """{metric name: value} of per-task dev results ``{task: {"accuracy", "loss", ...}}`` (names above);
    the means are over the tasks that have the value."""
    if not results:
        return {}
    tasks = list(results)
    out: dict[str, float] = {}
    for quantity in ("accuracy", "loss"):
        vals = []
        for task, seg in zip(tasks, unique_segments(tasks)):
            v = results[task].get(quantity)
            if v is not None and v == v:
                out[f"eval/{quantity}/{seg}"] = float(v)
                vals.append(float(v))
        if vals:
            out[f"eval/{quantity}/mean"] = sum(vals) / len(vals)
    return out


def resolved_config_yaml(config: Mapping) -> str:
    """The config the run used (every default filled in, overrides applied), as YAML."""
    return yaml.safe_dump(dict(config), sort_keys=False)


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command as typed, shell-quoted (``rlora train CFG k=v ...``)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(("/rlora", "rlora")):
        argv[0] = "rlora"
    return shlex.join(argv)


__all__ = ["CONFIG_ARTIFACT", "SOURCE_ARTIFACT", "COMMAND_TAG", "eval_metrics", "resolved_config_yaml",
           "command_line"]
