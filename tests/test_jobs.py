"""jobs/ entrypoints: each documents a `ray job submit` example and answers --help; the export,
register and evaluate jobs run for real on a tiny adapter (register against a real MLflow sqlite
registry); `rlora evaluate` works end to end on a base model."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, write_tasks
from rlora.cli import main

JOBS = ["train", "evaluate", "export", "register"]
TASKS = ["parity", "sign", "size"]


@pytest.mark.parametrize("job", JOBS)
def test_job_entrypoint_documents_an_example_and_answers_help(job):
    path = REPO / "jobs" / f"{job}.py"
    doc = path.read_text()
    assert "ray job submit --address" in doc and f"python jobs/{job}.py" in doc
    out = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout


def test_evaluate_base_model(tiny_model_dir, tmp_path, capsys):
    data = write_tasks(tmp_path / "data", n_train=4, n_dev=3)
    assert main(["evaluate", "--data", str(data), "--base-model", str(tiny_model_dir), "--out",
                 str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "| parity | 3 |" in out and (tmp_path / "m.json").is_file()


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny model with non-zero B (so it changes the model)."""
    import rlora

    model = rlora.load_base_model(str(tiny_model_dir))
    rlora.inject(model, rlora.AdapterConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"], tasks=TASKS))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return rlora.save_adapter(model, tmp_path_factory.mktemp("adapter") / "lora")


def run_job(job: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(REPO / "jobs" / f"{job}.py"), *args], capture_output=True, text=True,
                         timeout=600, env={**os.environ, **(env or {})}, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_export_job_runs(tiny_adapter, tmp_path):
    out_dir = tmp_path / "peft"
    out = run_job("export", str(tiny_adapter), "--format", "peft", "--out", str(out_dir))
    assert "peft export of lora (exact" in out.stdout and str(out_dir) in out.stdout
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    from safetensors.torch import load_file

    weights = load_file(str(out_dir / "adapter_model.safetensors"))
    assert len(weights) == 2 * 2 * 2                     # 2 layers x (q_proj, v_proj) x (A, B)
    assert json.loads((out_dir / "export_report.json").read_text())["exact"] is True


@pytest.mark.slow
def test_register_job_runs(tiny_adapter, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_job("register", str(tiny_adapter), "--name", "tiny-lora", "--tracking-uri", uri,
                  env={"MLFLOW_EXPERIMENT_NAME": "jobs"})
    assert "registered tiny-lora version 1 as @challenger" in out.stdout
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = c.get_model_version_by_alias("tiny-lora", "challenger")
    assert str(mv.version) == "1" and mv.tags["method"] == "lora"
    run = c.get_run(mv.run_id)
    assert run.info.status == "FINISHED" and c.get_experiment(run.info.experiment_id).name == "jobs"
    assert [a.path for a in c.list_artifacts(mv.run_id)] == ["model"]


@pytest.mark.slow
def test_evaluate_job_runs_with_an_adapter(tiny_adapter, tmp_path):
    data = write_tasks(tmp_path / "data", n_train=4, n_dev=3)
    out = run_job("evaluate", "--data", str(data), "--adapter", str(tiny_adapter), "--out", str(tmp_path / "m.json"))
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) >= set(TASKS) and "| parity | 3 |" in out.stdout
