"""Tiny random Llama models wrapped the way a PEFT user would (``rlora.get_adapter_model``)."""
import torch

import rlora
from helpers import tiny_llama

METHODS = ["lora", "hydra", "rlora", "mtl"]
TASKS = ["qa", "math", "sentiment"]
MIXED = torch.tensor([2, 0, 1, 0])


def perturbed(model):
    """Training moves every adapter tensor away from its init (B = 0 would hide the adapter)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def adapter_model(method, dropout=0.0, layers=2, **cfg):
    """A perturbed ``AdapterModel`` over ``tiny_llama`` (seeded: the same base weights every time)."""
    config = rlora.AdapterConfig(method=method, tasks=TASKS, dropout=dropout, **cfg)
    return perturbed(rlora.get_adapter_model(tiny_llama(layers=layers), config))
