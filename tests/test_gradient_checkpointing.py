"""Gradient checkpointing: the recompute in backward sees the same task ids (and dropout masks) as the
forward, so every adapter gradient equals the one computed without checkpointing."""
import warnings

import pytest
import torch

import rlora
from helpers import tiny_llama
from test_inject import METHODS, TASKS, perturb

MIXED = torch.tensor([2, 0, 1, 0])


def _grads(method: str, checkpointing: bool, dropout: float) -> dict[str, torch.Tensor]:
    model = perturb(rlora.inject(tiny_llama(layers=3), rlora.AdapterConfig(method=method, tasks=TASKS,
                                                                             dropout=dropout))).train()
    if checkpointing:
        rlora.enable_gradient_checkpointing(model)
    ids = torch.randint(0, 128, (4, 7), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)  # the same dropout masks in both runs (checkpointing replays the RNG state)
    with rlora.task_ids(MIXED):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("method", METHODS)
def test_checkpointed_gradients_equal_plain_gradients(method, dropout):
    plain = _grads(method, False, dropout)
    ckpt = _grads(method, True, dropout)
    assert plain.keys() == ckpt.keys() and plain
    for name, g in plain.items():
        assert g.abs().sum() > 0, name
        assert (ckpt[name] - g).abs().max().item() <= 1e-6, name


def test_checkpointing_actually_recomputes_the_layers():
    """The comparison above is only meaningful if the decoder layers really are checkpointed."""
    model = rlora.inject(tiny_llama(), rlora.AdapterConfig(method="mtl", tasks=TASKS)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the current transformers API, not a deprecated alias
        rlora.enable_gradient_checkpointing(model)
    calls = []
    layer = next(l for _, l in rlora.adapter_layers(model))
    layer.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 128, (2, 5))
    with rlora.task_ids([0, 1]):
        loss = model(ids, labels=ids).loss
    assert len(calls) == 1
    loss.backward()  # outside the task_ids block: the recompute needs the ids captured at forward time
    assert len(calls) == 2


def test_task_ids_kwarg_survives_the_recompute():
    model = perturb(rlora.inject(tiny_llama(), rlora.AdapterConfig(method="mtl", tasks=TASKS, dropout=0))).train()
    rlora.enable_gradient_checkpointing(model)
    ids = torch.randint(0, 128, (4, 5))
    model(ids, labels=ids, task_ids=MIXED).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
