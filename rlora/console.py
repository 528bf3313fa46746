"""What a run shows on the console, and where everything else goes.

The console gets rlora's own lines, once each: the run header, progress, checkpoints, the results
table, where the adapter and the MLflow run are. Everything else a run prints -- library warnings,
DeepSpeed's and Ray's own logs, C++ log lines -- goes to the run's log file, named on the console at
the start. ``verbose`` (``rlora train --verbose``) shows it all on the console instead. Errors are never
hidden: a failing command still prints its one-line error after the log is closed.

    with console.run_log(path, verbose):   # file descriptors 1 and 2 -> path (unless verbose)
        console.say("[rlora] ...")          # always reaches the console (and the log)

When several runs share one console (``rlora compare`` training cells at once), each run's lines are
tagged with its name: ``with console.tagged("lora/proportional/seed 42"):`` -> ``[rlora] lora/... | step ...``.
The tag is a context variable: a thread started with ``contextvars.copy_context().run`` keeps it.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from pathlib import Path
from typing import Iterator, Optional, TextIO

_console: Optional[TextIO] = None  # the terminal while fds 1/2 point at the log file
_log: Optional[TextIO] = None
_log_path: Optional[Path] = None  # the file this process's output goes to, while a run_log is open


_tag: contextvars.ContextVar[str] = contextvars.ContextVar("rlora_console_tag", default="")


@contextlib.contextmanager
def tagged(tag: str) -> Iterator[None]:
    """Lines said in this block (this thread, and threads started with a copy of its context) name ``tag``."""
    token = _tag.set(tag)
    try:
        yield
    finally:
        _tag.reset(token)


def active_log() -> Optional[Path]:
    """The log file capturing this process's output now (an enclosing :func:`run_log`), or None."""
    return _log_path


def say(line: str) -> None:
    """Print one of rlora's own lines to the console (and into the run's log, if one is open)."""
    tag = _tag.get()
    if tag:
        line = f"[rlora] {tag} | {line[len('[rlora] '):]}" if line.startswith("[rlora] ") else f"{tag} | {line}"
    out = _console or sys.stdout
    out.write(line + "\n")
    out.flush()
    if _log is not None and _console is not None:
        _log.write(line + "\n")
        _log.flush()


@contextlib.contextmanager
def run_log(path: Path, verbose: bool = False) -> Iterator[Path]:
    """Send this process's stdout and stderr (Python and C level) to ``path`` for the block. Inside
    another ``run_log`` it changes nothing: the enclosing log keeps capturing (see :func:`active_log`)."""
    global _console, _log, _log_path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if verbose or _console is not None:
        yield path
        return
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(1), os.dup(2)
    _console = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    _log = os.fdopen(os.dup(log_fd), "a", buffering=1)
    _log_path = path
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _console.close()
        _log.close()
        _console = _log = _log_path = None


def redirect_process_output(path: Path) -> None:
    """For a worker process: its stdout and stderr go to ``path`` (appended) from now on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
