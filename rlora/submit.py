"""``rlora submit``: run a training config as a Ray job on an existing cluster (Ray's JobSubmissionClient).

    rlora submit examples/configs/cpu_demo.yaml --address http://127.0.0.1:8265 --wait trainer.max_steps=20

* The working directory (this repository: ``rlora/``, ``jobs/``, ``examples/``) is uploaded as the job's
  ``working_dir``; ``jobs/train.py`` runs there, so every Ray worker imports the same package.
  ``--pip`` installs packages into the job's environment instead/as well.
* Run names: the submission id is ``rlora-<run_name>-<n>``. Re-submitting the same ``trainer.run_name``
  resumes that run from its newest checkpoint in ``ray.storage_path``; leaving it unset gives a dated
  name (``<method>-YYYYmmdd-HHMMSS``) and a fresh run.
* Multi-node clusters need shared storage (``ray.storage_path`` on s3://, gs:// or NFS) and an MLflow
  server every node reaches: a local path or a sqlite URI is refused here, before anything is submitted.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

from .cli import extra_command
from .config import ConfigError, RunConfig, load_config
from .train.launcher import is_local_path

REPO_ROOT = Path(__file__).resolve().parents[1]
EXCLUDES = [".venv", ".git", "outputs", "mlruns", "*.db", "__pycache__", ".pytest_cache", "benchmarks/results",
            "*.egg-info"]


def _tracking_uri(cfg: RunConfig) -> Optional[str]:
    return cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


def validate_for_cluster(cfg: RunConfig, address: str) -> int:
    """Node count of the cluster; refuses local storage / local MLflow on more than one node."""
    from ray.util.state import list_nodes

    try:
        nodes = [n for n in list_nodes(address=address, raise_on_missing_output=False) if n.state == "ALIVE"]
    except Exception as err:
        raise ConfigError(f"Ray cluster at {address} did not answer ({str(err).splitlines()[0][:120]}): check "
                          "--address (the dashboard URL, e.g. http://127.0.0.1:8265) and RAY_AUTH_MODE/RAY_AUTH_TOKEN")
    if len(nodes) > 1:
        if cfg.ray.storage_path is None or (is_local_path(cfg.ray.storage_path)
                                            and not os.environ.get("RLORA_SHARED_LOCAL_STORAGE")):
            raise ConfigError(f"the cluster has {len(nodes)} nodes but ray.storage_path="
                              f"{cfg.ray.storage_path or '<output_dir>'} is local: use s3://, gs:// or an NFS "
                              "mount (then set RLORA_SHARED_LOCAL_STORAGE=1)")
        uri = _tracking_uri(cfg)
        if cfg.mlflow.enabled and (uri is None or uri.startswith(("sqlite:", "file:", "/", "."))):
            raise ConfigError(f"the cluster has {len(nodes)} nodes but mlflow.tracking_uri={uri or '<local sqlite>'} "
                              "is local to one machine: point it at an MLflow server (http://...)")
    return len(nodes)


def submission_id(client, run_name: str) -> str:
    prefix = f"rlora-{run_name}-"
    taken = {j.submission_id for j in client.list_jobs() if (j.submission_id or "").startswith(prefix)}
    n = 1
    while f"{prefix}{n}" in taken:
        n += 1
    return f"{prefix}{n}"


def submit(config: str, overrides: list[str], address: str, wait: bool, pip: Optional[list[str]] = None,
           entrypoint_num_cpus: float = 0.0, working_dir: Path = REPO_ROOT) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    if not (Path(working_dir) / "jobs" / "train.py").is_file():
        raise ConfigError(f"rlora submit uploads a source checkout, but {working_dir} has no jobs/train.py (rlora is "
                          "installed without its repository): run it from a clone installed with `pip install -e .`")
    cfg = load_config(config, overrides)  # type and value errors before anything leaves this machine
    run_name = cfg.trainer.run_name or f"{cfg.adapter.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [o for o in overrides if not o.startswith("trainer.run_name=")] + [f"trainer.run_name={run_name}"]
    validate_for_cluster(cfg, address)
    cfg_path = Path(config).resolve()
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "HF_HUB_OFFLINE",
                                      "RLORA_CACHE", "RLORA_SHARED_LOCAL_STORAGE") if k in os.environ}
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env}
    if pip:
        runtime_env["pip"] = pip
    try:  # a config inside the uploaded working dir is named by its path; any other travels in the env
        config_arg = str(cfg_path.relative_to(working_dir.resolve()))
    except ValueError:
        env["RLORA_CONFIG_YAML"] = cfg_path.read_text(encoding="utf-8")
        config_arg = "env:RLORA_CONFIG_YAML"
    quoted = " ".join(_quote(x) for x in overrides)
    entrypoint = f"python jobs/train.py --config {_quote(config_arg)} {quoted}".strip()
    client = JobSubmissionClient(address)
    sid = submission_id(client, run_name)
    deadline = time.time() + 120
    while True:  # a head that just started may not have its job agent up yet
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env,
                              entrypoint_num_cpus=entrypoint_num_cpus, metadata={"rlora.run_name": run_name})
            break
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(2)
    print(f"[rlora] submitted {sid} (run {run_name}) to {address}\n  entrypoint: {entrypoint}\n"
          f"  logs: ray job logs --address {address} {sid} --follow", flush=True)
    if not wait:
        return 0
    import asyncio

    async def follow() -> None:
        async for lines in client.tail_job_logs(sid):
            print(lines, end="", flush=True)

    try:
        asyncio.run(follow())
    except Exception:
        pass
    status = client.get_job_status(sid)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(1)
        status = client.get_job_status(sid)
    print(f"[rlora] job {sid}: {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


@extra_command
def _register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="run a training config as a Ray job on an existing cluster")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.run_name=nightly")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                   help="the cluster's dashboard URL (default $RAY_ADDRESS or http://127.0.0.1:8265)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--wait", dest="wait", action="store_true", help="stream logs; exit with the job's status")
    g.add_argument("--no-wait", dest="wait", action="store_false", help="return after submitting (default)")
    p.add_argument("--pip", action="append", metavar="REQUIREMENT",
                   help="a pip requirement for the job's runtime environment (repeat the flag for more)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0.0)
    p.set_defaults(wait=False, fn=lambda a: submit(a.config, a.overrides, a.address, a.wait, a.pip,
                                                   a.entrypoint_num_cpus))


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["submit", *sys.argv[1:]]))
