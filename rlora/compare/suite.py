"""``rlora compare`` over one or several data sets, with optional per-arm tuning: the whole verb.

    for each set k (``--sets``; default: the config's ``data.path``, reported in OUT as before)
        [--tune]  carve a validation split from its training rows (OUT/data/<set>.val<R>-s<seed>)
                  -> one cell per arm and candidate (seed trainer.seed + 1000, outside the verdict's seeds;
                     --tune-steps) in OUT/<set>/tune/<candidate>
                  -> per arm the candidate with the best validation score
        the set's grid, every arm with its pick        -> OUT/<set>/{cells, compare.md, compare.json, forest.png}
    with several sets: pooled paired differences      -> OUT/pooled.md, pooled.json, forest_pooled.png

Set ``k`` (from 0 in ``--sets`` order) bootstraps with seed ``trainer.seed + k``, so its lines in the pooled
report are exactly its own report's (:mod:`rlora.compare.pooled`). Every cell is resumable as before
(a cell's key is its config and its data's contents; derived data folders are rebuilt byte for byte).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Sequence

from ..config import ConfigError, RunConfig
from .datasets import carve_validation, resolve_sets
from .runner import Comparison, _write_json
from .tune import Score, comparison_score, edge_phrases, tune_arms

Arm = tuple[str, str]
POOLED_STATE = "pooled_state.json"  # OUT/: the pooled report's MLflow run id, reused by a re-run of the same sets


TUNING_SEED_OFFSET = 1000


def tuning_seed(seed: int, seeds: int) -> int:
    """The tuning cells' ``trainer.seed``: ``seed + max(seeds, 1000)``, outside the verdict's seeds
    ``seed .. seed + seeds - 1``. Were it one of them, the winning tuning run would be that verdict cell's own run
    (same initialisation and data order), and its lucky draw would carry over to the dev score. It does not move
    with ``--seeds`` (below 1,000), so re-running a comparison with more seeds keeps its tuning cells and picks."""
    return seed + max(seeds, TUNING_SEED_OFFSET)


class Suite:
    """``sets``: ``--sets`` names (None: the config's data); ``tune``: parsed ``--tune`` specs (empty: none);
    ``score``: a stand-in for the tuning cells' training and scoring (``set name, cfg -> Score``), for tests;
    ``set_index``: each set's ``k`` (its bootstrap seed ``trainer.seed + k``) when it is not the set's position in
    ``sets`` -- a suite run on some of its sets passes each set's index in the whole suite, so a set's report
    is the same whichever sets a run trains."""

    def __init__(self, cfg: RunConfig, arms: list[Arm], seeds: int, baseline: str, budget: str, out: Path,
                 sets: Optional[Sequence[str]] = None, tune: Sequence[tuple[str, list[str]]] = (),
                 tune_steps: Optional[int] = None, val_rows: int = 100, local: bool = False, n_boot: int = 2000,
                 verbose: bool = False, score=None, set_index: Optional[dict[str, int]] = None):
        self.cfg, self.arms, self.seeds, self.baseline, self.budget = cfg, arms, seeds, baseline, budget
        self.out, self.sets, self.tune, self.tune_steps, self.val_rows = out, sets, list(tune), tune_steps, val_rows
        self.local, self.n_boot, self.verbose, self.score = local, n_boot, verbose, score
        self.set_index = set_index

    def folders(self) -> dict[str, Path]:
        if not self.sets:
            if not self.cfg.data.path:
                raise ConfigError("data.path is not set: point it at a folder with one sub-folder per task, "
                                  "or use --sets")
            own = next((t for t in self.cfg.data.tasks if t.path or t.hf_source), None)
            if self.tune and own is not None:
                field = "path" if own.path else "hf_source"
                raise ConfigError(f"data.tasks: task {own.name} has its own {field}, but --tune carves its "
                                  f"validation rows from the task folders of data.path ({self.cfg.data.path}) "
                                  f"only: put the task's folder there and drop its {field}, or compare without --tune")
            return {"": Path(self.cfg.data.path)}
        if self.cfg.data.tasks:
            raise ConfigError("--sets replaces data.path, but the config lists data.tasks: remove data.tasks "
                              "(every task folder of each set is used)")
        root = Path(self.cfg.data.path).expanduser().resolve().parent if self.cfg.data.path else None
        return resolve_sets(list(self.sets), root, self.out / "data", self.val_rows if self.tune else None)

    def run(self) -> dict:
        """Every set's report, then (several sets) the pooled one. Returns ``{"sets": {name: summary},
        "pooled": pooled summary or None}``."""
        folders = self.folders()
        summaries, cells = {}, {}
        for k, (name, folder) in enumerate(folders.items()):
            if len(folders) > 1:
                print(f"[rlora] compare: data set {name} ({k + 1}/{len(folders)}): {folder}", flush=True)
            summary, records = self._one_set(name, folder, self.set_index[name] if self.set_index else k)
            summaries[name or folder.name], cells[name or folder.name] = summary, records
        pooled = self._pool(cells) if len(folders) > 1 else None
        return {"sets": summaries, "pooled": pooled}

    def _one_set(self, name: str, folder: Path, k: int) -> tuple[dict, list[dict]]:
        cfg = self.cfg.model_copy(deep=True)
        cfg.data.path = str(folder)
        out = self.out / name if name else self.out
        overrides, tuning = None, None
        if self.tune:
            cfg, tcfg = self.tuning_configs(name, folder)
            picks = self.tuned(name, tcfg, self.tune, self.tune_steps, "tune")
            overrides = {(p["method"], p["sampler"]): p["overrides"] for p in picks}
            tuning = {"keys": [k_ for k_, _ in self.tune], "seed": tcfg.trainer.seed, "val_rows": self.val_rows,
                      "steps": self.tune_steps or cfg.trainer.max_steps, "data": cfg.data.path, "picks": picks}
            for p in picks:
                print(f"[rlora] compare: tuned {p['method']}/{p['sampler']}: {p['picked']} (validation "
                      + ", ".join(f"{lb} {100 * v:.1f}" for lb, v in p["scores"].items()) + ")"
                      + "".join(f"; {phrase} is at the edge of the range: the best may lie beyond it"
                                for phrase in edge_phrases(p)),
                      flush=True)
        comparison = Comparison(cfg, self.arms, self.seeds, self.baseline, self.budget, out, local=self.local,
                                n_boot=self.n_boot, verbose=self.verbose, overrides=overrides,
                                rng_seed=self.cfg.trainer.seed + k, tuning=tuning,
                                name=name or None)
        summary = comparison.run()
        return summary, comparison.cell_records

    def tuning_configs(self, name: str, folder: Path) -> tuple[RunConfig, RunConfig]:
        """The set's verdict config on its carved training rows, and its tuning config (the same, with the
        tuning seed). The carved folder is rebuilt byte for byte when missing."""
        cfg = self.cfg.model_copy(deep=True)
        seed = cfg.trainer.seed
        carved = carve_validation(folder, self.out / "data" / f"{name or folder.name}.val{self.val_rows}-s{seed}",
                                  self.val_rows, seed)
        cfg.data.path = str(carved)
        tcfg = cfg.model_copy(deep=True)
        tcfg.trainer.seed = tuning_seed(seed, self.seeds)
        return cfg, tcfg

    def tuned(self, name: str, tcfg: RunConfig, spec: Sequence[tuple[str, list[str]]], steps: Optional[int],
              folder: str) -> list[dict]:
        """Per arm, the validation score of every candidate of ``spec`` trained ``steps`` steps (None: the
        config's) in ``OUT/<set>/<folder>/<candidate>``, and the pick (:func:`~rlora.compare.tune.tune_arms`)."""
        out = (self.out / name if name else self.out) / folder
        score: Score = (self.score(name, tcfg) if self.score else
                        comparison_score(tcfg, self.arms, self.baseline, self.budget, out, steps, self.local,
                                         self.verbose))
        return tune_arms(self.arms, spec, score)

    def _pool(self, cells: dict[str, list[dict]]) -> dict:
        from .pooled import pool_sets
        from .report import pooled_forest_plot, pooled_markdown, to_json

        samplers = list(dict.fromkeys(s for _, s in self.arms))
        pooled = pool_sets(cells, self.baseline, "proportional" if "proportional" in samplers else samplers[0],
                           n_boot=self.n_boot, seed=self.cfg.trainer.seed, set_index=self.set_index)
        text = pooled_markdown(pooled)
        (self.out / "pooled.md").write_text(text)
        _write_json(self.out / "pooled.json", to_json(pooled))
        files = ["pooled.md", "pooled.json"]
        if pooled["comparisons"]:
            pooled_forest_plot(pooled, self.out / "forest_pooled.png")
            files.append("forest_pooled.png")
        record = json.loads(json.dumps(to_json(pooled)))
        run_id = log_pooled(self.cfg, self.out, record, [self.out / f for f in files])
        print(text, flush=True)
        print(f"[rlora] compare: pooled report in {self.out} ({', '.join(files)})"
              + (f"; MLflow run {run_id}" if run_id else ""), flush=True)
        return record


def metric_part(name: str) -> str:
    """A set's name as a part of an MLflow metric or tag key: characters MLflow refuses become ``_``; a set
    named ``pooled`` becomes ``set_pooled`` (``pooled`` is the pooled line's own key)."""
    part = re.sub(r"[^\w.\- ]", "_", name)
    return "set_pooled" if part == "pooled" else part


def pooled_metrics(pooled: dict) -> dict[str, float]:
    """Per comparison, every set's and the pooled difference with its interval, and every arm's accuracy:
    ``diff/<a>_vs_<b>/<set | pooled>[_lo | _hi]`` and ``accuracy/<arm>/<set | pooled>`` (fractions, as the
    per-set parent runs log them; set names through :func:`metric_part`)."""
    out = {}
    for c in pooled["comparisons"]:
        a, b, p = c["a"], c["b"], c["pooled"]
        key = f"diff/{a['method']}-{a['sampler']}_vs_{b['method']}-{b['sampler']}"
        for where, r in [*((metric_part(s), r) for s, r in p["sets"].items()), ("pooled", p)]:
            out.update({f"{key}/{where}": r["diff"], f"{key}/{where}_lo": r["lo"], f"{key}/{where}_hi": r["hi"]})
    for arm in pooled["arms"]:
        key = f"accuracy/{arm['method']}-{arm['sampler']}"
        out.update({f"{key}/{metric_part(s)}": v for s, v in arm["sets"].items()})
        out[f"{key}/pooled"] = arm["mean"]
    return out


def _pooled_run(uri: str, exp_id: str, out: Path, pooled: dict) -> str:
    """A new ``compare-pooled`` run, tagged with the sets, methods, baseline and each set's parent run."""
    from ..tracking import mlflow_tracker

    parents = {s: json.loads((out / s / "compare_state.json").read_text()).get("parent_run_id", "")
               for s in pooled["sets"] if (out / s / "compare_state.json").is_file()}
    tags = {"rlora.compare": "pooled", "sets": ",".join(pooled["sets"]), "methods": ",".join(pooled["methods"]),
            "baseline": pooled["baseline"]["method"], "weighting": pooled["weighting"],
            **{f"parent_run.{metric_part(s)}": rid for s, rid in parents.items()}}
    try:
        return mlflow_tracker.client(uri).create_run(exp_id, run_name="compare-pooled", tags=tags).info.run_id
    except Exception as e:  # noqa: BLE001 - a refused request becomes rlora's one-line error
        raise mlflow_tracker._unreachable(uri, e) from None


def log_pooled(cfg: RunConfig, out: Path, pooled: dict, files: list[Path]) -> Optional[str]:
    """The pooled report as its own MLflow run (``compare-pooled``, in the comparison's experiment beside the sets'
    parent runs): :func:`pooled_metrics`, the report files as artifacts, tags naming the sets and each set's
    parent run. The run id is kept in ``OUT/pooled_state.json`` with the sets and the tracking URI; a re-run of
    the same sets to the same store logs to the same run, other sets get a new run. Returns the run id (None
    with ``mlflow.enabled: false``)."""
    if not cfg.mlflow.enabled:
        return None
    from ..tracking import mlflow_tracker

    uri, exp_name, art = mlflow_tracker.resolve(cfg)
    state_file = out / POOLED_STATE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    run_id = state.get("run_id") if (state.get("sets"), state.get("tracking_uri")) == (pooled["sets"], uri) else None
    if run_id is None:
        run_id = _pooled_run(uri, mlflow_tracker.ensure_experiment(uri, exp_name, art), out, pooled)
        _write_json(state_file, {"run_id": run_id, "tracking_uri": uri, "sets": pooled["sets"]})
    tracker = mlflow_tracker.Tracker(uri, run_id)
    tracker.log_metrics(pooled_metrics(pooled), step=0)
    for f in files:
        tracker.log_artifact(str(f), "compare")
    tracker.finish("FINISHED")
    return run_id
