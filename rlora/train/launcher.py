"""The driver: validate everything that can be validated before a worker starts, then run a Ray Train
``TorchTrainer`` whose workers each drive a DeepSpeed engine (``worker.train_loop_per_worker``).

    preflight (config, data, sampler, model + target modules, resources, MLflow)
        -> ray.init (local, or ray.address) -> TorchTrainer.fit() -> adapter + results in output_dir
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from ..config import ConfigError, RunConfig
from ..console import say


@dataclass
class TrainResult:
    run_name: str
    adapter_dir: Optional[Path]
    checkpoint_dir: Optional[str]
    mlflow_run_id: Optional[str]
    tracking_uri: Optional[str]
    summary: dict[str, Any] = field(default_factory=dict)


def default_run_name(cfg: RunConfig) -> str:
    return cfg.trainer.run_name or f"{cfg.adapter.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_path(cfg: RunConfig) -> str:
    return cfg.ray.storage_path or str(Path(cfg.trainer.output_dir).resolve() / "ray_results")


def is_local_path(path: str) -> bool:
    return urlparse(path).scheme in ("", "file")


def preflight(cfg: RunConfig) -> RunConfig:
    """Checks that need no worker. Fills ``adapter.tasks`` from the data when empty. Raises one-line errors."""
    import torch

    from ..data import load_tasks
    from ..inject import inject
    from ..layers import AdapterError
    from .data_setup import build_sampler, resolve_tasks

    if not cfg.data.path and not cfg.data.tasks:
        raise ConfigError("data.path is not set: point it at a folder with one sub-folder per task "
                          "(e.g. examples/data/bigbench_default)")
    # the training rows: counted from the token cache when it is built (no row is read), else read and
    # checked as a stream without tokenising (the first worker of each node builds the cache)
    from ..data.token_cache import cached_sizes, check_rows
    from ..models import ModelLoadError, load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    except ModelLoadError:
        tokenizer = None  # reported by the model check below, after the data's own errors
    sizes = (cached_sizes(cfg.data, tokenizer) if tokenizer is not None else None) or check_rows(cfg.data, "train")
    load_tasks(cfg.data, cfg.eval.split)
    names = resolve_tasks(cfg, list(sizes))
    build_sampler(cfg, [sizes[n] for n in names], names, 0, cfg.ray.num_workers)
    # model: the weights are prepared once here (not raced by the workers); the target modules are
    # checked against a meta-device copy, which allocates nothing
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import plain_hf_loading, resolve_model_path

    path = resolve_model_path(cfg.model.name_or_path)[0]
    mcfg = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    plain_hf_loading()  # a ZeRO-3 run earlier in this process must not partition the skeleton
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=cfg.model.trust_remote_code)
    try:
        inject(skeleton, cfg.adapter)
    except AdapterError as err:
        raise ConfigError(f"adapter: {err}") from None
    return cfg


def check_resources(cfg: RunConfig, storage: str) -> None:
    import ray

    res = ray.cluster_resources()
    per = dict(cfg.ray.resources_per_worker)
    if cfg.ray.use_gpu:
        per.setdefault("GPU", 1)
    for key, amount in per.items():
        need, have = amount * cfg.ray.num_workers, res.get(key, 0)
        if need > have:
            fix = "set ray.use_gpu=false" if key == "GPU" else f"lower ray.num_workers or ray.resources_per_worker.{key}"
            raise ConfigError(f"ray.num_workers={cfg.ray.num_workers} x {key}={amount} needs {need:g} {key} but the "
                              f"Ray cluster has {have:g}: {fix}")
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1 and is_local_path(storage) and not os.environ.get("RLORA_SHARED_LOCAL_STORAGE"):
        raise ConfigError(f"ray.storage_path={storage} is a local path but the cluster has {len(alive)} nodes: use "
                          "shared storage (s3://, gs://, or an NFS mount with RLORA_SHARED_LOCAL_STORAGE=1)")


def find_resume_checkpoint(cfg: RunConfig, storage: str, run_name: str) -> Optional[str]:
    """The checkpoint a run starts from: ``trainer.resume_from_checkpoint`` if it is a path, else (``auto``
    or unset) the newest complete checkpoint of the same run name in the storage path, if any."""
    from . import checkpoint as ckpt

    want = cfg.trainer.resume_from_checkpoint
    if want and want not in ("auto", "never"):
        ckpt.read_state(Path(want))  # a clear error now if it is incomplete or corrupted
        return str(Path(want).resolve())
    if want == "never" or not is_local_path(storage):
        return None  # remote storage: Ray Train restores its own latest checkpoint of the run
    found = ckpt.latest_in(Path(storage) / run_name, cfg.ray.num_workers)
    return str(found) if found else None


def _ray_init(cfg: RunConfig, verbose: bool = True) -> None:
    """Connect to ``ray.address`` / ``$RAY_ADDRESS`` or start a local Ray. Worker output reaches this
    process only when ``verbose`` (rlora's own progress lines come through a queue either way)."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "RLORA_CACHE", "RLORA_TOKEN_CACHE", "RLORA_SMOLLM2_WHEEL", "MLFLOW_TRACKING_URI",
                                      "HF_HOME", "RLORA_SHARED_LOCAL_STORAGE") if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", str(int(cfg.ray.resources_per_worker.get("CPU", 1))))
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:  # an existing cluster, e.g. inside `ray job submit`: the job's runtime env applies
        ray.init(address=address, log_to_driver=verbose)
    else:
        # the dashboard (bound to 127.0.0.1 by default) serves Ray's state API, which Ray Train's
        # placement-group cleaner polls; without it the logs fill with failed queries
        ray.init(runtime_env={"env_vars": env}, include_dashboard=True, dashboard_host=cfg.ray.dashboard_host,
                 log_to_driver=verbose, configure_logging=True, logging_level="WARNING")
    from . import stopping

    stopping.reinstall()  # ray.init replaced the SIGTERM handler: a stop is ours again (rlora.train.stopping)


