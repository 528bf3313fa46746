"""The base model's zero-shot results are computed once per fingerprint and reused by later runs."""
import json

import pytest
import torch

from helpers import run_config
from rlora.train import zero_shot
from rlora.train.local import train_local


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLORA_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def cfg(model_dir, data_dir, tmp_path, **kw):
    base = dict(trainer__max_steps=1, mlflow__enabled=False, diagnostics__enabled=False,
                eval__max_examples_per_task=4)
    base.update(kw)
    return run_config(model_dir, data_dir, tmp_path, **base)


def test_second_run_reuses_the_first_runs_zero_shot_results(tiny_model_dir, task_dir, tmp_path, capsys):
    first = train_local(cfg(tiny_model_dir, task_dir, tmp_path, adapter__method="lora"), progress=True,
                        eval_before=True)
    entries = list((tmp_path / "cache" / "zero_shot").glob("*.json"))
    assert len(entries) == 1 and "cached" not in capsys.readouterr().out
    # another method and seed: the same base model, rows and settings -> the cached results
    second = train_local(cfg(tiny_model_dir, task_dir, tmp_path, adapter__method="mtl", trainer__seed=3),
                         progress=True, eval_before=True)
    assert "zero-shot results of the base model: cached" in capsys.readouterr().out
    assert second["results_before"] == first["results_before"] == json.loads(entries[0].read_text())
    # other dev rows, or R-LoRA without its zero-start offset (not the base model at step 0): not reused
    train_local(cfg(tiny_model_dir, task_dir, tmp_path, eval__max_examples_per_task=3), progress=True,
                eval_before=True)
    assert "cached" not in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "zero_shot").glob("*.json"))) == 2
    c = cfg(tiny_model_dir, task_dir, tmp_path, adapter__method="rlora", adapter__zero_start_offset=False)
    assert not zero_shot.starts_at_base(c)
    train_local(c, progress=True, eval_before=True)
    assert "cached" not in capsys.readouterr().out


def test_a_damaged_entry_is_recomputed(tiny_model_dir, task_dir, tmp_path):
    c = cfg(tiny_model_dir, task_dir, tmp_path, adapter__method="lora")
    ref = train_local(c, progress=False, eval_before=True)["results_before"]
    entry = next((tmp_path / "cache" / "zero_shot").glob("*.json"))
    entry.write_text("{not json")
    again = train_local(c, progress=False, eval_before=True)["results_before"]
    assert again == ref and json.loads(entry.read_text()) == ref
