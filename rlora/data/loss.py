"""Token-level cross-entropy split by task."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .tokenization import IGNORE_INDEX


def per_task_loss(logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor,
                  num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and token count per task.

    ``logits`` [B, L, V], ``labels`` [B, L] aligned with the inputs (-100 = ignored), ``task_ids`` [B].
    Token ``labels[b, t]`` is predicted by ``logits[b, t-1]``::

        nll[b, t]   = -log softmax(logits[b, t-1])[labels[b, t]]
        loss_sum[k] = sum_{b: task_ids[b] = k} sum_{t: labels[b, t] != -100} nll[b, t]     -> [T] float32
        count[k]    = number of terms in loss_sum[k]                                       -> [T] int64

    The mean loss of task k is ``loss_sum[k] / count[k]``; ``loss_sum.sum() / count.sum()`` is the usual
    batch loss. Only the labelled positions are pushed through the softmax. Differentiable in ``logits``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"per_task_loss wants logits [B, L, V] and labels [B, L], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    task_ids = torch.as_tensor(task_ids, device=logits.device).long().reshape(-1)
    if task_ids.numel() != logits.shape[0]:
        raise ValueError(f"per_task_loss got {task_ids.numel()} task ids for a batch of {logits.shape[0]}")
    if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks):
        raise ValueError(f"task ids must lie in [0, {num_tasks}), got {task_ids.tolist()}")
    target = labels[:, 1:].to(logits.device)
    keep = target != IGNORE_INDEX
    rows = logits[:, :-1][keep].float()                                     # [N, V]
    nll = F.cross_entropy(rows, target[keep], reduction="none")             # [N]
    owner = task_ids.unsqueeze(1).expand_as(target)[keep]                   # [N]
    loss_sum = torch.zeros(num_tasks, dtype=torch.float32, device=logits.device).index_add(0, owner, nll)
    count = torch.zeros(num_tasks, dtype=torch.long, device=logits.device).index_add(0, owner, torch.ones_like(owner))
    return loss_sum, count