def start_run(cfg: RunConfig, config_yaml: Optional[str], local: bool, verbose: bool = True,
              command: Optional[str] = None) -> tuple[RunConfig, dict[str, Any], Optional[str]]:
    """The driver's part, before any training process starts (``cfg`` has passed :func:`preflight`):
    MLflow reachable, Ray up and large enough, the run's storage folder, resume point and MLflow run."""
    from ..tracking import mlflow_tracker

    run_name = default_run_name(cfg)
    storage = storage_path(cfg)
    if local and not is_local_path(storage):
        raise ConfigError(f"ray.storage_path={storage} is remote: a local run keeps checkpoints on a local path "
                          "(unset ray.storage_path or run without --local)")
    if not local:
        _ray_init(cfg, verbose)
        check_resources(cfg, storage)
    if is_local_path(storage):
        Path(storage).mkdir(parents=True, exist_ok=True)
    # remote storage: the workers scan no folder; Ray Train hands over the run's own latest checkpoint
    run: dict[str, Any] = {"run_name": run_name, "started_at": time.time(), "verbose": verbose,
                           "log_dir": str(run_dir(cfg, run_name) / "logs"),
                           "storage_dir": str(Path(storage) / run_name) if is_local_path(storage) else None}
    if run["storage_dir"]:
        from . import checkpoint as ckpt

        aside = ckpt.set_aside_broken_ray_snapshot(Path(run["storage_dir"]))
        if aside:
            say(f"[rlora] run {run_name}: Ray's run snapshot was cut short by the last stop; set aside as {aside}")
    run["resume_from"] = find_resume_checkpoint(cfg, storage, run_name)
    if run["resume_from"]:
        say(f"[rlora] run {run_name} has a checkpoint: resuming from {run['resume_from']}")
    uri = None
    if cfg.mlflow.enabled:
        uri = mlflow_tracker.resolve(cfg)[0]
        from ..tracking.run_record import command_line

        run["mlflow_run_id"], resumed = mlflow_tracker.start_or_resume_run(cfg, run_name, config_yaml,
                                                                           command or command_line())
        run["tracking_uri"] = uri
        say(f"[rlora] MLflow run {run['mlflow_run_id']} ({'continued' if resumed else 'new'}) at {uri}")
    where = "this process" if local else f"{cfg.ray.num_workers} Ray workers"
    tasks = cfg.adapter.tasks if len(cfg.adapter.tasks) <= SUMMARY_ABOVE else \
        f"{cfg.adapter.tasks[0]} .. {cfg.adapter.tasks[-1]} ({len(cfg.adapter.tasks)} tasks)"
    say(f"[rlora] run {run_name}: {where}, ZeRO-{cfg.deepspeed.stage}, method {cfg.adapter.method}, "
        f"tasks {tasks}; checkpoints in {storage}/{run_name}")
    return cfg, run, uri


def run_dir(cfg: RunConfig, run_name: str) -> Path:
    """``output_dir/<run_name>``: the adapter, the results chart and the run's logs."""
    return Path(cfg.trainer.output_dir).resolve() / run_name


