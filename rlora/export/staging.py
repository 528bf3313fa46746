"""Atomic output directories: everything is written into a temporary folder beside the target and
renamed into place with ``os.replace`` only when complete, so a failed or killed export leaves
nothing at the target path.

Temporary folders are named ``.<target name>.export-tmp-<pid>-<random>``. A folder whose process is
no longer alive is stale (the export was killed) and is removed by the next export to the same target.

``RLORA_EXPORT_TEST_PAUSE=<seconds>`` makes the writer sleep after the first file is staged: tests
use it to kill an export midway.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from .errors import ExportError

PAUSE_ENV = "RLORA_EXPORT_TEST_PAUSE"
_TMP_MARK = ".export-tmp-"


def pause_for_tests(what: str) -> None:
    """Sleep ``$RLORA_EXPORT_TEST_PAUSE`` seconds (unset: return at once); says a marker line on the console
    (rlora's own console line: the command's library output goes to its log file meanwhile)."""
    raw = os.environ.get(PAUSE_ENV)
    if not raw:
        return
    try:
        seconds = float(raw)
    except ValueError:
        raise ExportError(f"{PAUSE_ENV}={raw!r} is not a number of seconds: unset it or give e.g. 30") from None
    from .. import console

    console.say(f"[rlora] paused {seconds:g}s after {what}")
    time.sleep(seconds)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove the temporary folders of earlier exports to ``target`` whose process is gone."""
    removed = []
    if not target.parent.is_dir():
        return removed
    prefix = f".{target.name}{_TMP_MARK}"
    for p in target.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        pid_text = p.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


class StagedDir:
    """``with StagedDir(out) as tmp: ...write into tmp...`` -> ``tmp`` becomes ``out`` on success.

    ``overwrite`` replaces an existing ``out``; otherwise an existing non-empty ``out`` is an error.
    Call :meth:`wrote` after each file so the test pause hook can fire after the first one.
    """

    def __init__(self, out: Path, overwrite: bool = False):
        self.out = Path(out).expanduser().absolute()
        self.overwrite = overwrite
        self.tmp: Optional[Path] = None
        self._files = 0

    def check_target(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise ExportError(f"--out {out} is a file: choose a directory path")
        if out.is_dir() and any(out.iterdir()) and not self.overwrite:
            raise ExportError(f"--out {out} exists and is not empty: choose a new path or pass --overwrite")

    def __enter__(self) -> Path:
        self.check_target()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.out)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}{_TMP_MARK}{os.getpid()}-", dir=self.out.parent))
        return self.tmp

    def wrote(self, name: str) -> None:
        self._files += 1
        if self._files == 1:
            pause_for_tests(f"writing {name}")

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            self.check_target()
            old = None
            if self.out.exists():
                old = self.out.parent / f"{self.tmp.name}-old"
                os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False
