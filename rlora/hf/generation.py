"""Task ids through ``generate``: expanded for beams and returned sequences, every decoding step.

``generate`` repeats each prompt ``k = max(num_beams, num_return_sequences)`` times
(``repeat_interleave`` on dim 0: rows ``i·k .. i·k+k-1`` belong to prompt ``i``) and never moves a
row to another prompt (beam search reorders beams within a prompt only). So a forward of a batch of
``B' = B·k`` rows gets the prompt ids ``t [B]`` as ``t.repeat_interleave(k) [B']``, whatever the
generation mode, cache or no cache.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from ..context import _as_tensor, pop_task_ids, push_task_ids
from ..layers import AdapterError


def expand_task_ids(ids: torch.Tensor, rows: int) -> torch.Tensor:
    """The ids [B] of B prompts for a forward over ``rows`` = B·k rows (k copies of each prompt)."""
    n = ids.numel()
    if n == 1 or n == rows:
        return ids
    if rows % n:
        raise AdapterError(f"generate got {n} task ids but decodes {rows} rows: pass one task id per prompt "
                           "(input_ids.shape[0]) or a single id for all")
    return ids.repeat_interleave(rows // n)


def _rows(args: tuple, kwargs: dict) -> Optional[int]:
    for x in (kwargs.get("input_ids"), args[0] if args else None, kwargs.get("inputs_embeds")):
        if isinstance(x, torch.Tensor):
            return x.shape[0]
    return None


@contextmanager
def generation_task_ids(model: nn.Module, ids) -> Iterator[None]:
    """While open, every forward of ``model`` sees ``ids`` expanded to its batch of rows."""
    ids = _as_tensor(ids)
    if ids is None:
        yield
        return

    pushed: list[bool] = []

    def pre(module, args, kwargs):
        rows = _rows(args, kwargs)
        push_task_ids(ids if rows is None else expand_task_ids(ids, rows))
        pushed.append(True)

    def post(module, args, kwargs, output):
        if pushed:  # (a pre-hook that raised pushed nothing)
            pushed.pop()
            pop_task_ids()
        return output

    # prepended: runs before the model's own task-id hook, so a `task_ids=` keyword still wins
    h1 = model.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
    h2 = model.register_forward_hook(post, with_kwargs=True, always_call=True)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()