def run_training(cfg: RunConfig, config_yaml: Optional[str] = None, local: bool = False,
                 verbose: bool = True, command: Optional[str] = None) -> TrainResult:
    """Train as configured: Ray Train workers, or (``local``) the same loop in this process with world
    size 1. Everything that can fail fast fails before a worker starts. Unless ``verbose``, everything
    but rlora's own lines goes to ``output_dir/<run>/logs/run.log`` (workers: ``worker-<rank>.log``)."""
    from .. import console

    from ..tracking import mlflow_tracker

    cfg = preflight(cfg)
    if cfg.mlflow.enabled:  # MLflow must answer before anything starts or is written
        mlflow_tracker.check_reachable(mlflow_tracker.resolve(cfg)[0])
    cfg.trainer.run_name = default_run_name(cfg)
    folder = run_dir(cfg, cfg.trainer.run_name)
    fresh = not folder.exists()
    log = folder / "logs" / "run.log"
    if not verbose:
        say(f"[rlora] log: {console.active_log() or log} (rlora train --verbose shows it all here)")
    with console.run_log(log, verbose):
        try:
            cfg, run, uri = start_run(cfg, config_yaml, local, verbose, command)
        except ConfigError:  # refused before training (e.g. too few Ray resources): leave nothing behind
            if fresh:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        from . import stopping

        stopping.track(run["run_name"], storage_dir=run["storage_dir"], world=1 if local else cfg.ray.num_workers,
                       mlflow_run_id=run.get("mlflow_run_id"), tracking_uri=uri)
        try:
            if local:
                from .loop import Trainer
                from .runtime import LocalRuntime

                runtime = LocalRuntime(Path(run["storage_dir"]), cfg.ray.num_to_keep)
                trainer = Trainer(cfg, runtime, run)
                stopping.track(run["run_name"], trainer=trainer)
                trainer.fit()
                return _finish(cfg, run, runtime.latest, uri)
            result = _fit_on_ray(cfg, run)
            if result.checkpoint is None:
                return _finish(cfg, run, None, uri)
            with result.checkpoint.as_directory() as d:
                return _finish(cfg, run, Path(d), uri, checkpoint_path=result.checkpoint.path)
        finally:  # a stopped run stays registered: the command's stop handler reports it
            if stopping.received() is None:
                stopping.untrack(run["run_name"])


def _fit_on_ray(cfg: RunConfig, run: dict[str, Any]):
    """``TorchTrainer.fit`` with rank 0's progress lines relayed to the console through a Ray queue."""
    import contextvars
    import threading

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from . import stopping

    # the queue lives on the driver's node: a worker node that dies (and is replaced) must not take it along
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    lines = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    trainer = TorchTrainer(
        _entry,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run": run, "progress": lines},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=dict(cfg.ray.resources_per_worker)),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        run_config=RayRunConfig(name=run["run_name"], storage_path=storage_path(cfg),
                                failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep)),
    )
    done = threading.Event()

    def relay() -> None:
        try:
            while not (done.is_set() and lines.empty()):
                try:
                    line = lines.get(timeout=0.5)
                except Empty:
                    continue
                stopping.heard(run["run_name"], line)
                say(line)
        except ray.exceptions.RayActorError:  # the queue's actor is gone: the workers print instead
            say("[rlora] progress relay stopped (its Ray queue is gone): see the run's log for progress")

    t = threading.Thread(target=contextvars.copy_context().run, args=(relay,), daemon=True)  # keeps a console tag
    t.start()
    try:
        return trainer.fit()
    finally:
        done.set()
        t.join(timeout=10)
        lines.shutdown()


def _entry(payload: dict) -> None:
    from .worker import train_loop_per_worker

    train_loop_per_worker(payload)


def _finish(cfg: RunConfig, run: dict, ckpt_dir: Optional[Path], uri: Optional[str],
            checkpoint_path: Optional[str] = None) -> TrainResult:
    """Copy the final checkpoint's adapter into ``output_dir/<run>/adapter``; close the MLflow run."""
    from ..tracking import mlflow_tracker

    summary: dict[str, Any] = {}
    adapter_dir = None
    if ckpt_dir is not None:
        d = Path(ckpt_dir)
        if (d / "results.json").is_file():
            summary = json.loads((d / "results.json").read_text())
        if (d / "adapter").is_dir():
            out = Path(cfg.trainer.output_dir).resolve() / run["run_name"] / "adapter"
            tmp = out.parent / f".adapter.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(d / "adapter", tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
            adapter_dir = out
    chart = None
    if summary.get("results_after"):
        from ..tracking.results_chart import before_after_chart

        chart = before_after_chart(summary, run_dir(cfg, run["run_name"]) / "accuracy_before_after.png",
                                   f"{run['run_name']}: {cfg.adapter.method}, {summary.get('global_step')} steps")
        summary["results_chart"] = str(chart)
    table = None
    if summary.get("results_after") or summary.get("results_before"):  # the whole table, whatever the task count
        table = run_dir(cfg, run["run_name"]) / RESULTS_TABLE
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(results_table(summary, whole=True) + "\n")
        summary["results_table"] = str(table)
    if run.get("mlflow_run_id") and uri:
        tracker = mlflow_tracker.Tracker(uri, run["mlflow_run_id"])
        if adapter_dir is not None and cfg.mlflow.log_artifacts:
            tracker.log_artifacts(str(adapter_dir), "adapter")
        if chart is not None and cfg.mlflow.log_artifacts:
            tracker.log_artifact(str(chart))
        if table is not None and cfg.mlflow.log_artifacts:
            tracker.log_artifact(str(table))
        if summary:
            tracker.log_dict(summary, "results.json")
        tracker.finish("FINISHED")
    return TrainResult(run["run_name"], adapter_dir, checkpoint_path or (str(ckpt_dir) if ckpt_dir else None),
                       run.get("mlflow_run_id"), uri, summary)


