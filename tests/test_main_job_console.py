"""The main job's console, as a user sees it: `make run`'s config with fewer steps through the CLI."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import NOISE

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_console_shows_each_line_once_and_no_noise(tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    cmd = [sys.executable, "-m", "rlora.cli", "train", str(REPO / "examples/configs/cpu_demo.yaml"),
           "trainer.max_steps=4", "trainer.save_steps=2", "trainer.logging_steps=2", "eval.max_examples_per_task=3",
           "diagnostics.every_n_steps=4", f"trainer.output_dir={tmp_path / 'out'}", "trainer.run_name=console"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    lines = [ln for ln in out.splitlines() if ln.strip()]
    dupes = {ln for ln in lines if lines.count(ln) > 1 and not set(ln) <= set("|-: ")}
    assert not dupes, dupes
    noisy = [ln for ln in lines if any(re.search(p, ln) for p in NOISE)]
    assert not noisy, noisy
    log = tmp_path / "out" / "console" / "logs" / "run.log"
    assert f"[rlora] log: {log}" in out and log.is_file() and log.stat().st_size > 0
    assert list((tmp_path / "out" / "console" / "logs").glob("worker-*.log"))
    assert sum(ln.startswith("[rlora] step ") for ln in lines) == 2
    assert "| **mean** |" in out and "| task | n | accuracy before | accuracy after |" in out
    chart = tmp_path / "out" / "console" / "accuracy_before_after.png"
    assert f"[rlora] before/after chart: {chart}" in out and chart.stat().st_size > 5_000
    assert f"[rlora] adapter: {tmp_path / 'out' / 'console' / 'adapter'}" in out
    assert "[rlora] MLflow run:" in out and "mlflow ui --backend-store-uri" in out
