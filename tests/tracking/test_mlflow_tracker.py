"""MLflow tracking against real MLflow: sqlite, and a real `mlflow server` over HTTP on 127.0.0.1."""
import warnings

import pytest

from rlora.config import validate_config
from rlora.tracking import mlflow_tracker as mt


def cfg_for(uri, **trainer):
    return validate_config({"mlflow": {"tracking_uri": uri, "experiment_name": "track"},
                            "adapter": {"tasks": ["a", "b"]},
                            "trainer": {"output_dir": "/tmp/unused", **trainer}})


def test_secrets_are_redacted_and_values_truncated():
    flat = mt.redact({"mlflow.api_key": "abc", "x.hf_token": "t", "db.password": "p", "y.secret_name": "s",
                      "adapter.r": 8, "deepspeed.extra.keys": 1})
    assert flat["mlflow.api_key"] == flat["x.hf_token"] == flat["db.password"] == flat["y.secret_name"] == "***"
    assert flat["adapter.r"] == 8
    cfg = validate_config({"deepspeed": {"extra": {"aws_secret_access_key": "XYZ", "note": "n" * 400}}})
    params = mt.config_params(cfg)
    assert params["deepspeed.extra.aws_secret_access_key"] == "***"
    assert len(params["deepspeed.extra.note"]) == 250 and all(len(v) <= 250 for v in params.values())


def test_default_is_sqlite_with_explicit_artifact_location(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cfg = validate_config({"trainer": {"output_dir": str(tmp_path)}})
    uri, exp, art = mt.resolve(cfg)
    assert uri == f"sqlite:///{tmp_path}/mlflow.db" and exp == "rlora"
    assert art == (tmp_path / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "nightly")
    assert mt.resolve(cfg)[:2] == ("http://127.0.0.1:5000", "nightly")


def _exercise(uri):
    cfg = cfg_for(uri)
    run_id, resumed = mt.start_or_resume_run(cfg, "run-x", "trainer: {}\n")
    assert not resumed
    again, resumed = mt.start_or_resume_run(cfg, "run-x")
    assert (again, resumed) == (run_id, True)  # an unfinished run of the same name is continued
    tr = mt.Tracker(uri, run_id)
    for step in range(1, 6):
        tr.log_metrics({"train/loss": 1.0 / step, "nan_is_dropped": float("nan")}, step)
    # a restarted worker's tracker skips the steps that were already logged
    tr2 = mt.Tracker(uri, run_id)
    assert tr2.resume_after == 5
    tr2.log_metrics({"train/loss": 99.0}, 4)
    tr2.log_metrics({"train/loss": 0.1}, 6)
    c = mt.client(uri)
    hist = c.get_metric_history(run_id, "train/loss")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [1, 2, 3, 4, 5, 6]
    assert 99.0 not in [m.value for m in hist]
    assert c.get_run(run_id).data.params["adapter.tasks"] == "['a', 'b']"
    tr2.finish()
    fresh, resumed = mt.start_or_resume_run(cfg, "run-x")
    assert fresh != run_id and not resumed  # a finished run is not reopened


def test_sqlite_run_lifecycle(tmp_path):
    _exercise(f"sqlite:///{tmp_path / 'm.db'}")


def test_transient_errors_warn_and_continue(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    mt.ensure_experiment(uri, "x", None)
    tr = mt.Tracker(uri, "0" * 32, retries=2)  # no such run: every call fails
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tr.log_metrics({"train/loss": 1.0}, 1)
    assert any("training continues" in str(x.message) for x in w)


@pytest.mark.slow
def test_http_server_run_lifecycle(mlflow_server):
    _exercise(mlflow_server)


def test_experiment_artifact_location_and_parent_come_from_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    c = mt.client(uri)
    parent = c.create_run(mt.ensure_experiment(uri, "sweeps", None), run_name="sweep").info.run_id
    arts = (tmp_path / "elsewhere").as_uri()
    cfg = validate_config({"mlflow": {"tracking_uri": uri, "experiment_name": "knobs", "artifact_location": arts,
                                      "parent_run_id": parent}, "trainer": {"output_dir": str(tmp_path)}})
    run_id, _ = mt.start_or_resume_run(cfg, "child")
    run = c.get_run(run_id)
    exp = c.get_experiment(run.info.experiment_id)
    assert exp.name == "knobs" and exp.artifact_location == arts
    assert run.info.artifact_uri.startswith(arts)
    assert run.data.tags["mlflow.parentRunId"] == parent
    # without them: the default experiment, artifacts beside the sqlite file, a top-level run
    plain = validate_config({"mlflow": {"tracking_uri": uri}, "trainer": {"output_dir": str(tmp_path)}})
    other = c.get_run(mt.start_or_resume_run(plain, "alone")[0])
    assert c.get_experiment(other.info.experiment_id).name == "rlora"
    assert "mlflow.parentRunId" not in other.data.tags and not other.info.artifact_uri.startswith(arts)
