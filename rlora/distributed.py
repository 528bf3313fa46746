"""Rank-0-only side effects in one place. Every collective runs on all ranks; only printing,
tracking and exporting go through :func:`on_rank0` / :func:`rank0_print`."""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def on_rank0(fn: Callable[..., T]) -> Callable[..., Optional[T]]:
    """Decorator: run ``fn`` on rank 0 only (returns None elsewhere). Never wrap a collective in it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Optional[T]:
        return fn(*args, **kwargs) if is_rank0() else None

    return wrapper


@on_rank0
def rank0_print(*args: Any, **kwargs: Any) -> None:
    print(*args, **{"flush": True, **kwargs})


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks (a no-op in a single process)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
