"""Per-sample task ids reach the adapter layers without changing Hugging Face forward signatures.

Two equivalent ways::

    with rlora.task_ids(torch.tensor([0, 2, 1])):   # a context manager
        logits = model(input_ids).logits

    logits = model(input_ids, task_ids=torch.tensor([0, 2, 1])).logits   # popped by a pre-hook

The ids live on a plain module-level stack (not a ContextVar) so that they are visible to autograd
threads that recompute activations under gradient checkpointing.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import torch

_STACK: list[Optional[torch.Tensor]] = []

TaskIds = Union[torch.Tensor, Sequence[int], int, None]


def _as_tensor(ids: TaskIds) -> Optional[torch.Tensor]:
    if ids is None:
        return None
    if isinstance(ids, int):
        return torch.tensor([ids], dtype=torch.long)
    t = torch.as_tensor(ids)
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"task ids must be integers, got dtype {t.dtype}")
    return t.long().reshape(-1)


@contextmanager
def task_ids(ids: TaskIds) -> Iterator[None]:
    """Set the per-sample task ids (shape [batch]) seen by every adapter layer inside the block."""
    _STACK.append(_as_tensor(ids))
    try:
        yield
    finally:
        _STACK.pop()


def current_task_ids() -> Optional[torch.Tensor]:
    return _STACK[-1] if _STACK else None


def _pre_hook(module, args, kwargs):
    if "task_ids" in kwargs:
        _STACK.append(_as_tensor(kwargs.pop("task_ids")))
        module._rlora_pushed = getattr(module, "_rlora_pushed", 0) + 1
    return args, kwargs


def _post_hook(module, args, kwargs, output):
    if getattr(module, "_rlora_pushed", 0):
        module._rlora_pushed -= 1
        _STACK.pop()
    return output


def install_task_id_hooks(model: torch.nn.Module) -> None:
    """Let ``model(..., task_ids=ids)`` work: the kwarg is popped before the HF forward sees it."""
    if getattr(model, "_rlora_hooks", None):
        return
    h1 = model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    h2 = model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
    model._rlora_hooks = (h1, h2)
