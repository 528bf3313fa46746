"""R-LoRA (arXiv 2502.15455): HydraLoRA + multi-head random init + multi-head dropout."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from .fused import autocast_dtype
from .hydra import HydraLoRALinear


class RLoRALinear(HydraLoRALinear):
    """``z_i = drop_i(A x)``,  ``h = W0 x + s · Σ_i g_i B_i z_i  −  s · B̄⁰ A⁰ x``

    * multi-head random init: A ~ N(0, 1/d_in), B_i ~ N(0, 1/d_out) independently, both multiplied
      once by ``d_out^(1/4) / sqrt(gamma)``;
    * multi-head dropout: an independent mask per head on the rank-r activation A x (not on x);
    * exact zero start: the router starts at zero (g = 1/N exactly) and the frozen low-rank offset
      ``−s · B̄⁰ A⁰`` with ``B̄⁰ = (1/N) Σ_i B_i⁰`` cancels the initial update, so at step 0 the model
      equals the base model.  The offset (``offset_A`` [r, d_in], ``offset_B`` [d_out, r]) is part of
      the adapter: saved, loaded and exported.
    * ``initial_B`` [d_out, N, r]: a plain copy of the initial heads B_i⁰ (not a buffer: neither saved
      nor exported), so that diagnostics can tell the learned change B_i − B_i⁰ from the random init.

    Shapes: x [T, d_in]; [z | z⁰ | l] = x [A | A⁰ | W_r]ᵀ [T, 2r + N] (one matmul in fp32; under
    autocast the router's logits l come from ``gates``), g = softmax(l); u = [s·g_i·drop_i(z) | −s·z⁰]
    [T, (N+1)·r]; h = W0 x + u [B_cat | B̄⁰]ᵀ.
    """

    method = "rlora"

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, num_tasks: int = 0):
        super().__init__(base, cfg, num_tasks)
        scale = self.d_out ** 0.25 / cfg.gamma ** 0.5
        with torch.no_grad():
            self.lora_A.normal_(0.0, self.d_in ** -0.5).mul_(scale)
            self.lora_B.normal_(0.0, self.d_out ** -0.5).mul_(scale)
            self.router.zero_()
        self.initial_B = self.lora_B.detach().clone()
        self.use_offset = cfg.zero_start_offset
        if self.use_offset:
            self.register_buffer("offset_A", self.lora_A.detach().clone())
            self.register_buffer("offset_B", self.lora_B.detach().mean(dim=1))

    def rank_features(self, x: torch.Tensor) -> torch.Tensor:
        T, N, r = x.shape[0], self.num_heads, self.r
        down = [self.lora_A, self.offset_A] if self.use_offset else [self.lora_A]
        if x.dtype == self.router.dtype == torch.float32 and autocast_dtype(x.device.type) is None:
            # fp32: the router shares the one down-projection matmul (one pass over x, one ∂x matmul)
            zz = x @ torch.cat(down + [self.router]).t()                       # [T, 2r + N]
            g = self.route(zz[:, len(down) * r:])                              # [T, N], = gates(x)
        else:
            zz = x @ torch.cat(down).t()                                        # [T, 2r]
            g = self.gates(x).to(x.dtype)                                      # [T, N]
        z = zz[:, :r]
        z0 = zz[:, r:2 * r] if self.use_offset else None
        z_heads = z.unsqueeze(1).expand(T, N, r)
        if self.training and self.dropout_p > 0:
            z_heads = F.dropout(z_heads, self.dropout_p, True)                # independent mask per head
        u = ((g * self.scaling).unsqueeze(-1) * z_heads).reshape(T, N * r)
        if self.use_offset:
            u = torch.cat([u, z0 * -self.scaling], dim=1)
        return u

    def up_weight(self) -> torch.Tensor:
        w = super().up_weight()
        return torch.cat([w, self.offset_B], dim=1) if self.use_offset else w
