"""Per-method tuning without peeking at the dev rows: ``rlora compare --tune KEY=V1,V2,...``.

For one data set and each arm (method, sampler): every candidate setting (the values of one ``--tune``,
or the product of several) trains one cell on the set's carved folder
(:func:`~rlora.compare.datasets.carve_validation`: the training rows less ``val_rows`` per task), with
seed ``trainer.seed + 1000`` (:func:`~rlora.compare.suite.tuning_seed`: ``+ max(seeds, 1000)``; outside the
verdict's seeds ``trainer.seed + 0 .. seeds - 1``, so the winning tuning run is not one of the verdict's own
runs; fixed, so more ``--seeds`` later keep the picks) and ``steps`` optimizer steps (default: the config's),
and is scored on
the carved **validation** rows (``eval.split = val``, every row). The score is the macro mean of the
per-task validation accuracies; the pick is the candidate with the highest score, a tie going to the
candidate listed first. The verdict's cells then train every seed with their arm's pick on the same
carved training rows and are scored on the dev rows: no dev row, and no validation row, is seen by a
run whose result decides anything else.

The training-and-scoring step is a seam (``score`` of :func:`tune_arms`): the default trains real cells
through :class:`~rlora.compare.runner.Comparison` (resumable, keyed like every cell); tests can pass any
``score(overrides) -> {arm: score}``.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from ..config import ConfigError, RunConfig, apply_overrides, validate_config

# keys that define the grid or the verdict itself: not tunable
FIXED = ("adapter.method", "sampler.strategy", "trainer.seed", "eval.split", "eval.max_examples_per_task", "data.path",
         "data.tasks", "trainer.output_dir", "trainer.run_name")
# keys that change which rows a seed's cells train on, or in which order: the verdict pairs two arms' cells of
# one seed by their data order (runner.check_pairing), so two arms picking different values would break it
ORDER = {"trainer.max_steps": "the number of batches drawn", "trainer.num_train_epochs": "the number of batches drawn",
         "trainer.per_device_train_batch_size": "the batch boundaries",
         "trainer.gradient_accumulation_steps": "the batch boundaries", "ray.num_workers": "each rank's batches",
         "data.max_train_examples_per_task": "the training rows", "sampler": "the task sampling"}

# keys that set an arm's parameter count: the equal budget gives LoRA its rank from one config, so arms
# picking different values would no longer be compared at equal budgets
BUDGET = {"adapter.r": "the adapters' rank", "adapter.num_heads": "the number of heads",
          "adapter.target_modules": "which modules are adapted", "adapter.diagonal": "MTL-LoRA's task parameters",
          "model": "the base model"}

Arm = tuple[str, str]
Score = Callable[[list[str]], Mapping[Arm, float]]


def _under(key: str, table: Mapping[str, str]) -> Optional[str]:
    """The reason ``table`` gives for ``key`` or a section above it (``sampler`` covers ``sampler.x``)."""
    return next((why for k, why in table.items() if key == k or key.startswith(k + ".")), None)


def parse_tune(items: Sequence[str], cfg: RunConfig) -> list[tuple[str, list[str]]]:
    """``["trainer.learning_rate=3e-4,1e-3"]`` -> ``[("trainer.learning_rate", ["3e-4", "1e-3"])]``, each value
    checked against the config (one-line :class:`~rlora.config.ConfigError` naming the flag and the fix)."""
    out: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not sep or not key or len(values) < 2:
            raise ConfigError(f"--tune {item!r}: use KEY=V1,V2[,...] with a dotted config key and at least two values, "
                              "e.g. --tune trainer.learning_rate=3e-4,1e-3,3e-3")
        if len(set(values)) != len(values):
            raise ConfigError(f"--tune {item!r} names a value twice")
        if any(key == f or key.startswith(f + ".") for f in FIXED):
            raise ConfigError(f"--tune {key}: {key} defines the comparison itself and cannot be tuned; "
                              "tune another key")
        order = _under(key, ORDER)
        if order is not None:
            raise ConfigError(f"--tune {key}: {key} changes {order}, so arms picking different values would no "
                              "longer train on the same data order and could not be paired; tune another key "
                              "(e.g. trainer.learning_rate) or set it for all arms as an override")
        budget = _under(key, BUDGET)
        if budget is not None:
            raise ConfigError(f"--tune {key}: {key} sets {budget}, so arms picking different values would no "
                              "longer be compared at equal parameter budgets; tune another key (e.g. "
                              "trainer.learning_rate) or set it for all arms as an override")
        if key in [k for k, _ in out]:
            raise ConfigError(f"--tune {key} is given twice: list all its values in one --tune")
        raw = cfg.model_dump(mode="json")
        node = raw
        for part in key.split(".")[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or key.split(".")[-1] not in node:
            raise ConfigError(f"--tune {key}: no such config key (use a dotted key such as trainer.learning_rate)")
        for v in values:
            validate_config(apply_overrides(raw, [f"{key}={v}"]), f"--tune {key}={v}")
        out.append((key, values))
    return out


def candidates(spec: Sequence[tuple[str, Sequence[str]]]) -> list[list[str]]:
    """The override lists of every candidate: the product of the values, first key outermost."""
    keys = [k for k, _ in spec]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*[vals for _, vals in spec])]


def label(overrides: Sequence[str]) -> str:
    return ",".join(overrides)


def pick(scores: Mapping[str, float]) -> str:
    """The label of the highest score; a tie goes to the label listed first."""
    best = max(scores.values())
    return next(k for k, v in scores.items() if v == best)


def at_edge(values: Mapping[str, str], spec: Sequence[tuple[str, Sequence[str]]]) -> dict[str, str]:
    """The picked values that are the smallest or largest of three or more numeric candidates of their key
    (``{key: "smallest" | "largest"}``): the best value may lie outside the range tried. Two candidates
    always put the pick at an edge and non-numeric values have no order, so neither is flagged."""
    out = {}
    for key, vals in spec:
        try:
            nums = sorted(float(v) for v in vals)
            picked = float(values[key])
        except ValueError:
            continue
        if len(set(nums)) >= 3 and picked in (nums[0], nums[-1]):
            out[key] = "smallest" if picked == nums[0] else "largest"
    return out


def edge_phrases(p: Mapping) -> list[str]:
    """``"the largest trainer.learning_rate (3e-3)"`` per key of a pick (a :func:`tune_arms` entry) at the edge
    of its range; none for picks made before ``edge`` was recorded."""
    return [f"the {side} {key} ({p['values'][key]})" for key, side in (p.get("edge") or {}).items()]


def tune_arms(arms: Sequence[Arm], spec: Sequence[tuple[str, Sequence[str]]], score: Score) -> list[dict]:
    """Score every candidate (``score(overrides) -> {arm: validation score}``) and pick per arm.

    Returns one dict per arm: ``{"method", "sampler", "picked": label, "overrides": [..], "values": {key: value},
    "scores": {label: score}, "edge": {key: "smallest" | "largest"}}`` (``edge``: :func:`at_edge`)."""
    cands = candidates(spec)
    scored = {label(c): score(c) for c in cands}
    out = []
    for arm in arms:
        scores = {lb: float(s[arm]) for lb, s in scored.items()}
        best = pick(scores)
        chosen = next(c for c in cands if label(c) == best)
        values = dict(o.split("=", 1) for o in chosen)
        out.append({"method": arm[0], "sampler": arm[1], "picked": best, "overrides": chosen,
                    "values": values, "scores": scores, "edge": at_edge(values, spec)})
    return out


def tuning_config(cfg: RunConfig, overrides: Sequence[str], steps: Optional[int]) -> RunConfig:
    """``cfg`` scored on every validation row, ``steps`` steps if given, no diagnostics probes (a tuning cell
    is only scored), then the candidate's overrides."""
    extra = ([f"trainer.max_steps={steps}"] if steps else []) + ["eval.split=val", "eval.max_examples_per_task=null",
                                                                 "diagnostics.enabled=false"]
    return validate_config(apply_overrides(cfg.model_dump(mode="json"), [*extra, *overrides]), "--tune")


def folder_name(overrides: Sequence[str]) -> str:
    """A file-system-safe folder name for a candidate."""
    return re.sub(r"[^A-Za-z0-9._=+,-]", "_", label(overrides))[:120] or "default"


def comparison_score(cfg: RunConfig, arms: Sequence[Arm], baseline: str, budget: str, out: Path, steps: Optional[int],
                     local: bool, verbose: bool) -> Score:
    """The default ``score``: one resumable cell per arm (``cfg``'s seed, the tuning seed) under ``out/<candidate>``, scored as
    the macro mean of its validation accuracies."""
    from .runner import Comparison

    def score(overrides: list[str]) -> dict[Arm, float]:
        c = tuning_config(cfg, overrides, steps)
        comparison = Comparison(c, list(arms), 1, baseline, budget, out / folder_name(overrides), local=local,
                                name=f"tune-{folder_name(overrides)}", verbose=verbose)
        records = comparison.records()
        comparison.finish_parent()  # its cells are scored here, never reported: end its MLflow parent run
        return {(r["method"], r["sampler"]): sum(r["accuracy"].values()) / len(r["accuracy"]) for r in records}

    return score
