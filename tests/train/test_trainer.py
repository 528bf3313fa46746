"""The distributed trainer with real Ray workers, real DeepSpeed engines and real MLflow (tiny models)."""
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlora.config import ConfigError
from rlora.train.launcher import run_training
from helpers import rows_drawn, run_config, worker_pids

pytestmark = pytest.mark.slow


def adapter_tensors(result):
    return load_file(str(Path(result.adapter_dir) / "rlora_adapter.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_workers_train_and_loss_falls(local_ray, tiny_model_dir, task_dir, tmp_path, stage):
    cfg = run_config(tiny_model_dir, task_dir, tmp_path, deepspeed__stage=stage, trainer__max_steps=12,
                     trainer__save_steps=100, trainer__learning_rate=2e-2, trainer__run_name=f"z{stage}")
    res = run_training(cfg)
    s = res.summary
    assert s["global_step"] == 12
    # ray.num_workers=2: two ranks, each its own 4 rows of every step (one worker draws half: tests/train/test_loop.py)
    assert s["sampler_state"]["fingerprint"]["world_size"] == 2 and rows_drawn(s["sampler_state"]) == 12 * 4 * 2
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(res.tracking_uri).get_metric_history(res.mlflow_run_id, "train/loss")
    losses = [m.value for m in sorted(hist, key=lambda m: m.step)]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.15, losses
    tensors = adapter_tensors(res)
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    assert set(s["results_after"]) == {"parity", "sign", "size"}
    # head diagnostics: metrics with sane values and PNG plots in the run's artifacts
    client = MlflowClient(res.tracking_uri)
    metrics = client.get_run(res.mlflow_run_id).data.metrics
    assert -1.0 <= metrics["diag/head_cos_B/mean"] <= 1.0
    assert 0.0 <= metrics["diag/router_entropy/mean"] <= 1.0
    if stage != 3:  # the interference matrix needs per-task gradients (not under ZeRO-3)
        assert -1.0 <= metrics["diag/interference/mean"] <= 1.0
    arts = [a.path for a in client.list_artifacts(res.mlflow_run_id, "diagnostics/step_000012")]
    assert any(p.endswith("head_similarity.png") for p in arts) and any(p.endswith("task_weights.png") for p in arts)


def test_zero3_adapter_equals_zero0(local_ray, tiny_model_dir, task_dir, tmp_path):
    """ZeRO-3 partitions the adapter too; the export gathers it. Same seed, same data → same weights."""
    results = {}
    for stage in (0, 3):
        cfg = run_config(tiny_model_dir, task_dir, tmp_path, deepspeed__stage=stage, trainer__max_steps=4,
                         trainer__save_steps=100, trainer__run_name=f"eq{stage}", mlflow__enabled=False)
        results[stage] = adapter_tensors(run_training(cfg))
    diff = max_diff(results[0], results[3])
    print(f"max |ZeRO-3 - ZeRO-0| adapter difference: {diff:.3e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_worker_failure_resumes_exactly(local_ray, tiny_model_dir, task_dir, tmp_path, stage):
    """A worker dies at step 5 (checkpoint at 3); Ray restarts the group, it resumes at step 3 and ends
    with the same adapter, the same data order and one MLflow run with no repeated steps."""
    common = dict(deepspeed__stage=stage, trainer__max_steps=6, trainer__save_steps=3, adapter__dropout=0.1)
    straight = run_training(run_config(tiny_model_dir, task_dir, tmp_path / "a", trainer__run_name="straight",
                                       **common))
    crashed = run_training(run_config(tiny_model_dir, task_dir, tmp_path / "b", trainer__run_name="crash",
                                      trainer__fail_at_step=5, ray__max_failures=1, **common))
    assert crashed.summary["global_step"] == straight.summary["global_step"] == 6
    assert list((tmp_path / "b" / "ray_results" / "crash").glob(".fault_injected_step5"))
    assert crashed.summary["sampler_state"] == straight.summary["sampler_state"]
    diff = max_diff(adapter_tensors(straight), adapter_tensors(crashed))
    print(f"ZeRO-{stage}: max |resumed - straight| = {diff:.3e}")
    assert diff <= 1e-6
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(crashed.tracking_uri).get_metric_history(crashed.mlflow_run_id, "train/loss")
    steps = [m.step for m in hist]
    assert sorted(steps) == list(range(1, 7)) and len(set(steps)) == len(steps)


def test_rerun_same_run_name_resumes(local_ray, tiny_model_dir, task_dir, tmp_path):
    """The driver dies (here: the run fails with no retries left); the same command resumes it."""
    cfg = run_config(tiny_model_dir, task_dir, tmp_path, trainer__max_steps=6, trainer__save_steps=3,
                     trainer__run_name="again", trainer__fail_at_step=4, ray__max_failures=0)
    with pytest.raises(Exception):
        run_training(cfg)
    cfg = run_config(tiny_model_dir, task_dir, tmp_path, trainer__max_steps=6, trainer__save_steps=3,
                     trainer__run_name="again", trainer__fail_at_step=4, ray__max_failures=0)
    res = run_training(cfg)  # the fault marker exists now, so the worker does not die again
    assert res.summary["global_step"] == 6
    assert res.summary["resumed_from_step"] == 3


def test_config_errors_fail_before_any_worker(local_ray, tiny_model_dir, task_dir, tmp_path):
    import ray

    free = ray.available_resources().get("CPU")
    with pytest.raises(ConfigError, match="target_modules"):
        run_training(run_config(tiny_model_dir, task_dir, tmp_path, adapter__target_modules="[c_attn]"))
    with pytest.raises(ConfigError, match="adapter.tasks"):
        run_training(run_config(tiny_model_dir, task_dir, tmp_path, adapter__tasks="[a, b]"))
    with pytest.raises(ConfigError, match="needs 8 CPU"):
        run_training(run_config(tiny_model_dir, task_dir, tmp_path, ray__num_workers=8))
    assert not worker_pids(), "no training worker may start for a bad config"
    assert ray.available_resources().get("CPU") == free
    assert not (tmp_path / "ray_results").exists() or not any((tmp_path / "ray_results").iterdir())
    assert not (tmp_path / "mlflow.db").exists()


def test_zero3_evaluation_with_uneven_shards_finishes(local_ray, tiny_model_dir, tmp_path):
    """Under ZeRO-3 every forward gathers the partitioned base weights (a collective), so the ranks must run
    the same forwards. 5 dev rows per task at 2 rows per forward split 3 / 2 over two ranks: 2 forwards on one
    rank, 1 on the other, unless evaluation keeps the ranks in step. The run must finish and score every row."""
    import threading

    from helpers import write_tasks

    data = write_tasks(tmp_path / "data", n_train=12, n_dev=5)
    cfg = run_config(tiny_model_dir, data, tmp_path, deepspeed__stage=3, trainer__max_steps=2, trainer__save_steps=100,
                     trainer__per_device_eval_batch_size=2, trainer__run_name="z3-eval", mlflow__enabled=False,
                     eval__max_examples_per_task="null")
    out: dict = {}
    th = threading.Thread(target=lambda: out.setdefault("res", run_training(cfg)), daemon=True)
    th.start()
    th.join(timeout=300)
    assert "res" in out, "the ZeRO-3 run did not finish (the ranks' evaluation forwards went out of step)"
    after = out["res"].summary["results_after"]
    assert {t: r["n"] for t, r in after.items()} == {"parity": 5, "sign": 5, "size": 5}
