"""The one training loop: the local path (this process, world size 1) and a one-worker Ray Train run do
the same arithmetic, and the local path checkpoints and resumes like a worker."""
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import run_config
from rlora.train.launcher import run_training

pytestmark = pytest.mark.slow


def adapter(result):
    return load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("method", ["rlora", "mtl"])
def test_local_equals_one_ray_worker(local_ray, tiny_model_dir, task_dir, tmp_path, method):
    common = dict(adapter__method=method, adapter__dropout=0.1, ray__num_workers=1, trainer__max_steps=6,
                  trainer__save_steps=4, mlflow__enabled=False, trainer__gradient_accumulation_steps=2,
                  trainer__per_device_train_batch_size=2)
    ray_res = run_training(run_config(tiny_model_dir, task_dir, tmp_path / "ray", trainer__run_name="r", **common))
    local_res = run_training(run_config(tiny_model_dir, task_dir, tmp_path / "local", trainer__run_name="l",
                                        **common), local=True)
    assert len(ray_res.summary["train_loss"]) == 6
    assert local_res.summary["train_loss"] == ray_res.summary["train_loss"]
    diff = max_diff(adapter(ray_res), adapter(local_res))
    print(f"{method}: max |local - Ray| adapter difference {diff:.2e}")
    assert diff <= 1e-6
    assert local_res.summary["sampler_state"] == ray_res.summary["sampler_state"]
    assert local_res.summary["results_after"] == ray_res.summary["results_after"]


def test_local_run_checkpoints_and_resumes(tiny_model_dir, task_dir, tmp_path):
    """A local run stopped after 4 of 6 steps and re-run with the same name continues from its checkpoint
    and ends with the adapter of a straight 6-step run (constant learning rate: the schedule does not
    depend on where the first run stopped)."""
    common = dict(adapter__dropout=0.1, trainer__save_steps=2, trainer__lr_scheduler_type="constant",
                  mlflow__enabled=False, ray__num_to_keep=1)
    straight = run_training(run_config(tiny_model_dir, task_dir, tmp_path / "a", trainer__max_steps=6,
                                       trainer__run_name="s", **common), local=True)
    first = run_training(run_config(tiny_model_dir, task_dir, tmp_path / "b", trainer__max_steps=4,
                                    trainer__run_name="c", **common), local=True)
    kept = sorted(p.name for p in (tmp_path / "b" / "ray_results" / "c").glob("checkpoint_*"))
    assert kept == ["checkpoint_000004"]  # ray.num_to_keep=1
    again = run_training(run_config(tiny_model_dir, task_dir, tmp_path / "b", trainer__max_steps=6,
                                    trainer__run_name="c", **common), local=True)
    assert first.summary["global_step"] == 4
    assert again.summary["resumed_from_step"] == 4 and again.summary["global_step"] == 6
    assert again.summary["train_loss"] == straight.summary["train_loss"][4:]
    assert max_diff(adapter(straight), adapter(again)) <= 1e-6
