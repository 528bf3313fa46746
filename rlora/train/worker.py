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
    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

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
    Trainer(RunConfig.model_validate(payload["config"]), RayRuntime(), payload["run"]).fit()
