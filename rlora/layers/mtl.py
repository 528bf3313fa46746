"""MTL-LoRA (arXiv 2410.09437): task-specific Λ_t and per-task mixing of n up-projections."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..config import AdapterConfig
from ..context import current_task_ids
from .base import AdapterError, MultiHeadLoRALinear
from .fused import down_project


class MTLLoRALinear(MultiHeadLoRALinear):
    """For a sample of task t: ``h = W0 x + s · (Σ_i softmax(w_t/τ)_i B_i) Λ_t A drop(x)``

    Shapes: x [b, L, d_in] or [b, d_in] (L = 1) with task ids [b] (a batch may mix tasks; one id
    serves every sample), A [r, d_in], Λ [T, r, r] (identity init; ``diagonal``: [T, r], ones),
    mixing logits w [T, n] (kaiming-uniform), B [d_out, n, r] (zeros).
    z = A drop(x) [b, L, r]; z' = Λ_t z [b, L, r]; m = softmax(w_t/τ) [b, n];
    u = s · m ⊗ z' [b, L, n, r] -> [b·L, n·r]; h = W0 x + u B_catᵀ.  One pass for the whole batch.
    """

    method = "mtl"

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, num_tasks: int = 0):
        super().__init__(base, cfg, num_tasks)
        if num_tasks < 1:
            raise AdapterError("adapter.method=mtl needs the task list: set adapter.tasks (e.g. from data.path)")
        kw = dict(device=self.lora_A.device, dtype=self.lora_A.dtype)
        self.diagonal, self.temperature = cfg.diagonal, cfg.temperature
        if self.diagonal:
            self.task_lambda = nn.Parameter(torch.ones(num_tasks, self.r, **kw))
        else:
            self.task_lambda = nn.Parameter(torch.eye(self.r, **kw).repeat(num_tasks, 1, 1))
        self.task_weight = nn.Parameter(torch.empty(num_tasks, self.num_heads, **kw))
        nn.init.kaiming_uniform_(self.task_weight, a=math.sqrt(5))

    def mixing(self) -> torch.Tensor:
        """softmax(w/τ) [T, n]: each task's weights over the up-projections."""
        return torch.softmax(self.task_weight.float() / self.temperature, dim=-1).to(self.task_weight.dtype)

    def lambdas(self) -> torch.Tensor:
        """Λ [T, r, r] (a diagonal Λ expanded)."""
        return torch.diag_embed(self.task_lambda) if self.diagonal else self.task_lambda

    def _ids(self, batch: int) -> torch.Tensor:
        ids = current_task_ids()
        if ids is None:
            raise AdapterError("MTL-LoRA needs per-sample task ids and none reached this layer: pass `task_ids=` "
                               "to the model or wrap the call in `with rlora.task_ids(ids):`; under Hugging Face "
                               "Trainer, which drops a `task_ids` column the model's forward does not name, train "
                               "rlora.get_adapter_model(model, config) instead of the bare injected model")
        if ids.numel() == 1 and batch != 1:
            ids = ids.expand(batch)
        if ids.numel() != batch:
            raise AdapterError(f"got {ids.numel()} task ids for a batch of {batch} samples")
        if torch.compiler.is_compiling():
            # the range check reads the ids on the host, which would break the graph (a new graph per
            # batch); compiled code leaves out-of-range ids to the bounds check of the indexing below
            return ids.to(self.lora_A.device)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.num_tasks:
            bad = hi if hi >= self.num_tasks else lo
            raise AdapterError(f"task id {bad} is out of range: the adapter has {self.num_tasks} tasks "
                               f"(ids 0..{self.num_tasks - 1})")
        return ids.to(self.lora_A.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the samples are the first dimension ([b, L, d_in] or [b, d_in]); rank_features sees the
        # flattened tokens [b·L, d_in], so it is told b here
        self._batch = x.shape[0] if x.dim() >= 2 else 1
        return super().forward(x)

    def rank_features(self, x: torch.Tensor) -> torch.Tensor:
        b = self._batch
        ids = self._ids(b)
        z = down_project(x, self.lora_A, self.dropout_p, self.training).reshape(b, -1, self.r)  # [b, L, r]
        if self.diagonal:
            z = z * self.task_lambda[ids].unsqueeze(1)
        else:
            z = torch.bmm(z, self.task_lambda[ids].transpose(1, 2))             # Λ_t z
        m = self.mixing()[ids] * self.scaling                                   # [b, n]
        u = m[:, None, :, None] * z.unsqueeze(2)                                # [b, L, n, r]
        return u.reshape(x.shape[0], self.num_heads * self.r)

    def delta_weight(self, task: Optional[int] = None) -> torch.Tensor:
        if task is None:
            raise AdapterError("merging an MTL-LoRA adapter needs a task: rlora.merge(model, task=NAME)")
        b_mix = torch.einsum("n,onr->or", self.mixing()[task], self.lora_B)      # Σ_i m_ti B_i [d_out, r]
        return self.scaling * b_mix @ self.lambdas()[task] @ self.lora_A
