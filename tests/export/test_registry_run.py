"""The registry linked to training: a model version registered from a training run's adapter has that
run as its source run (the run page lists it), and `mlflow models serve -m models:/NAME@alias` answers a
real REST request on 127.0.0.1 with what the model predicts in process."""
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import free_port, run_config


@pytest.fixture(scope="module")
def trained(tiny_model_dir, task_dir, tmp_path_factory):
    from rlora.train.launcher import run_training

    out = tmp_path_factory.mktemp("reg-train")
    return run_training(run_config(tiny_model_dir, task_dir, out, trainer__run_name="reg", ray__num_workers=1,
                                   trainer__max_steps=2, diagnostics__enabled="false",
                                   mlflow__log_system_metrics="false"), local=True, verbose=False)


def test_version_source_run_is_the_training_run(trained):
    from mlflow.tracking import MlflowClient

    from rlora.export.registry import register

    uri, rid = trained.tracking_uri, trained.mlflow_run_id
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    reg = register(trained.adapter_dir, name="rlora-linked", tracking_uri=uri)
    assert reg.run_id == rid
    mv = c.get_model_version_by_alias("rlora-linked", "challenger")
    assert mv.run_id == rid and mv.source.startswith(c.get_run(rid).info.artifact_uri + "/registered/rlora-linked/")
    # a multi-task version names its tasks, not an empty `task`
    assert "task" not in mv.tags and mv.tags["tasks"] == ",".join(json.loads(
        (trained.adapter_dir / "rlora_adapter.json").read_text())["tasks"])
    # what the run page lists under "Registered models", and no extra run was made
    assert [v.version for v in c.search_model_versions(f"run_id = '{rid}'")] == [mv.version]
    [exp] = {r.info.experiment_id for r in c.search_runs([c.get_run(rid).info.experiment_id])}
    assert [r.info.run_id for r in c.search_runs([exp])] == [rid]
    assert c.get_run(rid).info.status == "FINISHED"
    # by run id: the same run again
    again = register(rid, name="rlora-linked", alias="champion", tracking_uri=uri)
    assert again.run_id == rid and c.get_model_version("rlora-linked", again.version).run_id == rid


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_rest_request(trained, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    from rlora.export.registry import register

    uri = trained.tracking_uri
    register(trained.adapter_dir, name="rlora-served", alias="prod", tracking_uri=uri)
    rows = [{"task": "parity", "input": "Is 12 even or odd?", "options": ["even", "odd"]},
            {"task": "size", "input": "Is 80 a big or small number?", "options": ["small", "big"]}]
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        expected = list(mlflow.pyfunc.load_model("models:/rlora-served@prod").predict(pd.DataFrame(rows)))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    port = free_port()
    # the server execs `uvicorn` from PATH: the environment's bin folder, as in an activated venv
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri,
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/rlora-served@prod",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 120 s"
            time.sleep(0.5)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps({"dataframe_records": rows}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                answer = json.loads(r.read())
        except OSError as err:
            pytest.fail(f"{err}: {(tmp_path / 'serve.log').read_text()[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, 15)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        log.close()
    assert answer["predictions"] == expected
    assert all(p in r["options"] for p, r in zip(expected, rows))


def test_an_adapter_folder_under_the_old_peft_file_names_registers(trained, tmp_path):
    """Folders saved before rlora's own file names (``adapter_config.json`` + ``adapter_model.safetensors``)
    still register; the packed model holds them under the current names."""
    import shutil

    from mlflow.tracking import MlflowClient

    from rlora.adapter_io import CONFIG_NAME, LEGACY_CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
    from rlora.export.registry import register

    old = tmp_path / "old-adapter"
    old.mkdir()
    shutil.copyfile(trained.adapter_dir / CONFIG_NAME, old / LEGACY_CONFIG_NAME)
    shutil.copyfile(trained.adapter_dir / WEIGHTS_NAME, old / LEGACY_WEIGHTS_NAME)
    uri = trained.tracking_uri
    reg = register(old, name="rlora-legacy-names", tracking_uri=uri)
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = c.get_model_version("rlora-legacy-names", reg.version)
    dst = tmp_path / "dl"
    dst.mkdir()
    local = Path(c.download_artifacts(mv.run_id, mv.source.split("/artifacts/", 1)[1], str(dst)))
    packed = {p.name: p for p in local.rglob("rlora_adapter.*")}
    assert set(packed) == {CONFIG_NAME, WEIGHTS_NAME}
    assert packed[WEIGHTS_NAME].read_bytes() == (old / LEGACY_WEIGHTS_NAME).read_bytes()
