"""Cell keys (rlora/compare/grid.py): what changes a cell's result changes its key; where the run lives
does not, so a results folder copied to another clone or machine resumes there."""
import shutil

from helpers import run_config, write_tasks
from rlora.compare.grid import cell_key


def key(data, out, **overrides):
    return cell_key(run_config("smollm2-135m", data, out, **overrides))


def test_the_key_ignores_where_data_and_outputs_live(tmp_path):
    data = write_tasks(tmp_path / "a" / "data")
    copy = tmp_path / "b" / "elsewhere"
    shutil.copytree(data, copy)
    ref = key(data, tmp_path / "out")
    assert key(copy, tmp_path / "other-out") == ref
    assert key(data, tmp_path / "out", ray__address="ray://head:10001", ray__storage_path="s3://bucket/runs",
               mlflow__tracking_uri="http://127.0.0.1:5000", mlflow__experiment_name="x", trainer__logging_steps=7,
               trainer__save_steps=5, trainer__run_name="named") == ref


def test_the_key_follows_data_contents_and_training_settings(tmp_path):
    data = write_tasks(tmp_path / "data")
    ref = key(data, tmp_path)
    assert key(data, tmp_path, trainer__seed=8) != ref
    assert key(data, tmp_path, trainer__learning_rate=1e-3) != ref
    assert key(data, tmp_path, adapter__method="lora") != ref
    dev = data / "parity" / "dev.jsonl"
    dev.write_text(dev.read_text().replace("even or odd", "odd or even", 1))
    assert key(data, tmp_path) != ref
