"""Router statistics of HydraLoRA / R-LoRA: which heads each task's tokens are sent to.

:class:`GateRecorder` wraps ``layer.route`` (softmax of the router logits) of every routed layer for the duration of a ``with``
block (the layer's own attribute is restored afterwards, also on error) and accumulates, over the
non-pad tokens of the current probe batch, the mean gate per head and the mean normalised entropy
H(g) / log N of the gates g = softmax(W_r x) -- on the device, without synchronising.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np
import torch
from torch import nn

from ..context import task_ids as task_ids_context
from ..inject import adapter_layers
from ..layers import HydraLoRALinear
from .probes import eval_mode, model_device, prepare_batch, task_of


class GateRecorder:
    """Wraps ``layer.route`` of every routed layer; sums gates and normalised entropies over the
    non-pad tokens of the current probe batch (on the device, no synchronisation)."""

    def __init__(self, model: nn.Module):
        self.layers = [(n, l) for n, l in adapter_layers(model) if isinstance(l, HydraLoRALinear)]
        self.weight: Optional[torch.Tensor] = None     # 1.0 on the non-pad tokens of the current batch
        self.count = 0
        self.acc: dict[str, list] = {}

    def __enter__(self) -> "GateRecorder":
        self._saved = []
        try:
            for name, layer in self.layers:
                self._saved.append((layer, layer.__dict__.get("route")))
                layer.route = self._wrap(name, layer.route)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for layer, own in self._saved:
            if own is None:
                layer.__dict__.pop("route", None)
            else:
                layer.__dict__["route"] = own
        self._saved = []

    def _wrap(self, name: str, gates):
        def recorded(logits: torch.Tensor) -> torch.Tensor:
            g = gates(logits)
            self._record(name, g.detach())
            return g
        return recorded

    def _record(self, name: str, g: torch.Tensor) -> None:
        g = g.reshape(-1, g.shape[-1]).double()
        n = g.shape[-1]
        if n > 1:
            ent = -torch.special.xlogy(g, g).sum(dim=-1) / math.log(n)
        else:
            ent = torch.ones(g.shape[0], dtype=g.dtype, device=g.device)
        if self.weight is not None and self.weight.numel() == g.shape[0]:
            w = self.weight.to(g.device)           # masked sums: no data-dependent shapes, no sync
            g_sum, e_sum, count = w @ g, w @ ent, self.count
        else:
            g_sum, e_sum, count = g.sum(dim=0), ent.sum(), g.shape[0]
        acc = self.acc.setdefault(name, [0.0, 0.0, 0])
        acc[0] = acc[0] + g_sum
        acc[1] = acc[1] + e_sum
        acc[2] += count

    def begin(self, mask: torch.Tensor) -> None:
        self.weight = mask.reshape(-1).double()
        self.count = int(mask.sum())
        self.acc = {}

    def end(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (mean gate [N], mean normalised entropy)} for the batch just run."""
        out = {name: (a[0] / a[2], a[1] / a[2]) for name, a in self.acc.items() if a[2] > 0}
        self.acc, self.weight = {}, None
        return out


def router_result(per_task: list[dict], names: list[str]) -> Optional[dict]:
    """The :func:`router_usage` dict from one :meth:`GateRecorder.end` result per task (one host copy)."""
    layers = [n for n in per_task[0]] if per_task else []
    if not layers:
        return None
    flat = torch.cat([torch.cat([d[l][0].reshape(-1), d[l][1].reshape(1)]) for d in per_task for l in layers])
    arr = flat.cpu().numpy().reshape(len(per_task), len(layers), -1)       # [T, layers, N + 1]
    usage_l, ent_l = arr[..., :-1], np.clip(arr[..., -1], 0.0, 1.0)
    return {"tasks": names, "usage": usage_l.mean(axis=1), "entropy": ent_l.mean(axis=1),
            "per_layer": {l: {"usage": usage_l[:, k], "entropy": ent_l[:, k]} for k, l in enumerate(layers)}}


def forward_only(model: nn.Module, batch: dict) -> None:
    with task_ids_context(batch["task_ids"]):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=batch["position_ids"], logits_to_keep=1, use_cache=False)


def has_router(model: nn.Module) -> bool:
    return any(isinstance(l, HydraLoRALinear) for _, l in adapter_layers(model))


def router_usage(model: nn.Module, probe: Mapping[str, Mapping]) -> Optional[dict]:
    """Router statistics of HydraLoRA / R-LoRA on each task's probe batch (eval mode, no grad).

    Returns ``{"tasks": [names in probe order], "usage": [T, N], "entropy": [T],
    "per_layer": {layer: {"usage": [T, N], "entropy": [T]}}}`` where, with g(x) = softmax(W_r x) the
    gates of a token, ``usage[t, i]`` = mean over layers of the mean of g_i over the non-pad tokens of
    task t (rows sum to 1) and ``entropy[t]`` = mean over layers and tokens of H(g) / log N ∈ [0, 1]
    (1 = uniform routing, 0 = one head per token).  ``None`` when the model has no router."""
    if not has_router(model):
        return None
    device = model_device(model)
    per_task, names = [], []
    with torch.no_grad(), eval_mode(model), GateRecorder(model) as rec:
        for name, batch in probe.items():
            b = prepare_batch(name, batch, device)
            task_of(name, b, None)
            rec.begin(b["attention_mask"])
            forward_only(model, b)
            per_task.append(rec.end())
            names.append(name)
    return router_result(per_task, names)


__all__ = ["GateRecorder", "router_usage", "router_result", "has_router", "forward_only"]
