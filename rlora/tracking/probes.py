"""Probe batches for the diagnostics: one small left-padded batch per task, and how a model runs them.

A *probe* is ``{task name: batch}``, each batch a dict with ``input_ids``, ``attention_mask``,
``labels`` and ``task_ids`` (one task per batch) as built by :func:`make_probe` or
:func:`rlora.train.batches.left_padded_batch`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from .errors import DiagnosticsError

_REQUIRED = ("input_ids", "attention_mask", "task_ids")


def make_probe(features: Mapping[str, Sequence[dict]], task_names: Sequence[str], pad_token_id: int,
               per_task: int = 4) -> dict[str, dict]:
    """{task: left-padded batch of its first ``per_task`` encoded rows} (task id = index in task_names).

    ``features[task]`` are encoded rows (``input_ids``, ``labels``) as made by
    :func:`rlora.data.encode_example`; tasks without rows are skipped."""
    from ..train.batches import left_padded_batch

    if per_task < 1:
        raise DiagnosticsError(f"make_probe: per_task must be >= 1, got {per_task} (diagnostics.probe_batch_size)")
    unknown = sorted(set(features) - set(task_names))
    if unknown:
        raise DiagnosticsError(f"make_probe: tasks {unknown} are not in task_names {list(task_names)}")
    probe = {}
    for tid, name in enumerate(task_names):
        rows = list(features.get(name, ())[:per_task])  # a slice: a mapped task is not read whole
        if rows:
            probe[name] = left_padded_batch(rows, pad_token_id, [tid] * len(rows))
    return probe


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def prepare_batch(name: str, batch: Mapping, device: torch.device) -> dict:
    """The probe batch of task ``name`` on ``device``, with position ids from the attention mask."""
    if not isinstance(batch, Mapping):
        raise DiagnosticsError(f"probe['{name}'] is a {type(batch).__name__}, not a batch dict: build it with "
                               "rlora.tracking.diagnostics.make_probe or rlora.train.batches.left_padded_batch")
    missing = [k for k in _REQUIRED if k not in batch]
    if missing:
        raise DiagnosticsError(f"probe['{name}'] lacks {missing}: build it with rlora.train.batches.left_padded_batch")
    out = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if "position_ids" not in out:
        out["position_ids"] = (out["attention_mask"].long().cumsum(dim=1) - 1).clamp(min=0)
    return out


def task_of(name: str, batch: dict, num_tasks: Optional[int]) -> int:
    """The single task id of a probe batch (one-line errors for mixed or out-of-range ids)."""
    ids = torch.as_tensor(batch["task_ids"]).reshape(-1)
    if ids.numel() == 0 or bool((ids != ids[0]).any()):
        raise DiagnosticsError(f"probe['{name}'] mixes task ids {sorted(set(ids.tolist()))}: give each task its "
                               "own probe batch")
    t = int(ids[0])
    if t < 0 or (num_tasks is not None and t >= num_tasks):
        raise DiagnosticsError(f"probe['{name}'] has task id {t}, outside 0..{(num_tasks or 1) - 1}")
    return t


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every submodule's own train/eval flag is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


__all__ = ["make_probe", "prepare_batch", "task_of", "eval_mode", "model_device"]
