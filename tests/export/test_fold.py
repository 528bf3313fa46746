"""The fold of each method into one low-rank update (in memory, no files)."""
from __future__ import annotations

import pytest
import torch

import rlora
from rlora.export import ExportError
from rlora.export.fold import fold_adapter, fold_layer, task_index
from rlora.export.peft_format import peft_config, peft_state_dict
from rlora.layers import LAYERS


def _layer(method: str, rslora: bool = False, d_in: int = 12, d_out: int = 10):
    cfg = rlora.AdapterConfig(method=method, r=3, num_heads=4, tasks=["a", "b"], dropout=0.0, alpha=6.0,
                              rslora=rslora)
    torch.manual_seed(0)
    layer = LAYERS[method](torch.nn.Linear(d_in, d_out), cfg, num_tasks=2).eval()
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return layer, cfg


@pytest.mark.parametrize("task", [0, 1])
def test_mtl_fold_equals_the_exact_merge(task):
    layer, _ = _layer("mtl")
    f = fold_layer(layer, task)
    assert f.rank == 3
    torch.testing.assert_close(f.delta(), layer.delta_weight(task), rtol=1e-5, atol=1e-6)


def test_lora_fold_equals_the_exact_merge():
    layer, _ = _layer("lora")
    torch.testing.assert_close(fold_layer(layer).delta(), layer.delta_weight(), rtol=1e-5, atol=1e-6)


def test_hydra_fold_equals_the_rank_n_r_block_form():
    """Σ_i ḡ_i B_i A (written, rank r) == [ḡ_1 B_1 … ḡ_N B_N] [A; …; A] (rank N·r)."""
    layer, _ = _layer("hydra")
    g = torch.softmax(torch.randn(4), 0)
    f = fold_layer(layer, gates=g)
    B, A = layer.lora_B.detach(), layer.lora_A.detach()
    block_B = torch.cat([g[i] * B[:, i] for i in range(4)], dim=1)          # [d_out, N*r]
    block_A = torch.cat([A] * 4, dim=0)                                      # [N*r, d_in]
    torch.testing.assert_close(f.delta(), layer.scaling * block_B @ block_A, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["hydra", "rlora"])
def test_routed_fold_is_exact_for_constant_gates(method):
    """With a zero router every token gets g = 1/N: the layer equals W0 x + ΔW x (offset included)."""
    layer, _ = _layer(method)
    with torch.no_grad():
        layer.router.zero_()
    x = torch.randn(5, 12)
    f = fold_layer(layer, gates=torch.full((4,), 0.25))
    assert f.rank == (6 if method == "rlora" else 3)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x) + x @ f.delta().t(), rtol=1e-5, atol=1e-5)


def test_routed_fold_needs_gates_and_mtl_needs_a_task():
    with pytest.raises(ExportError, match="--data"):
        fold_layer(_layer("rlora")[0])
    with pytest.raises(ExportError, match="--task"):
        fold_layer(_layer("mtl")[0])
    with pytest.raises(ExportError, match="shape"):
        fold_layer(_layer("hydra")[0], gates=torch.ones(2) / 2)


@pytest.mark.parametrize("method,rslora", [("lora", False), ("lora", True), ("mtl", True), ("rlora", False),
                                           ("rlora", True), ("hydra", True)])
def test_peft_config_reproduces_the_scaling(method, rslora):
    layer, cfg = _layer(method, rslora=rslora)
    gates = torch.full((4,), 0.25) if method in ("hydra", "rlora") else None
    folds = {"proj": fold_layer(layer, 0, gates)}
    pc = peft_config(cfg, folds, "base")
    peft_scaling = pc["lora_alpha"] / (pc["r"] ** 0.5 if pc["use_rslora"] else pc["r"])
    assert pc["r"] == folds["proj"].rank
    assert peft_scaling == pytest.approx(cfg.scaling, rel=1e-12)
    state = peft_state_dict(folds)
    assert set(state) == {"base_model.model.proj.lora_A.weight", "base_model.model.proj.lora_B.weight"}
    torch.testing.assert_close(peft_scaling * state["base_model.model.proj.lora_B.weight"]
                               @ state["base_model.model.proj.lora_A.weight"], folds["proj"].delta())


def test_fold_adapter_covers_every_layer():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    rlora.inject(model, rlora.AdapterConfig(method="mtl", r=2, tasks=["a", "b"], target_modules=["q_proj", "v_proj"]))
    folds = fold_adapter(model, 1)
    assert sorted(folds) == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]


def test_task_index_rules():
    mtl = rlora.AdapterConfig(method="mtl", tasks=["a", "b"])
    assert task_index(mtl, "b") == 1
    with pytest.raises(ExportError, match=r"unknown task 'c': the adapter's tasks are \['a', 'b'\]"):
        task_index(mtl, "c")
    with pytest.raises(ExportError, match="--task is required"):
        task_index(rlora.AdapterConfig(method="hydra", tasks=["a"]), None)
    assert task_index(rlora.AdapterConfig(method="lora"), "anything") is None
    assert task_index(rlora.AdapterConfig(method="rlora"), "x") is None      # no task list: only names dev data
