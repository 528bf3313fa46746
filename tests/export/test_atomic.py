"""Atomic exports: a killed export leaves nothing at --out, and its temporary folder is cleaned up by
the next export to the same target."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rlora.export import ExportError, export
from rlora.export.staging import PAUSE_ENV, StagedDir, clean_stale

REPO = Path(__file__).resolve().parents[2]
CLI = "import sys; from rlora.cli import main; sys.exit(main(sys.argv[1:]))"


def test_staged_dir_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with StagedDir(out) as tmp:
            (tmp / "a.txt").write_text("a")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_staged_dir_success_renames_into_place(tmp_path):
    out = tmp_path / "sub" / "out"
    with StagedDir(out) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "a"
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_clean_stale_keeps_folders_of_live_processes(tmp_path):
    out = tmp_path / "out"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        mine = tmp_path / f".out.export-tmp-{live.pid}-abc"
        stale = tmp_path / f".out.export-tmp-{dead.pid}-def"
        other = tmp_path / ".other.export-tmp-1-x"
        for p in (mine, stale, other):
            p.mkdir()
        assert clean_stale(out) == [stale]
        assert mine.is_dir() and other.is_dir() and not stale.exists()
    finally:
        live.kill()
        live.wait()


def test_pause_env_must_be_a_number(adapters, tmp_path, monkeypatch):
    monkeypatch.setenv(PAUSE_ENV, "soon")
    with pytest.raises(ExportError, match=PAUSE_ENV):
        export(adapters["lora"], format="multihead", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def _wait_for_marker(proc: subprocess.Popen, marker: str, timeout: float) -> tuple[bool, list[str]]:
    """Read the console (stdout and stderr) until a line contains ``marker`` (or the process ends / time runs out)."""
    lines: list[str] = []
    found = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                found.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.is_set() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5 if not found.is_set() else 0)
    return found.is_set(), lines


def run_and_kill(argv: list[str], marker: str = "[rlora] paused", timeout: float = 240) -> None:
    """Run ``rlora ARGV`` in a subprocess with the pause hook, SIGKILL it once it pauses midway."""
    env = dict(os.environ, **{PAUSE_ENV: "300", "PYTHONPATH": str(REPO)})
    proc = subprocess.Popen([sys.executable, "-c", CLI, *argv], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen, lines = _wait_for_marker(proc, marker, timeout)
        assert seen, f"the subprocess never reached the pause (exit code {proc.poll()}): {''.join(lines)[-800:]}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_killed_export_leaves_no_partial_directory(adapters, data_dir, tmp_path):
    out = tmp_path / "exports" / "merged"
    run_and_kill(["export", str(adapters["mtl"]), "--task", "alpha", "--format", "merged", "--out", str(out)])
    assert not out.exists()
    stale = [p for p in out.parent.iterdir() if p.name.startswith(".merged.export-tmp-")]
    assert len(stale) == 1 and any(stale[0].iterdir())        # killed midway: a first file was written
    export(adapters["mtl"], task="alpha", format="merged", out=out)
    assert (out / "model.safetensors").is_file() and (out / "export_report.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["merged"]    # the stale temp dir is gone
