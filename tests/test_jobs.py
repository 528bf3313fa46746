"""jobs/ entrypoints: each one runs and documents a runnable example; evaluate works end to end."""
import subprocess
import sys

import pytest

from helpers import REPO, write_tasks
from rlora.cli import main

JOBS = ["train", "evaluate", "export", "register"]


@pytest.mark.parametrize("job", JOBS)
def test_job_entrypoint_help_and_example(job):
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
