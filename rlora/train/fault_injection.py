"""Test-only fault injection, kept out of the training loop's body.

``trainer.fail_at_step: K`` makes the last rank's worker process exit (``os._exit(1)``, no cleanup,
like a killed process) once, at the end of optimizer step ``K``. A marker file in the run's storage
folder records that the fault fired, so the restarted (or re-run) worker trains on. The fault and
resume tests use it; a real run leaves the field unset.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def maybe_exit(fail_at_step: Optional[int], step: int, rank: int, world_size: int,
               storage_dir: Optional[str]) -> None:
    if fail_at_step is None or step != fail_at_step or rank != world_size - 1 or storage_dir is None:
        return
    marker = Path(storage_dir) / f".fault_injected_step{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    print(f"[rlora] fault injection: worker rank {rank} exits at step {step}", flush=True)  # its log (or console)
    os._exit(1)
