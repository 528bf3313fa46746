"""Plain LoRA (the baseline)."""
from __future__ import annotations

from typing import Optional

import torch

from .base import MultiHeadLoRALinear
from .fused import down_project


class LoRALinear(MultiHeadLoRALinear):
    """``h = W0 x + s · B A drop(x)``

    Shapes: x [T, d_in], A [r, d_in] (kaiming-uniform), B [d_out, 1, r] (zeros), u = s · A drop(x) [T, r].
    """

    method = "lora"

    def rank_features(self, x: torch.Tensor) -> torch.Tensor:
        return down_project(x, self.lora_A, self.dropout_p, self.training, self.scaling)

    def delta_weight(self, task: Optional[int] = None) -> torch.Tensor:
        return self.scaling * self.lora_B[:, 0] @ self.lora_A
