"""Task interference: the cosine between the gradients that different tasks send to the shared adapter.

For each probe batch (one task each; row/column = its task id) the mean answer-token loss L_t
(:func:`rlora.train.batches.forward_loss`) is differentiated with ``torch.autograd.grad`` (the
parameters' ``.grad`` are left untouched), ``g_t = flatten-concat(∂L_t/∂θ)`` over the **shared**
trainable adapter parameters θ, and ``C[t, u] = <g_t, g_u> / (‖g_t‖ ‖g_u‖)`` (float64).

Shared parameters only: a per-task parameter (MTL-LoRA's Λ_t ``task_lambda`` and mixing logits w_t
``task_weight``, one slice per task) gets gradient from its own task alone, so its coordinates are
orthogonal between tasks by construction and would pull every cosine toward 0 without saying
anything about conflict.  They are left out (:data:`PER_TASK_PARAMETERS`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Optional

import numpy as np
import torch
from torch import nn

from ..inject import adapter_layers
from ..sampler.dynamic import conflict_means
from .errors import DiagnosticsError
from .head_geometry import cosine_from_gram
from .probes import eval_mode, model_device, prepare_batch, task_of
from .router_stats import GateRecorder, router_result

PER_TASK_PARAMETERS = ("task_lambda", "task_weight")     # adapter parameters indexed by task id


def shared_adapter_params(model: nn.Module) -> list[torch.Tensor]:
    """The trainable adapter parameters that every task uses (per-task ones excluded), each once."""
    seen, params = set(), []
    for _, layer in adapter_layers(model):
        for name, p in layer.named_parameters():
            if p.requires_grad and name.rsplit(".", 1)[-1] not in PER_TASK_PARAMETERS and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


@contextmanager
def _null() -> Iterator[None]:
    yield


def gradient_pass(model: nn.Module, probe: Mapping[str, Mapping], num_tasks: int,
                  record_gates: bool) -> tuple[np.ndarray, Optional[dict]]:
    """One forward + autograd.grad per probe task (eval mode): interference matrix and, if asked,
    the router statistics captured during the same forwards."""
    from ..train.batches import forward_loss

    params = shared_adapter_params(model)
    if not params:
        raise DiagnosticsError("task_interference: the model has no trainable shared adapter parameter: inject "
                               "adapters (rlora.inject) and leave their requires_grad on")
    device = model_device(model)
    rows: dict[int, torch.Tensor] = {}
    per_task, names = [], []
    recorder = GateRecorder(model) if record_gates else None
    with eval_mode(model), (recorder if recorder is not None else _null()):
        for name, batch in probe.items():
            b = prepare_batch(name, batch, device)
            t = task_of(name, b, num_tasks)
            if t in rows:
                raise DiagnosticsError(f"probe['{name}'] repeats task id {t}: give each task one probe batch")
            if recorder is not None:
                recorder.begin(b["attention_mask"])
            with torch.enable_grad():
                loss, _, _ = forward_loss(model, b, num_tasks)
                if loss.requires_grad:
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                else:
                    grads = [None] * len(params)
            rows[t] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                 for g, p in zip(grads, params)])
            del grads, loss
            if recorder is not None:
                per_task.append(recorder.end())
                names.append(name)
    order = sorted(rows)
    stacked = torch.stack([rows.pop(t) for t in order])                      # [T_probe, P] fp32
    gram = torch.zeros(len(order), len(order), dtype=torch.float64, device=stacked.device)
    for start in range(0, stacked.shape[1], 1 << 22):                          # float64 in chunks
        chunk = stacked[:, start:start + (1 << 22)].double()
        gram += chunk @ chunk.t()
    cos = cosine_from_gram(gram.cpu().numpy())
    matrix = np.full((num_tasks, num_tasks), np.nan)
    matrix[np.ix_(order, order)] = cos
    router = router_result(per_task, names) if recorder is not None else None
    return matrix, router


def task_interference(model: nn.Module, probe: Mapping[str, Mapping], num_tasks: int) -> np.ndarray:
    """[num_tasks, num_tasks] cosine between per-task gradients of the shared trainable adapter
    parameters (see the module docstring).  The model runs in eval mode (no dropout, so the result
    is deterministic) and its train/eval flags are restored.  Symmetric, unit diagonal; a task with
    an exactly zero gradient has a zero row/column (diagonal included); a task absent from the probe
    has NaN.  Negative entries: the two tasks pull the shared adapter apart."""
    return gradient_pass(model, probe, num_tasks, record_gates=False)[0]


def interference_summary(matrix: np.ndarray) -> np.ndarray:
    """[T] mean cosine of each task to the other tasks (NaN entries skipped; a task with none
    gets the mean of the known row means, 0.0 if no task is known): exactly the ``c_t`` that
    :class:`rlora.sampler.dynamic.DynamicBalancer` derives from the matrix passed to
    ``TaskSampler.update(task_losses, conflict=matrix)`` (both call
    :func:`rlora.sampler.dynamic.conflict_means`)."""
    c = np.array(matrix, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise DiagnosticsError(f"interference_summary: expected a T x T matrix, got shape {c.shape}")
    return conflict_means(c)


__all__ = ["PER_TASK_PARAMETERS", "shared_adapter_params", "gradient_pass", "task_interference",
           "interference_summary"]
