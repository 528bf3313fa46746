"""The driver (rlora.train.launcher) reads the run-level knobs: where a run lives (output_dir, run_name,
ray.storage_path), where it resumes from, whether and where MLflow records it, what it uploads, and how
Ray is started (ray.address, ray.dashboard_host, ray.use_gpu; slow: they start Ray)."""
import json
import re
from pathlib import Path

import pytest

from helpers import run_config
from rlora.config import ConfigError
from rlora.train import checkpoint as ckpt
from rlora.train.launcher import find_resume_checkpoint, start_run


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)


def cfg_for(tiny_model_dir, task_dir, out, **kw):
    base = dict(mlflow__enabled=False, ray__num_workers=1)
    base.update(kw)
    return run_config(tiny_model_dir, task_dir, out, **base)


def test_output_dir_and_run_name_place_the_run(tiny_model_dir, task_dir, tmp_path):
    _, run, _ = start_run(cfg_for(tiny_model_dir, task_dir, tmp_path / "out", trainer__run_name="knobs"), None, True)
    assert run["run_name"] == "knobs"
    assert run["storage_dir"] == str((tmp_path / "out" / "ray_results" / "knobs").resolve())
    assert (tmp_path / "out" / "ray_results").is_dir()
    _, run, _ = start_run(cfg_for(tiny_model_dir, task_dir, tmp_path / "other"), None, True)
    assert re.fullmatch(r"rlora-\d{8}-\d{6}", run["run_name"])  # unset: <method>-<date>-<time>
    assert run["storage_dir"].startswith(str((tmp_path / "other" / "ray_results").resolve()))


def test_storage_path_holds_the_checkpoints(tiny_model_dir, task_dir, tmp_path):
    cfg = cfg_for(tiny_model_dir, task_dir, tmp_path / "out", trainer__run_name="knobs",
                  ray__storage_path=str(tmp_path / "shared"))
    _, run, _ = start_run(cfg, None, True)
    assert run["storage_dir"] == str(tmp_path / "shared" / "knobs") and (tmp_path / "shared").is_dir()
    assert not (tmp_path / "out" / "ray_results").exists()
    remote = cfg_for(tiny_model_dir, task_dir, tmp_path / "out", ray__storage_path="s3://bucket/runs")
    with pytest.raises(ConfigError, match="ray.storage_path=s3://bucket/runs is remote"):
        start_run(remote, None, True)


def fake_checkpoint(d: Path, step: int, ranks: int = 1) -> Path:
    (d / "ds").mkdir(parents=True)
    (d / "rng").mkdir()
    for r in range(ranks):
        (d / "rng" / f"rank{r}.safetensors").write_bytes(b"")
    (d / ckpt.STATE).write_text(json.dumps({"global_step": step, "complete": True}))
    return d


def test_resume_from_checkpoint_auto_never_and_a_path(tiny_model_dir, task_dir, tmp_path):
    storage = tmp_path / "store"
    for step in (2, 4):
        fake_checkpoint(storage / "knobs" / f"checkpoint_{step:06d}", step)
    elsewhere = fake_checkpoint(tmp_path / "elsewhere" / "checkpoint_000003", 3)

    def resume(value):
        cfg = cfg_for(tiny_model_dir, task_dir, tmp_path, trainer__resume_from_checkpoint=value)
        return find_resume_checkpoint(cfg, str(storage), "knobs")

    newest = str(storage / "knobs" / "checkpoint_000004")
    assert resume("null") == resume("auto") == newest  # the newest complete checkpoint of the run
    assert resume("never") is None
    assert resume(str(elsewhere)) == str(elsewhere.resolve())
    (elsewhere / ckpt.STATE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="no trainer_state.json: it is incomplete"):
        resume(str(elsewhere))