RESULTS_TABLE = "results_table.md"  # output_dir/<run>/: the whole per-task table (also an MLflow artifact)
SUMMARY_ABOVE, SUMMARY_EACH = 20, 5  # more tasks than this: the console shows the worst and best 5 and the mean


def results_table(summary: dict, whole: bool = False) -> str:
    """Per-task dev accuracy before and after training, as a Markdown table. With more than
    :data:`SUMMARY_ABOVE` tasks (unless ``whole``) only the :data:`SUMMARY_EACH` worst and best tasks by
    accuracy after training (before, where there is no after; ties in task order) and the mean over all
    tasks, then where the whole table is (``summary["results_table"]``, written by the run)."""
    before, after = summary.get("results_before") or {}, summary.get("results_after") or {}
    tasks = list(after or before)
    if not tasks:
        return "(no evaluation results)"
    lines = ["| task | n | accuracy before | accuracy after | change | dev loss after |", "|---|---:|---:|---:|---:|---:|"]
    accs_b, accs_a, changes = [], [], []
    rows = {}
    for tname in tasks:
        b, a = before.get(tname, {}), after.get(tname, {})
        # a task with no accuracy (None, or NaN: no row could be scored) is shown blank and left out of the mean
        ab, aa = (v if v is not None and v == v else None for v in (b.get("accuracy"), a.get("accuracy")))
        accs_b += [ab] if ab is not None else []
        accs_a += [aa] if aa is not None else []
        changes += [aa - ab] if ab is not None and aa is not None else []
        ch = f"{100 * (aa - ab):+.1f}" if ab is not None and aa is not None else ""
        fmt = lambda v: f"{100 * v:.1f}" if v is not None else ""  # noqa: E731
        loss = a.get("loss")
        rows[tname] = (f"| {tname} | {int(a.get('n', b.get('n', 0)))} | {fmt(ab)} | {fmt(aa)} | {ch} | "
                       f"{'' if loss is None else f'{loss:.3f}'} |")
    summarised = len(tasks) > SUMMARY_ABOVE and not whole
    if summarised:
        key = {t: next((v for v in ((after.get(t) or {}).get("accuracy"), (before.get(t) or {}).get("accuracy"))
                        if v is not None and v == v), None) for t in tasks}
        ranked = sorted((t for t in tasks if key[t] is not None), key=key.__getitem__)
        # fewer than 2 x SUMMARY_EACH ranked tasks: "best" takes only those not already listed as worst
        worst, best = ranked[:SUMMARY_EACH], ranked[max(SUMMARY_EACH, len(ranked) - SUMMARY_EACH):][::-1]
        lines.append(f"| *worst {len(worst)} of {len(tasks)}* | | | | | |")
        lines += [rows[t] for t in worst]
        if best:
            lines.append(f"| *best {len(best)} of {len(tasks)}* | | | | | |")
            lines += [rows[t] for t in best]
    else:
        lines += [rows[t] for t in tasks]
    if accs_a or accs_b:  # each column's mean over its tasks with an accuracy; the change's over tasks with both
        mb, ma, mc = (sum(v) / len(v) if v else None for v in (accs_b, accs_a, changes))
        pct = lambda v, fmt: "" if v is None else format(100 * v, fmt)  # noqa: E731
        lines.append(f"| **mean** | | {pct(mb, '.1f')} | {pct(ma, '.1f')} | {pct(mc, '+.1f')} | |")
    if summarised:
        lines.append(f"(all {len(tasks)} tasks: {summary.get('results_table') or 'the run folder'})")
    return "\n".join(lines)
