"""A fingerprint of a model's base weights: the same before and after ``rlora.inject`` (and while merged).

``sha256( for every base parameter, sorted by name:  name | dtype | shape | raw bytes )``

Names are the base model's own (an adapter layer's ``<module>.base.weight`` counts as
``<module>.weight``); adapter tensors are left out; a merged layer contributes its kept-aside W0.
Any change of a weight, its dtype or the architecture changes the fingerprint.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..inject import adapter_layers


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    layers = dict(adapter_layers(model))
    adapter_ids = {id(t) for layer in layers.values()
                   for t in list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False))}
    renames = {f"{name}.base.": f"{name}." for name in layers}
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            continue
        for old, new in renames.items():
            if name.startswith(old):
                layer = layers[old[:-len(".base.")]]
                if name == old + "weight" and layer._w0_backup is not None:
                    p = layer._w0_backup
                name = new + name[len(old):]
                break
        out[name] = p
    return out


def base_fingerprint(model: nn.Module) -> str:
    """``"sha256:<hex>"`` of the base weights of ``model`` (injected or not, or an ``AdapterModel``)."""
    from .model import AdapterModel

    if isinstance(model, AdapterModel):
        model = model.get_base_model()
    h = hashlib.sha256()
    for name, t in sorted(_base_tensors(model).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + h.hexdigest()
