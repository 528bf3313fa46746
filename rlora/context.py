"""Per-sample task ids reach the adapter layers without changing Hugging Face forward signatures.

Two equivalent ways::

    with rlora.task_ids(torch.tensor([0, 2, 1])):   # a context manager
        logits = model(input_ids).logits

    logits = model(input_ids, task_ids=torch.tensor([0, 2, 1])).logits   # popped by a pre-hook

The ids live on a plain module-level stack; an inner ``task_ids=`` keyword (or inner ``with``) wins
over an outer one. Gradient checkpointing recomputes a layer's forward during ``backward()``, after
the ``with`` block (or the model call) has ended: :func:`install_checkpoint_routing` (run by
``rlora.inject``) makes every checkpointing function Hugging Face installs on a decoder layer capture
the ids of the forward and re-install them around the recompute, however checkpointing was turned
on (``gradient_checkpointing_enable``, ``activation_checkpointing_enable``, ``TrainingArguments(
gradient_checkpointing=True)`` or :func:`enable_gradient_checkpointing`; re-entrant or not).
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


def push_task_ids(ids: TaskIds) -> None:
    """Put ``ids`` on top of the stack (pair with :func:`pop_task_ids` in a ``finally``); the same as
    entering ``with task_ids(ids)``, in a form ``torch.compile`` traces without a generator."""
    _STACK.append(_as_tensor(ids))


def pop_task_ids() -> None:
    _STACK.pop()


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


class _RunWithIds:
    """``function`` run under fixed task ids (the ones its checkpointed forward saw)."""

    def __init__(self, function, ids: Optional[torch.Tensor]):
        self.function, self.ids = function, ids

    def __call__(self, *args, **kwargs):
        _STACK.append(self.ids)
        try:
            return self.function(*args, **kwargs)
        finally:
            _STACK.pop()


class RoutedCheckpoint:
    """Wraps a checkpointing function ``f(function, *args, **kwargs)`` (``torch.utils.checkpoint``
    with Hugging Face's settings): the task ids current when the checkpointed block runs forward are
    captured and installed again when backward recomputes it, re-entrant or not. Only the captured
    ids matter inside the block, so a ``task_ids=`` keyword of the model call wins over an outer
    ``with rlora.task_ids(...)`` that is still open when backward runs."""

    def __init__(self, func):
        self.func = func

    def __call__(self, function, *args, **kwargs):
        return self.func(_RunWithIds(function, current_task_ids()), *args, **kwargs)


class _RoutedSetter:
    """Instance override of ``PreTrainedModel._set_gradient_checkpointing``, the one step every way of
    enabling checkpointing in transformers goes through: the checkpointing function is wrapped in
    :class:`RoutedCheckpoint` before Hugging Face hands it to the decoder layers. (A plain class, so
    the model still pickles and deep-copies.)"""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, enable: bool = True, gradient_checkpointing_func=None, every_n_layers: int = 1):
        from torch.utils.checkpoint import checkpoint

        func = gradient_checkpointing_func or checkpoint
        if not isinstance(func, RoutedCheckpoint):
            func = RoutedCheckpoint(func)
        return type(self.model)._set_gradient_checkpointing(self.model, enable=enable, gradient_checkpointing_func=func,
                                                            every_n_layers=every_n_layers)


def install_checkpoint_routing(model: torch.nn.Module) -> None:
    """Route task ids into gradient-checkpoint recomputes of a Hugging Face model, for every way of
    turning checkpointing on; if it is already on, its current function is wrapped as well."""
    if not hasattr(type(model), "_set_gradient_checkpointing") or "_set_gradient_checkpointing" in vars(model):
        return
    model._set_gradient_checkpointing = _RoutedSetter(model)
    for module in model.modules():
        func = vars(module).get("_gradient_checkpointing_func")
        if func is not None and not isinstance(func, RoutedCheckpoint):
            module._gradient_checkpointing_func = RoutedCheckpoint(func)


def uninstall_task_id_routing(model: torch.nn.Module) -> None:
    """Undo :func:`install_task_id_hooks` and :func:`install_checkpoint_routing` (a plain model again)."""
    for handle in getattr(model, "_rlora_hooks", None) or ():
        handle.remove()
    vars(model).pop("_rlora_hooks", None)
    vars(model).pop("_set_gradient_checkpointing", None)
    for module in model.modules():
        func = vars(module).get("_gradient_checkpointing_func")
        if isinstance(func, RoutedCheckpoint):
            module._gradient_checkpointing_func = func.func


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
