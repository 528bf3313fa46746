"""`rlora submit` against a real local Ray head started for the test (127.0.0.1, its own temp dir)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import free_port, write_tasks

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head` with token auth off for this throwaway head. Teardown stops only the processes
    this head started (those naming its temp dir, and their descendants), never other Ray clusters."""
    import psutil

    temp = Path("/tmp") / f"rh{os.getpid()}"  # short: Ray's socket paths must stay under 107 bytes
    # as with an activated venv: the head and the job entrypoint find this environment's python
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
                    "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                    "--temp-dir", str(temp), "--disable-usage-stats",
                    # the agents' fixed default ports would collide with any other Ray on this machine
                    "--dashboard-agent-listen-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                    "--metrics-export-port", str(free_port()), "--ray-client-server-port", str(free_port())],
                   check=True, env=env, capture_output=True)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        ours = [p for p in psutil.process_iter(["cmdline"]) if any(str(temp) in c for c in (p.info["cmdline"] or []))]
        family = {p.pid: p for p in ours}
        for p in ours:
            try:
                family.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                pass
        for p in family.values():
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(list(family.values()), timeout=15)
        for p in alive:
            p.kill()


def test_submit_wait_succeeds_and_records_adapter_and_mlflow(ray_head, tiny_model_dir, tmp_path):
    address, env = ray_head
    data = write_tasks(tmp_path / "data")
    out = tmp_path / "out"
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "adapter": {"method": "mtl", "r": 4, "num_heads": 2, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": str(data), "max_length": 64},
        "trainer": {"max_steps": 3, "per_device_train_batch_size": 2, "output_dir": str(out), "save_steps": 2,
                    "run_name": "submitted"},
        "deepspeed": {"stage": 1},
        "ray": {"num_workers": 2, "resources_per_worker": {"CPU": 1}, "storage_path": str(tmp_path / "store")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "submit-test"},
        "eval": {"max_examples_per_task": 2, "before_training": False},
    }
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([str(BIN / "rlora"), "submit", str(cfg_file), "--address", address, "--wait"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    assert (out / "submitted" / "adapter" / "rlora_adapter.safetensors").is_file()
    assert list((tmp_path / "store" / "submitted").glob("checkpoint_*"))
    from mlflow.tracking import MlflowClient

    c = MlflowClient(cfg["mlflow"]["tracking_uri"])
    runs = c.search_runs([c.get_experiment_by_name("submit-test").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert c.get_metric_history(runs[0].info.run_id, "train/loss")


def test_submit_refuses_bad_config_before_submitting(ray_head, tmp_path):
    address, env = ray_head
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stepz: 3\n")
    proc = subprocess.run([str(BIN / "rlora"), "submit", str(bad), "--address", address], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: trainer.max_stepz: unknown key (check the spelling; see " \
                                  "examples/configs/cpu_demo.yaml)"
    assert "Traceback" not in proc.stderr


def test_pip_takes_one_requirement_per_flag_and_leaves_overrides_alone():
    """`--pip` used to take every word after it, so an override written after it went to pip."""
    from rlora.cli import _load_extra_commands, build_parser

    _load_extra_commands()
    args, extra = build_parser().parse_known_args(["submit", "c.yaml", "--pip", "emoji==2.14.1", "--pip", "rich",
                                                   "trainer.max_steps=20"])
    assert args.pip == ["emoji==2.14.1", "rich"] and extra == ["trainer.max_steps=20"]


def test_submit_without_a_source_checkout_is_refused_before_contacting_the_cluster(tmp_path):
    """Installed without its repository there is no jobs/train.py to run: one clear line, nothing uploaded
    (the address points nowhere, so reaching the cluster would be a different error)."""
    from rlora.config import ConfigError
    from rlora.submit import REPO_ROOT, submit

    assert (REPO_ROOT / "jobs" / "train.py").is_file()  # this checkout is a source checkout
    with pytest.raises(ConfigError, match=r"has no jobs/train.py .* run it from a clone installed with"):
        submit(str(REPO_ROOT / "examples" / "configs" / "cpu_demo.yaml"), [], "http://127.0.0.1:9", wait=False,
               working_dir=tmp_path)


def test_no_wait_returns_while_the_job_still_runs_with_its_entrypoint_cpus(ray_head, tiny_model_dir, tmp_path):
    """`--no-wait` (the default) returns once the job is submitted: exit 0, the submission line and no final
    status. `--entrypoint-num-cpus` is the CPU reservation of the job's driver: 3 CPUs on this 2-CPU head keep
    the job pending, while the same job with the default (0) starts running. `--pip` reaches the pending job's
    runtime environment."""
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    address, env = ray_head
    cfg = {"model": {"name_or_path": str(tiny_model_dir)},
           "adapter": {"method": "lora", "r": 2, "target_modules": ["q_proj"]},
           "data": {"path": str(write_tasks(tmp_path / "data")), "max_length": 32},
           "trainer": {"max_steps": 500, "output_dir": str(tmp_path / "out")},
           "ray": {"num_workers": 1, "storage_path": str(tmp_path / "store")}, "mlflow": {"enabled": False}}
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    client = JobSubmissionClient(address)
    for name, cpus, pip in (("starved", "3", ["--pip", "emoji==2.14.1"]), ("free", "0", [])):
        proc = subprocess.run([str(BIN / "rlora"), "submit", str(cfg_file), f"trainer.run_name={name}", "--address",
                               address, "--no-wait", "--entrypoint-num-cpus", cpus, *pip],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"[rlora] submitted rlora-{name}-1" in proc.stdout and "[rlora] job rlora-" not in proc.stdout
    deadline = time.time() + 120
    while client.get_job_status("rlora-free-1") != JobStatus.RUNNING and time.time() < deadline:
        time.sleep(1)
    assert client.get_job_status("rlora-free-1") == JobStatus.RUNNING
    assert client.get_job_status("rlora-starved-1") == JobStatus.PENDING
    # `--pip` goes into the job's runtime environment (the pending job never installs it), and only there
    pip_env = client.get_job_info("rlora-starved-1").runtime_env.get("pip")
    assert pip_env is not None and "emoji==2.14.1" in (pip_env.get("packages") if isinstance(pip_env, dict) else pip_env)
    assert "pip" not in client.get_job_info("rlora-free-1").runtime_env
    for sid in ("rlora-free-1", "rlora-starved-1"):
        client.stop_job(sid)
