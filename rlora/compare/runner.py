"""``rlora compare``: train and evaluate every cell of a (method, sampler, seed) grid through the
product's training loop, then report paired differences with confidence intervals.

    plan cells (equal budgets)  ->  MLflow parent run  ->  each unfinished cell: one training run
    (Ray Train, or this process with ``local``), a child MLflow run, every dev row scored
    ->  out/cells/<key>.json  ->  pairing checked  ->  compare.md, compare.json, forest.png

Cells run as many at once as the Ray cluster's CPUs (or GPUs) allow for one cell's workers; a
re-run skips finished cells and resumes an interrupted one from its newest checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError, RunConfig
from ..console import say
from .cells import CompareError
from .grid import Cell, plan

STATE = "compare_state.json"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def cell_record(cell: Cell, summary: dict, wall_s: float, mlflow_run_id: Optional[str]) -> dict:
    """What the report needs of a finished cell (:mod:`rlora.compare.cells`' format plus provenance).
    ``wall_s``: this invocation's seconds; a resumed cell adds those of the pieces before it (to the checkpoint
    it resumed from), so a cell's wall time is its whole training, however often it was interrupted."""
    after = summary.get("results_after") or {}
    if not after or any("row_correct" not in r for r in after.values()):
        raise CompareError(f"cell {cell.label} has no per-row dev results: set eval.split to a split with rows")
    return {"method": cell.method, "sampler": cell.sampler, "seed": cell.seed, "key": cell.key,
            "run_name": cell.cfg.trainer.run_name, "mlflow_run_id": mlflow_run_id, "params": cell.params,
            "rank": cell.cfg.adapter.r, "overrides": list(cell.overrides),
            "wall_s": wall_s + float(summary.get("wall_seconds_before") or 0.0),
            "correct": {t: r["row_correct"] for t, r in after.items()},
            "row_ids": {t: r["row_ids"] for t, r in after.items()},
            "accuracy": {t: r["accuracy"] for t, r in after.items()},
            "train_loss_last": summary.get("train_loss_last"), "data_order": summary.get("data_order"),
            "resumed_from_step": summary.get("resumed_from_step")}


def check_pairing(records: list[dict]) -> None:
    """Every cell scored the same dev rows; cells of one seed and one static sampler trained on the same
    data order (``dynamic`` re-weights from each run's own losses, so its order differs by method)."""
    ref = records[0]["row_ids"]
    for r in records[1:]:
        if r["row_ids"] != ref:
            raise CompareError(f"cell {r['run_name']} scored other dev rows than {records[0]['run_name']}: "
                               "the grid's data or eval settings changed between runs; use a new --out")
    by_seed: dict[tuple, dict] = {}
    for r in records:
        if r["sampler"] == "dynamic":
            continue
        first = by_seed.setdefault((r["seed"], r["sampler"]), r)
        if r["data_order"] != first["data_order"]:
            raise CompareError(f"cells {first['run_name']} and {r['run_name']} (seed {r['seed']}) trained on "
                               "different data orders, so they cannot be paired: check that no per-arm override "
                               "changes the steps, batch sizes, workers or sampler, and that the data did not "
                               "change between runs (then use a new --out)")


def report_summary(records: list[dict], baseline: str, samplers: list[str], n_boot: int, rng_seed: int,
                   budget: str) -> dict:
    """The report's summary of finished cells (in plan order): :func:`~rlora.compare.summarize` against the
    baseline under ``proportional`` (else the first sampler), plus the cells' total wall time and ranks."""
    from . import summarize

    check_pairing(records)
    base_sampler = "proportional" if "proportional" in samplers else samplers[0]
    summary = summarize(records, baseline, baseline_sampler=base_sampler, n_boot=n_boot, seed=rng_seed)
    summary["wall_s_total"] = sum(r["wall_s"] for r in records)
    summary["budget"] = {"mode": budget, "ranks": {f"{r['method']}/{r['sampler']}": r["rank"] for r in records},
                         "lora_rank": next((r["rank"] for r in records if r["method"] == "lora"), None)}
    return summary


