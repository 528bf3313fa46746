"""The adapters' input dropout and down-projection as one autograd function (CPU training).

For flattened tokens x [T, d_in], the down-projection A [r, d_in], a 0/1 keep mask m [T, d_in]
(P(1) = 1 - p', :func:`rlora.layers.dropout.keep_mask`) and a factor c = s / (1 - p')::

    z  = c · (x ⊙ m) Aᵀ                      [T, r]
    ∂x = (c ∂z A) ⊙ m                         [T, d_in]
    ∂A = (c ∂z)ᵀ (x ⊙ m)                      [r, d_in]

which is ``s · drop(x) Aᵀ`` with the dropout's 1 / (1 - p') moved from the [T, d_in] input to the
[T, r] features (the same product; float rounding may differ in the last bit). Plain autograd
through ``drop(x) @ Aᵀ * s`` scales the mask (a pass over [T, d_in]), multiplies the input, and in the
backward allocates the masked gradient and multiplies the rank-space gradient by s separately; here the
forward makes one pass over [T, d_in] (x ⊙ m) besides the matmul and the backward forms (∂z A) ⊙ m in
place: fewer passes over the widest activations and fewer autograd nodes.

Under autocast the two matmuls run in the autocast dtype (as ``torch.mm`` would); the gradients come
back in the dtypes of x and A.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dropout import keep_mask


class DroppedDownProjection(torch.autograd.Function):
    """``z = c · (x ⊙ m) Aᵀ`` (see the module docstring); ``m`` is a 0/1 tensor shaped like x in the
    compute dtype (``dtype``, default x's)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, m: torch.Tensor, c: float,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dt = dtype or x.dtype
        with torch.autocast(x.device.type, enabled=False):
            xm = x.to(dt).mul(m)
            z = torch.mm(xm, A.to(dt).t()).mul_(c)
        ctx.save_for_backward(m, xm, A)
        ctx.c, ctx.x_dtype = c, x.dtype
        return z

    @staticmethod
    def backward(ctx, gz: torch.Tensor):
        m, xm, A = ctx.saved_tensors
        gzc = gz.to(xm.dtype) * ctx.c
        gx = gA = None
        with torch.autocast(gz.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                gx = torch.mm(gzc, A.to(xm.dtype)).mul_(m).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                gA = torch.mm(gzc.t(), xm).to(A.dtype)
        return gx, gA, None, None, None


class RoutedDroppedDownProjection(torch.autograd.Function):
    """HydraLoRA's two projections of one input, in fp32 without autocast: the router's logits
    ``l = x Rᵀ`` [T, N] from the input itself and ``z = c · (x ⊙ m) Aᵀ`` [T, r] from the dropped input.
    The backward accumulates both input gradients in one buffer::

        ∂x = (c ∂z A) ⊙ m + ∂l R        (the masked product in place, then one addmm into it)
        ∂A = (c ∂z)ᵀ (x ⊙ m),  ∂R = ∂lᵀ x
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, R: torch.Tensor, m: torch.Tensor, c: float):
        xm = x.mul(m)
        z = torch.mm(xm, A.t()).mul_(c)
        logits = torch.mm(x, R.t())
        ctx.save_for_backward(x, m, xm, A, R)
        ctx.c = c
        return z, logits

    @staticmethod
    def backward(ctx, gz: torch.Tensor, glog: torch.Tensor):
        x, m, xm, A, R = ctx.saved_tensors
        gzc = gz * ctx.c
        gx = gA = gR = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(gzc, A).mul_(m).addmm_(glog, R)
        if ctx.needs_input_grad[1]:
            gA = torch.mm(gzc.t(), xm)
        if ctx.needs_input_grad[2]:
            gR = torch.mm(glog.t(), x)
        return gx, gA, gR, None, None


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype for ``device_type`` when autocast is on there, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def down_project(x: torch.Tensor, A: torch.Tensor, p: float, training: bool, scale: float = 1.0) -> torch.Tensor:
    """``scale · drop(x) Aᵀ`` for x [T, d_in], A [r, d_in] -> [T, r] (input dropout with probability ``p``
    in training). On CPU with dropout: :class:`DroppedDownProjection`; elsewhere plain autograd."""
    if not training or p <= 0:
        return (x @ A.t()) * scale
    if x.device.type != "cpu":
        return (F.dropout(x, p, True) @ A.t()) * scale
    dt = autocast_dtype(x.device.type)
    m, inv_keep = keep_mask(x.shape, p, dt or x.dtype, x.device)
    return DroppedDownProjection.apply(x, A, m, scale * inv_keep, dt)


def routed_down_project(x: torch.Tensor, A: torch.Tensor, R: torch.Tensor, p: float, training: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(drop(x) Aᵀ, x Rᵀ)`` -> ([T, r], [T, N]): the down-projection and the router's logits. On CPU in
    fp32 training with dropout: :class:`RoutedDroppedDownProjection`; otherwise :func:`down_project` and
    the logits as ``HydraLoRALinear.gates`` forms them (``x.float() @ R.float()ᵀ``)."""
    fused = (training and p > 0 and x.device.type == "cpu" and x.dtype == A.dtype == R.dtype == torch.float32
             and autocast_dtype("cpu") is None)
    if not fused:
        return down_project(x, A, p, training), x.float() @ R.float().t()
    m, inv_keep = keep_mask(x.shape, p, x.dtype, x.device)
    return RoutedDroppedDownProjection.apply(x, A, R, m, inv_keep)
