"""Gradient checkpointing turned on the Hugging Face way routes each forward's task ids into the recompute:
gradients equal those without checkpointing (re-entrant or not), and an inner `task_ids=` beats an outer context."""
import pickle
import warnings
from contextlib import nullcontext

import pytest
import torch

import rlora
from hf_helpers import METHODS, MIXED, TASKS, adapter_model, perturbed
from helpers import tiny_llama


def _grads(model, tokens, ids, outer=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout masks in every run (checkpointing replays the RNG state)
    with rlora.task_ids(outer) if outer is not None else nullcontext():
        model(tokens, labels=tokens, task_ids=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(plain, ckpt):
    assert plain.keys() == ckpt.keys() and plain
    assert not [n for n, g in plain.items() if g.abs().sum() == 0]  # every adapter tensor gets a gradient
    worst = max((ckpt[n] - g).abs().max().item() for n, g in plain.items())
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_enable_gives_plain_gradients(method, reentrant, tokens):
    model = adapter_model(method, dropout=0.1, layers=3).train()
    plain = _grads(model, tokens, MIXED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecated alias, as users call it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.is_activation_checkpointing
    calls = []
    layer = next(l for _, l in rlora.adapter_layers(model))
    layer.register_forward_hook(lambda *a: calls.append(1))
    _assert_same(plain, _grads(model, tokens, MIXED))
    assert len(calls) == 2  # forward + recompute: the layers really were checkpointed


@pytest.mark.parametrize("method", METHODS)
def test_inner_keyword_beats_outer_context_in_the_recompute(method, tokens):
    """`with rlora.task_ids(0): m(..., task_ids=t).loss.backward()`: the recompute must use t, not 0."""
    model = adapter_model(method, layers=3).train()
    plain = _grads(model, tokens, MIXED)
    model.activation_checkpointing_enable()  # transformers' defaults (non-re-entrant)
    _assert_same(plain, _grads(model, tokens, MIXED, outer=0))


def test_bare_injected_model_routes_ids_too(tokens):
    """The old API: rlora.inject + HF's own gradient_checkpointing_enable on the model itself."""
    model = perturbed(rlora.inject(tiny_llama(layers=3), rlora.AdapterConfig(method="mtl", tasks=TASKS))).train()
    plain = _grads(model, tokens, MIXED)
    model = pickle.loads(pickle.dumps(model))  # the routing survives a copy (Ray, deepcopy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    _assert_same(plain, _grads(model, tokens, MIXED, outer=1))
