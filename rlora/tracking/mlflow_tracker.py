"""MLflow as the system of record: one run per training run, continued across restarts.

The driver resolves the tracking URI and experiment, checks that MLflow answers (before any worker
starts) and creates or finds the run; rank 0 logs into that run id with :class:`Tracker`.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from ..config import RunConfig, flatten

RUN_NAME_TAG = "rlora.run_name"
SECRET = re.compile(r"token|secret|password|passwd|api[_-]?key|(^|[._])key$", re.IGNORECASE)


class TrackingError(RuntimeError):
    """MLflow could not be reached or used (one line, names the URI and the fix)."""


def resolve(cfg: RunConfig) -> tuple[str, str, Optional[str]]:
    """(tracking_uri, experiment_name, artifact_location) from the config, the environment, or defaults:
    a local sqlite file under ``trainer.output_dir`` with artifacts beside it (absolute paths)."""
    out = Path(cfg.trainer.output_dir).resolve()
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
    exp = cfg.mlflow.experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "rlora"
    art = cfg.mlflow.artifact_location
    if art is None and uri.startswith("sqlite:"):
        art = (out / "mlartifacts").as_uri()
    return uri, exp, art


def redact(params: dict[str, Any]) -> dict[str, Any]:
    return {k: ("***" if SECRET.search(k.rsplit(".", 1)[-1]) else v) for k, v in params.items()}


def config_params(cfg: RunConfig) -> dict[str, str]:
    flat = redact(flatten(cfg.model_dump(mode="json")))
    return {k: str(v)[:250] for k, v in flat.items()}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _unreachable(uri: str, err: Exception) -> TrackingError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return TrackingError(f"MLflow at {uri} is unreachable or refused the request ({first[:160]}): start the "
                         "server or fix mlflow.tracking_uri / MLFLOW_TRACKING_URI")


def check_reachable(uri: str) -> None:
    """Fail fast, writing nothing: a read-only request to a server; a writable folder for sqlite."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if uri.startswith("sqlite:"):
        folder = Path(uri[len("sqlite:///"):]).parent
        while not folder.exists():
            folder = folder.parent
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow sqlite file {uri} cannot be created ({folder} is not writable): "
                                "fix mlflow.tracking_uri or trainer.output_dir")
        return
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as err:
        raise _unreachable(uri, err) from None


def ensure_experiment(uri: str, name: str, artifact_location: Optional[str]) -> str:
    """Experiment id; creating it if needed. Raises TrackingError if MLflow does not answer."""
    if uri.startswith("sqlite:"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        c = client(uri)
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return c.create_experiment(name, artifact_location=artifact_location)
    except Exception as err:
        raise _unreachable(uri, err) from None


def _redact_tree(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("***" if SECRET.search(str(k)) and not isinstance(v, (dict, list)) else _redact_tree(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact_tree(v) for v in obj]
    return obj


def start_or_resume_run(cfg: RunConfig, run_name: str, config_yaml: Optional[str] = None,
                        command: Optional[str] = None) -> tuple[str, bool]:
    """(run_id, resumed). A run with the same ``rlora.run_name`` tag that is not finished is continued.

    A new run gets the flattened config as params, the resolved config (every default filled in,
    overrides applied, secrets redacted) as ``config.yaml``, the config file as written as
    ``config_source.yaml`` (``config_yaml``) and the command line as the ``rlora.command`` tag."""
    from .run_record import COMMAND_TAG, CONFIG_ARTIFACT, SOURCE_ARTIFACT, resolved_config_yaml

    uri, exp_name, art = resolve(cfg)
    exp_id = ensure_experiment(uri, exp_name, art)
    c = client(uri)
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                          order_by=["attributes.start_time DESC"], max_results=1)
    if found and found[0].info.status != "FINISHED":
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id, True
    tags = {RUN_NAME_TAG: run_name, "method": cfg.adapter.method, "base_model": cfg.model.name_or_path,
            "tasks": ",".join(cfg.adapter.tasks)[:5000], "git_commit": git_commit(),
            "mlflow.runName": run_name}
    if command:
        tags[COMMAND_TAG] = command[:5000]
    if cfg.mlflow.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.mlflow.parent_run_id  # a child run, e.g. one cell of `rlora compare`
    run = c.create_run(exp_id, tags=tags, run_name=run_name)
    run_id = run.info.run_id
    params = config_params(cfg)
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])
    c.log_text(run_id, resolved_config_yaml(_redact_tree(cfg.model_dump(mode="json"))), CONFIG_ARTIFACT)
    if config_yaml is not None:
        c.log_text(run_id, config_yaml, SOURCE_ARTIFACT)
    return run_id, False


