"""Where the training loop runs: this process's rank and world size, the checkpoint handed over at
start, and what "report a checkpoint" means.

* :class:`LocalRuntime` -- this process alone (world size 1): a one-process gloo group so that the
  DeepSpeed engine and the collectives in :mod:`rlora.distributed` run exactly as in a worker;
  reported checkpoints are moved into the run's storage folder (``checkpoint_NNNNNN``), keeping the
  newest ``ray.num_to_keep``.
* ``RayRuntime`` (:mod:`rlora.train.worker`) -- a Ray Train worker: ``ray.train.report``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional


class Runtime:
    """The interface the training loop needs from its surroundings."""

    rank: int = 0
    world_size: int = 1
    saves_checkpoints: bool = True

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Optional[Path]]:
        """The checkpoint the surroundings hand over (e.g. after a worker-group restart), if any."""
        yield None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        """Make ``checkpoint_dir`` (written by every rank) durable; called by every rank."""
        raise NotImplementedError

    def node_id(self) -> str:
        return os.uname().nodename

    def say(self, line: str) -> None:
        """Show one of rank 0's lines to the user."""
        from ..console import say

        say(line)


def init_single_process_group() -> None:
    """A world-size-1 gloo process group in this process (once), for DeepSpeed and the collectives."""
    import torch.distributed as dist

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # DeepSpeed reads them; a launcher's values are kept
    if dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


class LocalRuntime(Runtime):
    """Training in this process. ``storage_dir=None`` keeps no checkpoints (benchmarks, quick tests)."""

    def __init__(self, storage_dir: Optional[Path], num_to_keep: int = 2):
        init_single_process_group()
        self.storage_dir = Path(storage_dir) if storage_dir is not None else None
        self.saves_checkpoints = self.storage_dir is not None
        self.num_to_keep = num_to_keep
        self.latest: Optional[Path] = None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        from .checkpoint import read_state

        assert self.storage_dir is not None
        step = int(read_state(checkpoint_dir)["global_step"])
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        final = self.storage_dir / f"checkpoint_{step:06d}"
        tmp = self.storage_dir / f".tmp-checkpoint_{step:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint_dir, tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.latest = final
        kept = sorted(self.storage_dir.glob("checkpoint_*"))
        for old in kept[:-self.num_to_keep] if self.num_to_keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
