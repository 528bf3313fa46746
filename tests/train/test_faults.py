"""Fault tolerance with real Ray: workers dying at several points, a worker SIGKILLed from outside, the
driver stopped with SIGTERM and re-run, a node lost and replaced, corrupted checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from helpers import run_config, worker_pids

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
COMMON = dict(deepspeed__stage=2, trainer__max_steps=6, trainer__save_steps=2, adapter__dropout=0.1)


def tensors(res):
    return load_file(str(Path(res.adapter_dir) / "rlora_adapter.safetensors"))


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def straight(local_ray, tiny_model_dir, task_dir, tmp_path_factory):
    from rlora.train.launcher import run_training

    return run_training(run_config(tiny_model_dir, task_dir, tmp_path_factory.mktemp("straight"),
                                   trainer__run_name="straight", **COMMON))


@pytest.mark.parametrize("kill_at", [1, 3, 6])
def test_worker_dies_at_three_points(local_ray, straight, tiny_model_dir, task_dir, tmp_path, kill_at):
    """Kill points: before the first checkpoint (restart from scratch), between checkpoints, at the last step."""
    from mlflow.tracking import MlflowClient

    from rlora.train.launcher import run_training

    res = run_training(run_config(tiny_model_dir, task_dir, tmp_path, trainer__run_name=f"kill{kill_at}",
                                  trainer__fail_at_step=kill_at, ray__max_failures=1, **COMMON))
    s = res.summary
    assert s["global_step"] == 6
    saved = [k for k in range(2, kill_at + 1, 2) if k < 6]  # checkpoints every 2 steps, none at the end
    assert s["resumed_from_step"] == (saved[-1] if saved else None)
    assert s["sampler_state"] == straight.summary["sampler_state"]  # no example trained twice or skipped
    diff = max_diff(tensors(straight), tensors(res))
    print(f"kill at step {kill_at}: resumed from {s['resumed_from_step']}, max |resumed - straight| = {diff:.2e}")
    assert diff <= 1e-6
    hist = MlflowClient(res.tracking_uri).get_metric_history(res.mlflow_run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(1, 7))


def _loss_steps(uri, exp):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    e = c.get_experiment_by_name(exp)
    if e is None:
        return []
    runs = c.search_runs([e.experiment_id])
    return [m.step for r in runs for m in c.get_metric_history(r.info.run_id, "train/loss")]


def _write_cfg(tiny_model_dir, task_dir, tmp_path, **kw):
    cfg = run_config(tiny_model_dir, task_dir, tmp_path / "out", **kw)
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return f, cfg


def test_sigkill_a_worker_from_outside(tiny_model_dir, task_dir, tmp_path):
    """A worker process is SIGKILLed by pid while training; Ray restarts the group from the checkpoint."""
    f, cfg = _write_cfg(tiny_model_dir, task_dir, tmp_path, trainer__run_name="sigkill", trainer__max_steps=30,
                        trainer__save_steps=4, ray__max_failures=2)
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    proc = subprocess.Popen([str(BIN / "rlora"), "train", str(f)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        deadline = time.time() + 300
        while time.time() < deadline and max(_loss_steps(uri, "tests") or [0]) < 6:
            time.sleep(1)
        pids = worker_pids(proc.pid)  # only this run's workers
        assert pids, "no RayTrainWorker process found"
        os.kill(pids[-1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads(sorted((tmp_path / "out" / "ray_results" / "sigkill").glob("checkpoint_*/results.json"))[-1]
                         .read_text())
    assert summary["global_step"] == 30 and summary["resumed_from_step"] >= 4
    assert summary["wall_seconds_before"] == 0.0  # a restart within one invocation: its own clock covers it
    steps = _loss_steps(uri, "tests")
    assert sorted(steps) == list(range(1, 31))  # one MLflow run, no repeated steps


def test_driver_sigterm_then_same_command_resumes(tiny_model_dir, task_dir, tmp_path):
    f, cfg = _write_cfg(tiny_model_dir, task_dir, tmp_path, trainer__run_name="driver", trainer__max_steps=30,
                        trainer__save_steps=3)
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([str(BIN / "rlora"), "train", str(f)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and max(_loss_steps(uri, "tests") or [0]) < 8:
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    # the stop may land while Ray rewrites its run snapshot (truncate, then write): make that case certain
    snap = tmp_path / "out" / "ray_results" / "driver" / "checkpoint_manager_snapshot.json"
    snap.write_text(snap.read_text()[:40])
    done = subprocess.run([str(BIN / "rlora"), "train", str(f)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "resuming from" in done.stdout
    assert "Ray's run snapshot was cut short by the last stop" in done.stdout
    summary = json.loads(sorted((tmp_path / "out" / "ray_results" / "driver").glob("checkpoint_*/results.json"))[-1]
                         .read_text())
    assert summary["global_step"] == 30 and summary["resumed_from_step"] >= 6
    assert summary["wall_seconds_before"] > 0.0  # the stopped invocation's time carries over
    steps = _loss_steps(uri, "tests")
    assert sorted(steps) == list(range(1, 31))


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    from rlora.train import checkpoint as ckpt

    d = tmp_path / "checkpoint_1"
    (d / "ds").mkdir(parents=True)
    with pytest.raises(ckpt.CheckpointError, match="no trainer_state.json: it is incomplete"):
        ckpt.read_state(d)
    (d / "trainer_state.json").write_text('{"global_step": 3, "comple')
    with pytest.raises(ckpt.CheckpointError, match="corrupted"):
        ckpt.read_state(d)
    (d / "trainer_state.json").write_text('{"global_step": 3}')
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.read_state(d)


def test_truncated_checkpoint_shards_fail_loudly(local_ray, tiny_model_dir, task_dir, tmp_path):
    """A checkpoint whose DeepSpeed shard is truncated is refused with the path named, not half-loaded."""
    from rlora.train.launcher import run_training

    first = run_training(run_config(tiny_model_dir, task_dir, tmp_path, trainer__run_name="trunc",
                                    trainer__max_steps=2, trainer__save_steps=1, mlflow__enabled=False))
    ck = Path(first.checkpoint_dir)
    shard = sorted((ck / "ds").glob("*optim_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[:64])
    with pytest.raises(Exception) as info:
        run_training(run_config(tiny_model_dir, task_dir, tmp_path, trainer__run_name="trunc2", trainer__max_steps=4,
                                trainer__resume_from_checkpoint=str(ck), mlflow__enabled=False))
    assert "truncated or corrupted" in str(info.value)


def ray_snapshot(name="checkpoint_here", **change):
    """A full snapshot as Ray 2.60's checkpoint manager writes it (its _CheckpointManagerState.json())."""
    import ray

    result = {"version": 0, "checkpoint_dir_name": name, "metrics": {"global_step": 1, "loss": 1.5}}
    state = {"ray_version": ray.__version__, "checkpoint_results": [result], "checkpoint_report_indices": [0],
             "latest_checkpoint_result": result, "pending_training_results": [], "pending_validation_specs": [],
             "current_report_index": 1, "validated_checkpoint_dir_names": [],
             "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}
    state.update(change)
    return json.dumps({k: v for k, v in state.items() if v is not ...})


@pytest.mark.parametrize("text, broken", [
    ("", True),                                                            # truncated before the write
    ('{"ray_version": "2.60.0", "checkpoint_res', True),                   # cut in the middle
    (ray_snapshot("checkpoint_gone"), True),                               # names a missing checkpoint
    ('{"ray_version": "2.60.0", "checkpoint_results": [{"checkpoint_dir_name": "checkpoint_here"}]}', True),
    (ray_snapshot(current_report_index=...), True),                        # a field Ray's model requires
    (ray_snapshot(ray_version="2.0.0"), True),                             # another Ray's snapshot
    (ray_snapshot(checkpoint_report_indices=[]), True),                    # Ray asserts one index per result
    (ray_snapshot(), False),
])
def test_a_cut_short_ray_snapshot_is_set_aside(tmp_path, text, broken):
    """Ray's controller dies in its constructor on an empty/partial snapshot, one its model rejects or one
    naming a missing checkpoint; the driver moves such a file aside (and only such a file) before Ray
    starts, never over an earlier set-aside file."""
    from rlora.train import checkpoint as ckpt

    (tmp_path / "checkpoint_here").mkdir()
    snap = tmp_path / ckpt.RAY_SNAPSHOT
    snap.write_text(text)
    aside = ckpt.set_aside_broken_ray_snapshot(tmp_path)
    assert (aside is not None) == broken
    assert snap.exists() != broken
    if broken:
        assert aside.read_text() == text and aside.name.endswith(".broken")
        for n in (1, 2):  # later broken snapshots keep the earlier ones
            snap.write_text(f"cut {n}")
            assert ckpt.set_aside_broken_ray_snapshot(tmp_path).name == f"{ckpt.RAY_SNAPSHOT}.broken.{n}"
        assert aside.read_text() == text and not snap.exists()
        assert (tmp_path / f"{ckpt.RAY_SNAPSHOT}.broken.1").read_text() == "cut 1"
