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

import json
import shlex
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import yaml

from .metric_names import unique_segments

CONFIG_ARTIFACT = "config.yaml"
SOURCE_ARTIFACT = "config_source.yaml"
COMMAND_TAG = "rlora.command"
TRAINING_RECORD = "training_run.json"


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


def write_training_record(adapter_dir, config: Mapping, mlflow_run_id: Optional[str], tracking_uri: Optional[str],
                          step: int) -> Path:
    """``adapter_dir/training_run.json``: the run that made the adapter (its resolved config, MLflow run
    id and tracking URI, last step). ``rlora evaluate`` takes its prompt settings from it and
    ``rlora register`` links the model version to that MLflow run."""
    from .mlflow_tracker import _redact_tree

    path = Path(adapter_dir) / TRAINING_RECORD
    path.write_text(json.dumps({"mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri, "global_step": step,
                                "config": _redact_tree(dict(config))}, indent=1))  # secrets as "***"
    return path


def read_training_record(adapter_dir) -> Optional[dict]:
    """The :func:`write_training_record` contents, or None when the adapter has none (or it is unreadable)."""
    path = Path(adapter_dir) / TRAINING_RECORD
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


EVAL_DEFAULTS = {"max_length": 256, "use_chat_template": True, "length_normalized": False, "max_examples": None}


def eval_settings(record: Optional[Mapping], flags: Mapping[str, object]) -> tuple[dict, dict]:
    """(settings, where each came from) for scoring an adapter as its training run did.

    For each of ``max_length`` (``data.max_length``), ``use_chat_template`` (``data.use_chat_template``),
    ``length_normalized`` (``eval.length_normalized``) and ``max_examples`` (``eval.max_examples_per_task``):
    the flag when it is not None, else the training run's value from ``record`` (a
    :func:`read_training_record`), else :data:`EVAL_DEFAULTS`. ``templates`` ({task: prompt template})
    always come from the run's ``data.tasks[].prompt_template``. Sources are ``"flag"``, ``"run"`` or
    ``"default"``."""
    cfg = (record or {}).get("config") or {}
    data, ev = cfg.get("data") or {}, cfg.get("eval") or {}
    from_run = {"max_length": data.get("max_length"), "use_chat_template": data.get("use_chat_template"),
                "length_normalized": ev.get("length_normalized"),
                "max_examples": ev.get("max_examples_per_task") if "max_examples_per_task" in ev else "unset"}
    settings, source = {}, {}
    for key, default in EVAL_DEFAULTS.items():
        if flags.get(key) is not None:
            settings[key], source[key] = flags[key], "flag"
        elif cfg and from_run[key] != "unset" and (from_run[key] is not None or key == "max_examples"):
            settings[key], source[key] = from_run[key], "run"
        else:
            settings[key], source[key] = default, "default"
    settings["templates"] = {t["name"]: t.get("prompt_template") for t in data.get("tasks") or []
                             if isinstance(t, dict) and t.get("prompt_template")}
    return settings, source


def describe_eval_settings(settings: Mapping, source: Mapping, record_path: Optional[str]) -> str:
    """One console line: the scoring settings and where each came from."""
    def show(key: str, text: str) -> str:
        return f"{text} ({source[key]})"

    parts = [show("max_length", f"max_length {settings['max_length']}"),
             show("use_chat_template", f"chat template {'on' if settings['use_chat_template'] else 'off'}"),
             show("length_normalized", f"length-normalized {'on' if settings['length_normalized'] else 'off'}"),
             show("max_examples", f"rows per task {settings['max_examples'] if settings['max_examples'] is not None else 'all'}")]
    if settings.get("templates"):
        parts.append(f"prompt templates of {', '.join(settings['templates'])} (run)")
    where = f"run = the adapter's training run ({record_path})" if record_path else "no training run recorded"
    return f"[rlora] scoring with {', '.join(parts)}; {where}; flags override"


def resolved_config_yaml(config: Mapping) -> str:
    """The config the run used (every default filled in, overrides applied), as YAML."""
    return yaml.safe_dump(dict(config), sort_keys=False)


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command as typed, shell-quoted (``rlora train CFG k=v ...``)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(("/rlora", "rlora")):
        argv[0] = "rlora"
    return shlex.join(argv)


__all__ = ["CONFIG_ARTIFACT", "SOURCE_ARTIFACT", "COMMAND_TAG", "TRAINING_RECORD", "eval_metrics",
           "resolved_config_yaml", "command_line", "write_training_record", "read_training_record", "EVAL_DEFAULTS",
           "eval_settings", "describe_eval_settings"]
