"""A clean stop of `rlora train` / `rlora compare` on SIGTERM or SIGINT.

:func:`on_signals` (the commands' main thread) turns both signals into :class:`RunStopped`, a
``KeyboardInterrupt``, so libraries on the way (Ray Train, DeepSpeed) unwind as for Ctrl-C (they may
re-raise a plain ``KeyboardInterrupt``: :func:`received` keeps the signal). Ray's
``ray.init`` installs its own SIGTERM handlers (a Python one that exits, and a C++ one that prints
``*** SIGTERM received at time=...`` stack lines); :func:`reinstall`, called right after ``ray.init``,
puts ours back in front.

Every run in progress is registered with :func:`track` (its name, checkpoint folder, number of
workers, the last step the driver heard of). :func:`stop` then, once:

1. marks the runs' MLflow runs KILLED (the same command continues the same MLflow run),
2. shuts Ray down when this process started it, then ends every process this process started that is
   still alive (SIGTERM, then SIGKILL after a grace period) -- Ray's agents included;
3. returns one line per run: ``[rlora] stopped at step N; the same command resumes from the checkpoint
   of step M`` (N: the last step reported to the console; M: the newest complete checkpoint).

The exit code is ``128 + signal`` (130 for SIGINT, 143 for SIGTERM).
"""
from __future__ import annotations

import contextlib
import re
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)
STEP_LINE = re.compile(r"\[rlora\] (?:.* \| )?step\s+(\d+)/\d+")
_active: dict[str, dict[str, Any]] = {}
_lock = threading.Lock()
_installed = False
_received: Optional[int] = None


class RunStopped(KeyboardInterrupt):
    """The command got SIGTERM or SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum, frame) -> None:
    global _received
    _received = signum  # libraries may re-raise a KeyboardInterrupt of their own: the signal is kept here
    # later signals while stopping are ignored: the cleanup must finish
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise RunStopped(signum)


def received() -> Optional[int]:
    """The signal that stopped the command (``None``: none did)."""
    return _received


def reinstall() -> None:
    """Put the handlers back in front of Ray's (call right after ``ray.init``); a no-op outside
    :func:`on_signals` or off the main thread."""
    if _installed and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _raise)


@contextlib.contextmanager
def on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`RunStopped` in the main thread for the block."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _received
    before = {s: signal.getsignal(s) for s in SIGNALS}
    _installed, _received = True, None
    try:
        reinstall()
        yield
    finally:
        _installed = False
        for s, h in before.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def track(run_name: str, **info: Any) -> None:
    """Register (or update) a run in progress: ``storage_dir``, ``world``, ``mlflow_run_id``,
    ``tracking_uri``, ``trainer`` (a local :class:`rlora.train.loop.Trainer`), ``last_step``."""
    with _lock:
        _active.setdefault(run_name, {}).update(info)


def untrack(run_name: str) -> None:
    with _lock:
        _active.pop(run_name, None)


def heard(run_name: str, line: str) -> None:
    """Note the step of a progress line relayed from the workers."""
    m = STEP_LINE.search(line)
    if m:
        track(run_name, last_step=int(m.group(1)))


def _checkpoint_step(info: dict) -> Optional[int]:
    from . import checkpoint as ckpt

    storage = info.get("storage_dir")
    if not storage or not Path(storage).is_dir():
        return None
    try:
        found = ckpt.latest_in(Path(storage), info.get("world"))
        return int(ckpt.read_state(found)["global_step"]) if found else None
    except Exception:
        return None


def _line(info: dict) -> str:
    trainer = info.get("trainer")
    step = getattr(trainer, "step", None) if trainer is not None else info.get("last_step")
    m = _checkpoint_step(info)
    at = f"step {step}" if step is not None else "start-up (no step yet)"
    then = (f"the same command resumes from the checkpoint of step {m}" if m is not None
            else "no checkpoint yet: the same command starts again from step 0")
    return f"[rlora] stopped at {at}; {then}"


def _mark_killed(info: dict) -> None:
    if not info.get("mlflow_run_id") or not info.get("tracking_uri"):
        return
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(info["tracking_uri"]).set_terminated(info["mlflow_run_id"], "KILLED")
    except Exception:
        pass


def end_child_processes(grace_s: float = 10.0) -> list[int]:
    """Shut down Ray if this process started it, then end every descendant process still alive
    (SIGTERM, SIGKILL after ``grace_s``). Returns the pids that had to be signalled."""
    import psutil

    me = psutil.Process()
    before = me.children(recursive=True)
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass
    _, alive = psutil.wait_procs(before, timeout=min(grace_s, 5.0))
    alive = [p for p in alive + me.children(recursive=True) if p.is_running()]
    alive = list({p.pid: p for p in alive}.values())
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, still = psutil.wait_procs(alive, timeout=grace_s)
    for p in still:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(still, timeout=5.0)
    return [p.pid for p in alive]


def stop() -> list[str]:
    """Mark the runs in progress KILLED in MLflow, end this process's children, and return the lines."""
    with _lock:
        runs = list(_active.values())
        _active.clear()
    for info in runs:
        _mark_killed(info)
    lines = [_line(info) for info in runs] or ["[rlora] stopped before training started"]
    end_child_processes()
    return lines


__all__ = ["RunStopped", "on_signals", "received", "reinstall", "track", "untrack", "heard", "stop", "end_child_processes"]
