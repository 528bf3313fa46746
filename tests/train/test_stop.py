"""SIGTERM to a running `rlora train` (Ray workers): one line saying where it stopped and where the same
command resumes, exit code 143, and every process the command started is gone (Ray's agents too)."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from helpers import run_config



def stop_line_steps(text: str) -> tuple[int, int]:
    """(N, M) of the one ``[rlora] stopped at step N; the same command resumes from the checkpoint of step M``."""
    [stop] = [ln for ln in text.splitlines() if ln.startswith("[rlora] stopped")]
    m = re.fullmatch(r"\[rlora\] stopped at step (\d+); the same command resumes from the checkpoint of step (\d+)",
                     stop)
    assert m, stop
    return int(m.group(1)), int(m.group(2))

@pytest.mark.slow
def test_sigterm_stops_cleanly_and_leaves_no_process(tiny_model_dir, task_dir, tmp_path):
    import psutil

    cfg = run_config(tiny_model_dir, task_dir, tmp_path / "out", trainer__run_name="stopme", trainer__max_steps=400,
                     trainer__save_steps=2, ray__num_workers=1, diagnostics__enabled="false",
                     mlflow__log_system_metrics="false")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.Popen([sys.executable, "-m", "rlora.cli", "train", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    out, started = [], []
    try:
        deadline = time.monotonic() + 150
        for line in proc.stdout:
            out.append(line)
            if re.search(r"\[rlora\] checkpoint: step 4\b", line):
                break
            assert time.monotonic() < deadline, "".join(out)
        assert proc.poll() is None, "".join(out)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in started)  # a real Ray instance was started
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=90)
        out.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(out)
    assert proc.returncode == 143, text
    stopped, resumes = stop_line_steps(text)
    assert stopped >= resumes >= 4, text
    time.sleep(1)
    left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], [(p.pid, p.name()) for p in left]
    log = (tmp_path / "out" / "stopme" / "logs" / "run.log").read_text()
    assert "SIGTERM received" not in text + log and "Traceback" not in text
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    [run] = c.search_runs([c.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "KILLED"


@pytest.mark.slow
def test_sigint_stops_a_local_compare_cell_at_a_step(tiny_model_dir, task_dir, tmp_path):
    """`rlora compare --local` trains its cell in a thread: SIGINT stops that thread at its next step
    boundary, prints the line on the console (not into the cell's log) and exits 130."""
    cfg = run_config(tiny_model_dir, task_dir, tmp_path / "out", trainer__max_steps=400, trainer__save_steps=2,
                     ray__num_workers=1, diagnostics__enabled="false", mlflow__log_system_metrics="false")
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-m", "rlora.cli", "compare", str(path), "--methods", "lora", "--seeds",
                             "1", "--local", "--out", str(tmp_path / "c")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if "checkpoint: step 2" in line:
                break
        proc.send_signal(signal.SIGINT)
        out.append(proc.communicate(timeout=60)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(out)
    assert proc.returncode == 130, text
    stopped, resumes = stop_line_steps(text)
    assert stopped >= resumes >= 2, text