class Tracker:
    """Rank-0 logging into one run. Transient errors are retried, then warned about; training goes on.
    Steps at or below ``resume_after`` were already logged before a restart and are skipped, so a
    resumed run's curves have no repeated steps."""

    def __init__(self, uri: str, run_id: str, retries: int = 3):
        self.uri, self.run_id, self.retries = uri, run_id, retries
        self._client = client(uri)
        self.resume_after = self._last_logged_step()

    def _last_logged_step(self) -> int:
        try:
            hist = self._client.get_metric_history(self.run_id, "train/loss")
            return max((m.step for m in hist), default=-1)
        except Exception:
            return -1

    def _retry(self, what: str, fn, *args, **kwargs) -> None:
        for attempt in range(self.retries):
            try:
                fn(*args, **kwargs)
                return
            except Exception as err:  # network hiccup, locked sqlite ...
                if attempt == self.retries - 1:
                    warnings.warn(f"MLflow {what} failed after {self.retries} tries ({err}); training continues")
                else:
                    time.sleep(0.5 * 2 ** attempt)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.resume_after:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]  # drop NaN
        for i in range(0, len(items), 500):
            self._retry("log_metrics", self._client.log_batch, self.run_id, metrics=items[i:i + 500])

    def log_params(self, params: dict[str, Any]) -> None:
        """Values that do not change over the run (e.g. truncated rows per task): params, not charts."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:250]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._retry("log_params", self._client.log_batch, self.run_id, params=items[i:i + 100])

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """[(step, value)] of one metric in step order ([] if none, or MLflow does not answer)."""
        try:
            hist = self._client.get_metric_history(self.run_id, key)
        except Exception:
            return []
        return sorted((m.step, m.value) for m in hist)

    def start_system_metrics(self, interval_s: float = 10.0) -> None:
        """CPU, memory, disk (and GPU where there is one) of this node as ``system/*`` metrics,
        sampled every ``interval_s`` seconds by MLflow's monitor thread (``$MLFLOW_SYSTEM_METRICS_
        SAMPLING_INTERVAL`` overrides) until :meth:`stop_system_metrics` or the run ends."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, resume_logging=True,
                                                 tracking_uri=self.uri)
            # network counters read 0 on a one-node run (all charts zero): left out
            self._monitor.monitors = [m for m in self._monitor.monitors if type(m).__name__ != "NetworkMonitor"]
            self._monitor.start()
        except Exception as err:  # e.g. psutil missing: the run goes on without system metrics
            warnings.warn(f"MLflow system metrics are not logged ({err})")
            self._monitor = None

    def stop_system_metrics(self) -> None:
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            try:
                monitor.finish()
            except Exception as err:
                warnings.warn(f"MLflow system metrics monitor did not stop cleanly ({err})")
            self._monitor = None

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        self._retry("log_artifact", self._client.log_artifact, self.run_id, path, artifact_path)

    def log_artifacts(self, path: str, artifact_path: Optional[str] = None) -> None:
        self._retry("log_artifacts", self._client.log_artifacts, self.run_id, path, artifact_path)

    def log_dict(self, obj: dict, name: str) -> None:
        self._retry("log_dict", self._client.log_dict, self.run_id, obj, name)

    def set_tag(self, key: str, value: str) -> None:
        self._retry("set_tag", self._client.set_tag, self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self._retry("set_terminated", self._client.set_terminated, self.run_id, status)
