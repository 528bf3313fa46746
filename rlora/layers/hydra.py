"""HydraLoRA: a shared A, N heads B_i and a per-token softmax router."""
from __future__ import annotations

import torch
from torch import nn

from ..config import AdapterConfig
from .base import MultiHeadLoRALinear
from .fused import routed_down_project


class HydraLoRALinear(MultiHeadLoRALinear):
    """``g = softmax(W_r x)``,  ``h = W0 x + s · Σ_i g_i B_i A drop(x)``

    Shapes: x [T, d_in], router W_r [N, d_in] (softmax in fp32), A [r, d_in], B [d_out, N, r] (zeros),
    z = A drop(x) [T, r], u = s · g ⊗ z [T, N, r] -> [T, N*r], h = W0 x + u B_catᵀ.
    """

    method = "hydra"

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, num_tasks: int = 0):
        super().__init__(base, cfg, num_tasks)
        self.router = nn.Parameter(torch.empty(self.num_heads, self.d_in, device=self.lora_A.device,
                                               dtype=self.lora_A.dtype))
        nn.init.kaiming_uniform_(self.router, a=5 ** 0.5)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """g [T, N]: the router's softmax, computed in fp32."""
        return self.route(x.float() @ self.router.float().t())

    def route(self, logits: torch.Tensor) -> torch.Tensor:
        """g = softmax(W_r x) [T, N] from the router's logits; every forward path goes through here
        (diagnostics record the gates by wrapping it)."""
        return torch.softmax(logits, dim=-1)

    def rank_features(self, x: torch.Tensor) -> torch.Tensor:
        # z = A drop(x) [T, r] and the router's logits W_r x [T, N] (fp32) in one autograd node
        z, logits = routed_down_project(x, self.lora_A, self.router, self.dropout_p, self.training)
        g = self.route(logits).to(x.dtype)               # [T, N], = gates(x)
        u = (g * self.scaling).unsqueeze(-1) * z.unsqueeze(-2)   # [T, N, r]
        return u.reshape(x.shape[0], -1)
