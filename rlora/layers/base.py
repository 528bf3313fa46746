"""What every multi-head LoRA layer shares: the frozen base linear, A, the heads B, merge/unmerge.

Notation (all methods)::

    x   [..., d_in]          input tokens
    W0  [d_out, d_in]        frozen base weight (the wrapped nn.Linear)
    A   [r, d_in]            shared down-projection (``lora_A``)
    B   [d_out, N, r]        N up-projection heads, B_i = B[:, i] (``lora_B``)
    s   = alpha / r          (alpha / sqrt(r) with rslora)

Every method computes ``h = W0 x + B_cat u`` where ``u [..., N*r]`` are the per-head rank-space
features, already gated and scaled (``rank_features``), and ``B_cat = B.view(d_out, N*r)``.  The
up-projection of all heads is therefore one matmul fused with the residual add (``addmm``): there
is no Python loop over heads or tasks in any forward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..config import AdapterConfig
from .dropout import dropout


class AdapterError(ValueError):
    """A user error in how an adapter is used (one line, names the fix)."""


class MultiHeadLoRALinear(nn.Module):
    """Base class. Subclasses implement :meth:`rank_features` (and optionally :meth:`delta_weight`)."""

    method: str = ""

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, num_tasks: int = 0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise AdapterError(f"{type(base).__name__} is not an nn.Linear")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.d_in, self.d_out = base.in_features, base.out_features
        self.r, self.num_heads, self.num_tasks = cfg.r, cfg.heads, num_tasks
        self.scaling = cfg.scaling
        self.dropout_p = cfg.dropout
        dev, dt = base.weight.device, base.weight.dtype
        if dev.type == "meta":  # ZeRO-3 / empty-init: create the adapter on CPU
            dev = torch.device("cpu")
        self.lora_A = nn.Parameter(torch.empty(self.r, self.d_in, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, self.num_heads, self.r, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged_task: Optional[object] = None  # None: not merged; else the merged task (or True)
        self._w0_backup: Optional[torch.Tensor] = None

    # ----------------------------------------------------------------------------------------
    def rank_features(self, x: torch.Tensor) -> torch.Tensor:
        """u [T, N*r] for flattened tokens x [T, d_in] (scaling and gates applied)."""
        raise NotImplementedError

    def up_weight(self) -> torch.Tensor:
        """The matrix multiplying ``rank_features``: B_cat [d_out, N*r] (subclasses may extend it)."""
        return self.lora_B.reshape(self.d_out, self.num_heads * self.r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_task is not None:
            return self.base(x)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.d_in)
        out = self.base(x2d)                                   # W0 x, [T, d_out]
        # accumulate u B_catᵀ into the base output in place: it is a fresh tensor autograd does not
        # need (not a view), so there is no extra pass over the [T, d_out] activations either way.
        # In-place ops are not autocast: both factors take the output's dtype (bf16 under autocast).
        # B_catᵀ is made contiguous ([N·r, d_out], a copy of N·r·d_out values): the backward then forms
        # ∂B_catᵀ = uᵀ ∂h, reading ∂h [T, d_out] row by row, instead of (∂hᵀ u)ᵀ through a transposed
        # ∂h, which on CPU costs up to twice as much.
        up_t = self.up_weight().t().contiguous()
        out.addmm_(self.rank_features(x2d).to(out.dtype), up_t.to(out.dtype))
        return out.view(*lead, self.d_out)

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.dropout_p, self.training)

    # ----------------------------------------------------------------------------------------
    def delta_weight(self, task: Optional[int] = None) -> torch.Tensor:
        """The exact update ΔW [d_out, d_in] this layer adds for ``task`` (if it can be merged)."""
        raise AdapterError(
            f"{self.method} routes each token through its heads with input-dependent gates, so it cannot be "
            "merged exactly into W0; use `rlora export --format peft|merged` for the approximate export"
        )

    # merge/unmerge open torch.no_grad() as a block, not as a decorator: mutmut (make mutate) skips decorated methods
    def merge(self, task: Optional[int] = None) -> None:
        with torch.no_grad():
            if self.merged_task is not None:
                raise AdapterError("adapter is already merged: call rlora.unmerge(model) first")
            delta = self.delta_weight(task)
            self._w0_backup = self.base.weight.detach().clone()
            self.base.weight.add_(delta.to(self.base.weight.dtype))
            self.merged_task = task if task is not None else True

    def unmerge(self) -> None:
        with torch.no_grad():
            if self.merged_task is None:
                return
            self.base.weight.copy_(self._w0_backup)
            self._w0_backup = None
            self.merged_task = None

    def extra_repr(self) -> str:
        return (f"method={self.method}, d_in={self.d_in}, d_out={self.d_out}, r={self.r}, "
                f"heads={self.num_heads}, scaling={self.scaling:g}, dropout={self.dropout_p}")
