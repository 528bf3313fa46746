"""Per-sample task ids reach the adapter layers without changing Hugging Face forward signatures.

Two equivalent ways::

    with rlora.task_ids(torch.tensor([0, 2, 1])):   # a context manager
        logits = model(input_ids).logits

    logits = model(input_ids, task_ids=torch.tensor([0, 2, 1])).logits   # popped by a pre-hook

The ids live on a plain module-level stack. Gradient checkpointing recomputes a layer's forward
during ``backward()``, after the ``with`` block (or the model call) has ended; turn it on with
:func:`enable_gradient_checkpointing`, which re-installs the ids each layer saw in its forward
around that layer's recompute.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
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


def checkpoint_context() -> tuple[AbstractContextManager, AbstractContextManager]:
    """``context_fn`` for non-reentrant ``torch.utils.checkpoint``: called when a checkpointed block
    runs forward, it captures the task ids of that moment and returns (forward context, recompute
    context); the recompute context installs the captured ids, so the recomputed block routes every
    sample exactly as the forward did, wherever and whenever backward runs."""
    return nullcontext(), task_ids(current_task_ids())


def enable_gradient_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Turn on activation (gradient) checkpointing of a Hugging Face model's decoder layers so that
    the recompute in backward sees the forward's task ids (MTL-LoRA needs them) and dropout masks.

    Uses ``activation_checkpointing_enable`` (current transformers) or, where that does not exist,
    ``gradient_checkpointing_enable`` (its older, now deprecated name), with non-reentrant
    checkpointing, the RNG state preserved, and :func:`checkpoint_context`. Returns the same model."""
    kwargs = {"use_reentrant": False, "preserve_rng_state": True, "context_fn": checkpoint_context}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        from .layers import AdapterError

        raise AdapterError(f"{type(model).__name__} has no activation_checkpointing_enable: gradient "
                           "checkpointing needs a Hugging Face PreTrainedModel")
    return model
