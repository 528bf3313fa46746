"""What every Ray Train worker runs: the one training loop (:mod:`rlora.train.loop`) behind a
:class:`RayRuntime` -- rank and world size from Ray's context, the checkpoint Ray hands over after a
worker-group restart, and ``ray.train.report`` for every checkpoint (on every rank)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Optional

from ..config import RunConfig
from .loop import Trainer
from .runtime import Runtime


class RayRuntime(Runtime):
    """``progress``: the driver's queue for rank 0's lines; ``log_dir``: where this worker's own output
    goes (``worker-<rank>.log``) unless the run is verbose."""

    def __init__(self, progress=None, log_dir: Optional[str] = None) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.progress = progress
        if log_dir:
            from ..console import redirect_process_output

            redirect_process_output(Path(log_dir) / f"worker-{self.rank}.log")

    def say(self, line: str) -> None:
        if self.progress is not None:
            try:
                self.progress.put(line)
                return
            except Exception:  # the driver's queue is unreachable: a progress line must never stop training
                self.progress = None
        print(line, flush=True)

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Optional[Path]]:
        import ray.train

        handed = ray.train.get_checkpoint()
        if handed is None:
            yield None
            return
        with handed.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)))

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    run = payload["run"]
    runtime = RayRuntime(payload.get("progress"), None if run.get("verbose", True) else run.get("log_dir"))
    Trainer(RunConfig.model_validate(payload["config"]), runtime, run).fit()