def test_mlflow_enabled_records_the_run_or_writes_nothing(tiny_model_dir, task_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    _, run, uri = start_run(cfg_for(tiny_model_dir, task_dir, tmp_path / "off", trainer__run_name="knobs"), None, True)
    assert uri is None and "mlflow_run_id" not in run and not (tmp_path / "off" / "mlflow.db").exists()
    _, run, uri = start_run(cfg_for(tiny_model_dir, task_dir, tmp_path / "on", trainer__run_name="knobs",
                                    mlflow__enabled=True), None, True)
    assert uri == f"sqlite:///{(tmp_path / 'on' / 'mlflow.db').resolve()}"
    recorded = MlflowClient(uri).get_run(run["mlflow_run_id"])
    assert recorded.data.tags["rlora.run_name"] == "knobs" and recorded.info.status == "RUNNING"


@pytest.mark.parametrize("log", [True, False])
def test_log_artifacts_uploads_the_adapter(tiny_model_dir, task_dir, tmp_path, log):
    """The end of a run copies the adapter into output_dir/<run>/adapter and uploads it when log_artifacts."""
    import rlora
    from helpers import tiny_llama
    from mlflow.tracking import MlflowClient
    from rlora.train.launcher import _finish

    cfg, run, uri = start_run(cfg_for(tiny_model_dir, task_dir, tmp_path / "out", trainer__run_name="knobs",
                                      mlflow__enabled=True, mlflow__log_artifacts=log), None, True)
    final = tmp_path / "checkpoint_000002"
    rlora.save_adapter(rlora.inject(tiny_llama(), rlora.AdapterConfig(method="lora")), final / "adapter")
    (final / "results.json").write_text(json.dumps({"global_step": 2}))
    res = _finish(cfg, run, final, uri)
    assert res.adapter_dir == (tmp_path / "out" / "knobs" / "adapter").resolve()
    assert (res.adapter_dir / "rlora_adapter.safetensors").is_file()
    client = MlflowClient(uri)
    uploaded = {a.path for a in client.list_artifacts(run["mlflow_run_id"], "adapter")}
    assert uploaded == ({"adapter/rlora_adapter.json", "adapter/rlora_adapter.safetensors"} if log else set())
    assert "results.json" in {a.path for a in client.list_artifacts(run["mlflow_run_id"])}  # logged either way
    assert client.get_run(run["mlflow_run_id"]).info.status == "FINISHED"


# ---- starting Ray (slow) ---------------------------------------------------------------------------
def _fresh_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    return ray


@pytest.mark.slow
def test_dashboard_host_is_where_the_dashboard_listens():
    """The dashboard this driver starts listens on ray.dashboard_host (127.0.0.2: loopback too, and not
    the default); other people's Ray instances on the machine are left out by looking at our children."""
    import os

    import psutil

    from rlora.config import validate_config
    from rlora.train.launcher import _ray_init

    ray = _fresh_ray()
    _ray_init(validate_config({"ray": {"dashboard_host": "127.0.0.2"}}))
    try:
        ours = [p for p in psutil.Process(os.getpid()).children(recursive=True)
                if any(part.endswith("dashboard/dashboard.py") for part in p.cmdline())]
        assert len(ours) == 1
        listening = {(c.laddr.ip, c.laddr.port) for c in ours[0].net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN}
        port = int(ray._private.worker.global_worker.node.address_info["webui_url"].rsplit(":", 1)[1])
        assert ("127.0.0.2", port) in listening and ("127.0.0.1", port) not in listening, listening
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_address_joins_an_existing_cluster_and_use_gpu_asks_it_for_gpus(tiny_model_dir, task_dir, tmp_path):
    """ray.address connects the driver to that cluster (one CPU, no GPU, unlike a fresh local Ray);
    ray.use_gpu then makes the resource check ask it for a GPU per worker."""
    from ray.cluster_utils import Cluster

    from rlora.train.launcher import _ray_init, check_resources

    ray = _fresh_ray()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    try:
        cfg = cfg_for(tiny_model_dir, task_dir, tmp_path, ray__address=cluster.address)
        _ray_init(cfg)
        assert ray.get_runtime_context().gcs_address == cluster.address
        assert ray.cluster_resources()["CPU"] == 1
        check_resources(cfg, str(tmp_path))  # 1 worker x 1 CPU fits
        gpu = cfg_for(tiny_model_dir, task_dir, tmp_path, ray__address=cluster.address, ray__use_gpu=True)
        with pytest.raises(ConfigError, match="needs 1 GPU but the Ray cluster has 0: set ray.use_gpu=false"):
            check_resources(gpu, str(tmp_path))
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_verbose_shows_library_output_on_the_console_instead_of_the_log(tiny_model_dir, task_dir, tmp_path):
    """`rlora train --local`: quiet, the console has rlora's lines only and the rest is in logs/run.log;
    with --verbose the library lines (model loading, DeepSpeed) reach the console and no log file is written."""
    import subprocess
    import sys

    import yaml

    cfg = run_config(tiny_model_dir, task_dir, tmp_path / "out", trainer__max_steps=2, mlflow__enabled="false",
                     ray__num_workers=1, diagnostics__enabled="false")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    def train(name, *flags):
        proc = subprocess.run([sys.executable, "-m", "rlora.cli", "train", str(path), "--local", *flags,
                               f"trainer.run_name={name}"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        return [ln for ln in lines if not ln.startswith(("[rlora]", "|"))]

    assert train("quiet") == []
    assert (tmp_path / "out" / "quiet" / "logs" / "run.log").stat().st_size > 0
    assert train("loud", "--verbose")
    assert not (tmp_path / "out" / "loud" / "logs" / "run.log").exists()


@pytest.mark.parametrize("finite,worst,best", [(7, 5, 2), (3, 3, 0), (12, 5, 5)])
def test_the_summarised_results_table_lists_each_task_once(finite, worst, best):
    """25 tasks (summarised), only `finite` with an accuracy after training: worst and best never overlap."""
    from rlora.train.launcher import results_table

    after = {f"t{i:02d}": {"n": 4, "accuracy": (i * 7 % 25) / 25 if i < finite else float("nan")} for i in range(25)}
    lines = results_table({"results_after": after, "results_table": "x.md"}).splitlines()
    # a task with NaN after training but an accuracy before is ranked by its accuracy before
    before = {"t24": {"n": 4, "accuracy": -1.0}}
    assert "| t24 |" in results_table({"results_before": before, "results_after": after, "results_table": "x.md"})
    rows = [ln.split(" | ")[0][2:] for ln in lines if re.match(r"\| t\d\d \|", ln)]
    assert len(rows) == len(set(rows)) == worst + best
    assert f"| *worst {worst} of 25* | | | | | |" in lines
    assert (f"| *best {best} of 25* | | | | | |" in lines) == (best > 0)
    ranked = sorted(range(finite), key=lambda i: (i * 7 % 25, i))
    assert rows == [f"t{i:02d}" for i in ranked[:worst] + ranked[len(ranked) - best:][::-1]]


def test_the_results_table_mean_leaves_out_tasks_without_an_accuracy():
    """A task whose accuracy is NaN or missing is blank and left out of the mean (no 'nan' in the table); the
    change's mean is over the tasks with both accuracies."""
    from rlora.train.launcher import results_table

    before = {"a": {"n": 4, "accuracy": 0.25}, "b": {"n": 4, "accuracy": 0.5}, "c": {"n": 4, "accuracy": float("nan")}}
    after = {"a": {"n": 4, "accuracy": 0.75}, "b": {"n": 4, "accuracy": float("nan")}, "c": {"n": 4, "accuracy": 0.5}}
    lines = results_table({"results_before": before, "results_after": after}).splitlines()
    assert "nan" not in "\n".join(lines).lower()
    assert "| b | 4 | 50.0 |  |  |  |" in lines
    # before: mean of a, b = 37.5; after: mean of a, c = 62.5; change: a only, +50.0 (not 62.5 - 37.5)
    assert lines[-1] == "| **mean** | | 37.5 | 62.5 | +50.0 | |"
    # no accuracy after training at all: the mean row still shows the mean before
    none_after = {t: {"n": 4, "accuracy": float("nan")} for t in before}
    assert results_table({"results_before": before, "results_after": none_after}).splitlines()[-1] == \
        "| **mean** | | 37.5 |  |  | |"