def concurrency(cfg: RunConfig, local: bool) -> int:
    """Cells at once: 1 in this process; else as many as the Ray cluster holds one cell's workers."""
    if local:
        return 1
    import ray

    res = ray.cluster_resources()
    per = dict(cfg.ray.resources_per_worker)
    if cfg.ray.use_gpu:
        per.setdefault("GPU", 1)
    fits = [int(res.get(k, 0) // (v * cfg.ray.num_workers)) for k, v in per.items() if v > 0]
    return max(1, min(fits) if fits else 1)


class Comparison:
    """``arms``: the (method, sampler) pairs to train, each with ``seeds`` seeds."""

    def __init__(self, cfg: RunConfig, arms: list[tuple[str, str]], seeds: int, baseline: str, budget: str,
                 out_dir: Path, local: bool = False, n_boot: int = 2000, name: Optional[str] = None,
                 verbose: bool = False, overrides: Optional[dict[tuple[str, str], list[str]]] = None,
                 rng_seed: Optional[int] = None, tuning: Optional[dict] = None):
        """``overrides``: dotted overrides per arm (``--tune``'s picks); ``rng_seed``: the bootstrap's seed
        (default ``trainer.seed``); ``tuning``: how the picks were made, carried into the report."""
        self.methods = list(dict.fromkeys(m for m, _ in arms))
        self.samplers = list(dict.fromkeys(s for _, s in arms))
        if baseline not in self.methods:
            raise ConfigError(f"--baseline {baseline} is not among --methods {','.join(self.methods)}: add it or "
                              "pick one")
        self.cfg, self.arms, self.seeds = cfg, arms, seeds
        self.baseline, self.budget, self.out, self.local, self.n_boot = baseline, budget, out_dir, local, n_boot
        self.name, self.verbose = name or out_dir.resolve().name, verbose
        self.overrides, self.tuning = overrides or {}, tuning
        self.rng_seed = cfg.trainer.seed if rng_seed is None else rng_seed
        self.parent_run_id: Optional[str] = None
        self.uri: Optional[str] = None
        self.cell_records: list[dict] = []

    # ---- phases -------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train what is missing, then write and return the report (summary)."""
        return self._report(self.records())

    def records(self) -> list[dict]:
        """Train the cells not finished yet; every cell's record, in plan order."""
        from ..train.launcher import preflight

        cfg = preflight(self.cfg.model_copy(deep=True))
        (self.out / "cells").mkdir(parents=True, exist_ok=True)
        cells = plan(cfg, self.arms, self.seeds, self.budget, self.out.resolve(), self.overrides)
        self._print_plan(cells)
        self._start_parent(cfg)
        todo = [c for c in cells if not (self.out / "cells" / f"{c.key}.json").is_file()]
        for c in cells:
            if c not in todo:
                print(f"[rlora] compare: {c.label} finished earlier: skipped", flush=True)
        if todo:
            self._run_cells(cfg, todo)
        self.cell_records = [json.loads((self.out / "cells" / f"{c.key}.json").read_text()) for c in cells]
        return self.cell_records

    def finish_parent(self) -> None:
        """Mark the MLflow parent run FINISHED; for a comparison whose cells are only recorded (``records()``,
        e.g. a ``--tune`` candidate), which never reaches the report that would end it."""
        if self.parent_run_id:
            from ..tracking.mlflow_tracker import client

            client(self.uri).set_terminated(self.parent_run_id, "FINISHED")

    def _run_cells(self, cfg: RunConfig, todo: list[Cell]) -> None:
        """Ray's start-up lines go to ``logs/compare.log``. One cell at a time logs to its own
        ``runs/<cell>/logs/run.log``; cells at once share this process's stdout/stderr, so their library
        output goes to ``logs/compare.log`` too."""
        from .. import console

        log = self.out / "logs" / "compare.log"
        if not self.local:
            from ..train.launcher import _ray_init

            with console.run_log(log, self.verbose):
                _ray_init(cfg, self.verbose)  # worker output reaches this process only with --verbose
        at_once = min(len(todo), concurrency(cfg, self.local))
        shared = console.run_log(log, self.verbose) if at_once > 1 else contextlib.nullcontext()
        with shared:
            pool = ThreadPoolExecutor(max_workers=at_once)
            try:
                for future in [pool.submit(self._run_cell, c, at_once > 1) for c in todo]:
                    future.result()
            except BaseException:  # a failed cell or Ctrl-C: drop the queued cells, not wait for them
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()

    def _print_plan(self, cells: list[Cell]) -> None:
        print(f"[rlora] compare {self.name}: {len(cells)} cells ({', '.join(self.methods)} x "
              f"{', '.join(self.samplers)} x {self.seeds} seeds), budget '{self.budget}', results in {self.out}",
              flush=True)
        seen = set()
        for c in cells:
            if c.method not in seen:
                seen.add(c.method)
                print(f"[rlora]   {c.method:6s} rank {c.cfg.adapter.r:3d}: A+B {c.params['ab']:,} | all trainable "
                      f"{c.params['total']:,}", flush=True)

    def _start_parent(self, cfg: RunConfig) -> None:
        if not cfg.mlflow.enabled:
            return
        from ..tracking import mlflow_tracker

        self.uri = mlflow_tracker.resolve(cfg)[0]
        mlflow_tracker.check_reachable(self.uri)
        state_file = self.out / STATE
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        if state.get("parent_run_id"):
            self.parent_run_id = state["parent_run_id"]
            return
        _, exp_name, art = mlflow_tracker.resolve(cfg)
        exp_id = mlflow_tracker.ensure_experiment(self.uri, exp_name, art)
        run = mlflow_tracker.client(self.uri).create_run(
            exp_id, run_name=f"compare-{self.name}",
            tags={"rlora.compare": self.name, "methods": ",".join(self.methods), "samplers": ",".join(self.samplers),
                  "seeds": str(self.seeds), "budget": self.budget, "baseline": self.baseline})
        self.parent_run_id = run.info.run_id
        _write_json(state_file, {"parent_run_id": self.parent_run_id, "tracking_uri": self.uri})

    def _run_cell(self, cell: Cell, tag: bool = False) -> None:
        """Train one cell and write its record; ``tag``: cells run at once, so the run's lines name the cell."""
        from .. import console
        from ..train.launcher import run_training

        cfg = cell.cfg.model_copy(deep=True)
        cfg.mlflow.parent_run_id = self.parent_run_id
        cfg.mlflow.tracking_uri = self.uri  # the parent's store, whatever the cell's output folder
        if not self.parent_run_id:
            cfg.mlflow.enabled = False
        say(f"[rlora] compare: training {cell.label} ({cfg.trainer.run_name})")
        t0 = time.time()
        with console.tagged(cell.label) if tag else contextlib.nullcontext():
            res = run_training(cfg, local=self.local, verbose=self.verbose)
        record = cell_record(cell, res.summary, time.time() - t0, res.mlflow_run_id)
        _write_json(self.out / "cells" / f"{cell.key}.json", record)
        mean = sum(record["accuracy"].values()) / len(record["accuracy"])
        say(f"[rlora] compare: {cell.label} done: mean {cell.cfg.eval.split} accuracy {100 * mean:.1f} "
            f"({record['wall_s']:.0f}s)")

    def _report(self, records: list[dict]) -> dict:
        from . import forest_plot, markdown_table, to_json

        summary = report_summary(records, self.baseline, self.samplers, self.n_boot, self.rng_seed, self.budget)
        if self.tuning is not None:
            summary["tuning"] = self.tuning
        table = markdown_table(summary)
        (self.out / "compare.md").write_text(table + "\n")
        _write_json(self.out / "compare.json", to_json(summary))
        files = [self.out / "compare.md", self.out / "compare.json"]
        if summary["comparisons"]:
            files.append(forest_plot(summary, self.out / "forest.png"))
        self._log_parent(summary, files)
        print(table, flush=True)
        print(f"[rlora] compare: report in {self.out} ({', '.join(p.name for p in files)})", flush=True)
        return summary

    def _log_parent(self, summary: dict, files: list[Path]) -> None:
        if not self.parent_run_id:
            return
        from ..tracking.mlflow_tracker import Tracker

        tracker = Tracker(self.uri, self.parent_run_id)
        metrics = {}
        for c in summary["comparisons"]:
            a, b = c["a"], c["b"]
            key = f"diff/{a['method']}-{a['sampler']}_vs_{b['method']}-{b['sampler']}"
            for stat in ("mean", "worst"):
                metrics.update({f"{key}/{stat}": c[stat]["diff"], f"{key}/{stat}_lo": c[stat]["lo"],
                                f"{key}/{stat}_hi": c[stat]["hi"]})
        for arm in summary["arms"]:
            metrics[f"accuracy/{arm['method']}-{arm['sampler']}/mean"] = arm["mean"]
        tracker.log_metrics(metrics, step=0)
        for f in files:
            tracker.log_artifact(str(f), "compare")
        tracker.finish("FINISHED")
