"""The MLflow model registry against a real MLflow (sqlite backend; one test over a real `mlflow server`):
register an adapter as a pyfunc model, load it by alias, predict the same answers as in process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import rlora
from rlora.export import ExportError, register, validate_alias, validate_name

from .conftest import TASKS, synthetic_rows
from .test_atomic import run_and_kill


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A sqlite tracking store with an explicit artifact location (created once per module)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    art = (root / "artifacts").as_uri()
    MlflowClient(tracking_uri=uri).create_experiment("rlora-test", artifact_location=art)
    return {"uri": uri, "artifacts": art, "experiment": "rlora-test", "root": root}


@pytest.fixture
def mlflow_env(tracking, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking["uri"])
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", tracking["experiment"])
    return tracking


def _rows() -> "object":
    import pandas as pd

    rows = []
    for t in TASKS:
        rows += [{"task": t, "input": r["input"], "options": r["options"]} for r in synthetic_rows(t, 3)]
    rows.append({"task": "beta", "input": "Say a word.", "options": None})
    return pd.DataFrame(rows)


def _in_process_answers(base_dir: Path, adapter: Path, df) -> list[str]:
    from rlora.data import Example, evaluate_multiple_choice
    from rlora.models import load_tokenizer

    model = rlora.load_adapter(rlora.load_base_model(str(base_dir)), adapter)
    tok = load_tokenizer(str(base_dir))
    out = []
    for i, rec in enumerate(df.to_dict("records")):
        opts = rec["options"]
        ex = Example(task=rec["task"], id=str(i), input=rec["input"], options=opts, target=opts[0] if opts else "-")
        res = evaluate_multiple_choice(model, tok, [ex], task_id=TASKS.index(rec["task"]), return_details=True)
        out.append(res["predictions"][0])
    return out


def _versions(uri: str, name: str) -> list:
    from mlflow.tracking import MlflowClient

    return list(MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(f"name='{name}'"))


# ----------------------------------------------------------------------------------------------
# validation (no MLflow needed)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", "a/b", "team:model", " lead", "x" * 300, "-dash"])
def test_invalid_names(name):
    with pytest.raises(ExportError, match="invalid registered model name"):
        validate_name(name)


@pytest.mark.parametrize("alias", ["latest", "v3", "has space", ""])
def test_invalid_aliases(alias):
    with pytest.raises(ExportError):
        validate_alias(alias)


def test_valid_name_and_alias():
    assert validate_name("rlora-smollm2_v1.2") and validate_alias("challenger")


def test_cli_invalid_name_is_one_line_and_registers_nothing(adapters, tmp_path, capsys):
    from rlora.cli import main

    uri = f"sqlite:///{tmp_path / 'never.db'}"
    code = main(["register", str(adapters["lora"]), "--name", "bad/name", "--tracking-uri", uri])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "bad/name" in err
    assert not (tmp_path / "never.db").exists()                 # rejected before MLflow was touched


def test_register_needs_a_tracking_uri(adapters, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ExportError, match="tracking URI"):
        register(adapters["lora"], name="m")


# ----------------------------------------------------------------------------------------------
# registry round trips (sqlite)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_register_load_by_alias_predicts_like_in_process(base_dir, adapters, mlflow_env):
    import mlflow.pyfunc

    reg = register(adapters["mtl"], name="rlora-mtl", alias="challenger", tracking_uri=mlflow_env["uri"])
    assert reg.version == "1" and reg.model_uri == "models:/rlora-mtl@challenger"
    model = mlflow.pyfunc.load_model("models:/rlora-mtl@challenger")
    df = _rows()
    got = model.predict(df)
    assert list(got) == _in_process_answers(base_dir, adapters["mtl"], df)
    assert set(got[:-1]) <= {"yes", "no", "maybe"}
    # the logged model references the base model; it does not hold its weights
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{reg.run_id}/model"))
    assert not list(local.rglob("model.safetensors"))
    assert (local / "artifacts" / "adapter" / "rlora_adapter.safetensors").is_file()
    cfg = model.model_config
    assert cfg["base_model"] == str(base_dir) and cfg["method"] == "mtl"


@pytest.mark.slow
def test_promotion_moves_the_champion_alias(adapters, mlflow_env, capsys):
    """`rlora register --alias champion` points champion at the new version; the next registration (default
    alias) becomes the challenger and leaves champion where it was, until it is moved."""
    from mlflow.tracking import MlflowClient

    from rlora.cli import main

    uri = mlflow_env["uri"]
    assert main(["register", str(adapters["lora"]), "--name", "rlora-promo", "--alias", "champion",
                 "--tracking-uri", uri]) == 0
    assert "rlora-promo version 1 as @champion" in capsys.readouterr().out
    second = register(adapters["lora"], name="rlora-promo", tracking_uri=uri)
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(c.get_model_version_by_alias("rlora-promo", "champion").version) == "1"
    assert str(c.get_model_version_by_alias("rlora-promo", "challenger").version) == second.version == "2"
    c.set_registered_model_alias("rlora-promo", "champion", second.version)
    assert str(c.get_model_version_by_alias("rlora-promo", "champion").version) == "2"


@pytest.mark.slow
def test_default_registration_never_moves_the_champion(adapters, mlflow_env, capsys):
    """Without --alias (CLI) or alias= (API) a new version becomes the challenger; champion stays put."""
    from mlflow.tracking import MlflowClient

    from rlora.cli import main

    uri = mlflow_env["uri"]
    champion = register(adapters["lora"], name="rlora-default", alias="champion", tracking_uri=uri)
    assert main(["register", str(adapters["lora"]), "--name", "rlora-default", "--tracking-uri", uri]) == 0
    assert "as @challenger" in capsys.readouterr().out
    by_api = register(adapters["lora"], name="rlora-default", tracking_uri=uri)
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(c.get_model_version_by_alias("rlora-default", "champion").version) == champion.version == "1"
    assert by_api.alias == "challenger" and by_api.version == "3"
    assert str(c.get_model_version_by_alias("rlora-default", "challenger").version) == "3"
    assert len(_versions(uri, "rlora-default")) == 3


@pytest.mark.slow
def test_register_from_run_id_and_unknown_task(adapters, mlflow_env, capsys):
    from mlflow.tracking import MlflowClient

    from rlora.cli import main

    uri = mlflow_env["uri"]
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(mlflow_env["experiment"]).experiment_id
    run = c.create_run(exp)
    c.log_artifacts(run.info.run_id, str(adapters["hydra"]), "adapter")
    c.set_terminated(run.info.run_id)
    code = main(["register", run.info.run_id, "--name", "rlora-hydra", "--task", "gamma", "--tracking-uri", uri])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "gamma" in err[0] and "alpha" in err[0]
    assert _versions(uri, "rlora-hydra") == []
    reg = register(run.info.run_id, name="rlora-hydra", task="beta", tracking_uri=uri)
    assert reg.run_id == run.info.run_id  # the model is logged into, and the version linked to, that run
    assert c.get_model_version("rlora-hydra", reg.version).run_id == run.info.run_id


@pytest.mark.slow
def test_export_from_run_id_logs_the_report(adapters, data_dir, mlflow_env, tmp_path, monkeypatch):
    """`rlora export RUN_ID --tracking-uri URI` (no $MLFLOW_TRACKING_URI: the flag alone finds the run) exports
    the run's adapter and logs the export's report back to that run."""
    from mlflow.tracking import MlflowClient

    from rlora.cli import main

    uri = mlflow_env["uri"]
    c = MlflowClient(tracking_uri=uri)
    run = c.create_run(c.get_experiment_by_name(mlflow_env["experiment"]).experiment_id)
    c.log_artifacts(run.info.run_id, str(adapters["rlora"]), "adapter")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    out = tmp_path / "peft"
    assert main(["export", run.info.run_id, "--task", "beta", "--out", str(out), "--data", str(data_dir),
                 "--max-examples", "2", "--tracking-uri", uri]) == 0
    report = json.loads((out / "export_report.json").read_text())
    metrics = c.get_run(run.info.run_id).data.metrics
    assert metrics["export/beta/relative_logit_error"] == pytest.approx(report["relative_logit_error"])
    logged = [a.path for a in c.list_artifacts(run.info.run_id, "exports/beta-peft")]
    assert logged == ["exports/beta-peft/export_report.json"]


@pytest.mark.slow
def test_failed_upload_registers_nothing(adapters, mlflow_env, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = mlflow_env["uri"]
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")                                     # artifacts cannot be written below a file
    MlflowClient(tracking_uri=uri).create_experiment("broken", artifact_location=blocker.as_uri())
    with pytest.raises(ExportError, match="nothing was registered"):
        register(adapters["lora"], name="rlora-broken", tracking_uri=uri, experiment="broken")
    assert _versions(uri, "rlora-broken") == []
    c = MlflowClient(tracking_uri=uri)
    runs = c.search_runs([c.get_experiment_by_name("broken").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.slow
def test_killed_registration_registers_nothing(adapters, mlflow_env):
    uri = mlflow_env["uri"]
    run_and_kill(["register", str(adapters["lora"]), "--name", "rlora-killed", "--tracking-uri", uri])
    assert _versions(uri, "rlora-killed") == []
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models("name='rlora-killed'") == []


# ----------------------------------------------------------------------------------------------
# a real tracking server over HTTP
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_register_and_load_by_alias_over_http(base_dir, adapters, mlflow_server, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    reg = register(adapters["lora"], name="rlora-http", alias="champion", tracking_uri=mlflow_server,
                   experiment="rlora-http")
    model = mlflow.pyfunc.load_model("models:/rlora-http@champion")
    df = _rows().iloc[:4]
    assert list(model.predict(df)) == _in_process_answers(base_dir, adapters["lora"], df)
    assert reg.version == "1"


def test_cli_task_and_base_model_are_recorded_on_the_version(adapters, mlflow_env, tmp_path, capsys):
    """`--task` (the default task of a multi-head adapter's rows) and `--base-model` (instead of the adapter's
    recorded base) end up in the registered version's tags and model config; `--experiment` names the
    experiment of the registration run (without it: $MLFLOW_EXPERIMENT_NAME, here rlora-test)."""
    from mlflow.tracking import MlflowClient

    from rlora.cli import main

    uri = mlflow_env["uri"]
    assert main(["register", str(adapters["hydra"]), "--name", "rlora-tagged", "--task", "beta",
                 "--base-model", "org/other-base", "--tracking-uri", uri, "--experiment", "registrations"]) == 0
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = c.get_model_version_by_alias("rlora-tagged", "challenger")
    assert mv.tags["base_model"] == "org/other-base" and mv.tags["task"] == "beta"
    assert c.get_experiment(c.get_run(mv.run_id).info.experiment_id).name == "registrations"
    default = register(adapters["hydra"], name="rlora-untagged", tracking_uri=uri)
    mv0 = c.get_model_version("rlora-untagged", default.version)
    assert mv0.tags["base_model"] != "org/other-base" and mv0.tags.get("task", "") == ""
    assert c.get_experiment(c.get_run(mv0.run_id).info.experiment_id).name == mlflow_env["experiment"]
