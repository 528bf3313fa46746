"""The fold of each method into one low-rank update (in memory, no files)."""
from __future__ import annotations

import pytest
import torch

import rlora
from rlora.export import ExportError
from rlora.export.fold import compact, compact_all, fold_adapter, fold_layer, pad_rank, task_index
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


NEAR_UNIFORM = torch.tensor([0.34, 0.33, 0.33])


def _trained_rlora_layer(d_in: int = 64, d_out: int = 48, steps_scale: float = 0.02):
    """An R-LoRA layer as after a short training: heads at their large random init (gamma=1) plus small
    updates of A and B; with near-uniform average gates (the router starts at zero) ΔW = s(Σ ḡ B A − B̄⁰ A⁰)
    is small next to either of its two terms."""
    cfg = rlora.AdapterConfig(method="rlora", r=4, num_heads=3, tasks=["a"], dropout=0.0, alpha=8.0, gamma=1.0)
    torch.manual_seed(0)
    layer = LAYERS["rlora"](torch.nn.Linear(d_in, d_out), cfg, num_tasks=1).eval()
    with torch.no_grad():
        layer.lora_A.add_(torch.randn_like(layer.lora_A) * steps_scale * layer.lora_A.abs().mean())
        layer.lora_B.add_(torch.randn_like(layer.lora_B) * steps_scale * layer.lora_B.abs().mean())
    return layer


def test_compact_refactors_the_rlora_update_exactly_into_its_own_rank():
    layer = _trained_rlora_layer()
    block = fold_layer(layer, gates=NEAR_UNIFORM)
    small = compact(block)
    assert block.rank == 8 and small.rank == 8                        # the net update has full rank 2r here
    exact = block.scaling * (block.B.double() @ block.A.double())
    assert ((small.delta().double() - exact).norm() / exact.norm()).item() < 1e-6
    # the block form's terms are far larger than the update they make; the compact factors are not
    assert (block.B.norm() * block.A.norm()).item() > 5 * (exact.norm() / block.scaling).item()
    assert (small.B.norm() * small.A.norm()).item() < 3 * (exact.norm() / block.scaling).item()


def test_compact_drops_exactly_the_null_directions_and_pads_back():
    torch.manual_seed(1)
    A, B = torch.randn(6, 10), torch.randn(7, 6)
    A[3:] = A[:3] * 2.0                                                  # rank 3 hidden in 6 factors
    from rlora.export.fold import LowRank

    f = compact(LowRank(A, B, 0.5))
    assert f.rank == 3
    torch.testing.assert_close(f.delta(), LowRank(A, B, 0.5).delta(), rtol=1e-5, atol=1e-5)
    g = pad_rank(f, 6)
    assert g.rank == 6 and torch.equal(g.delta(), f.delta())
    both = compact_all({"x": LowRank(A, B, 0.5), "y": LowRank(torch.randn(6, 10), torch.randn(7, 6), 0.5)})
    assert {v.rank for v in both.values()} == {6}


def test_bf16_error_of_the_compact_form_is_far_below_the_block_form():
    """What a bf16 engine computes from each representation, ``(x Aᵀ)(s·B)ᵀ`` with A, s·B and x in bf16,
    against the exact update in fp64: the block form's cancellation loses far more."""
    layer = _trained_rlora_layer()
    block = fold_layer(layer, gates=NEAR_UNIFORM)
    small = compact(block)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    exact = x.double() @ (block.scaling * block.B.double() @ block.A.double()).t()

    def bf16(f):
        xb, Ab, Bb = x.bfloat16(), f.A.bfloat16(), (f.scaling * f.B).bfloat16()
        return ((xb @ Ab.t()) @ Bb.t()).double()

    err_block = ((bf16(block) - exact).norm() / exact.norm()).item()
    err_small = ((bf16(small) - exact).norm() / exact.norm()).item()
    assert err_small < 0.01                                              # about bf16's own rounding (2^-8)
    assert err_block > 10 * err_small                                    # 0.134 vs 0.0039 here


def test_served_model_in_fp32_computes_what_peft_computes(tmp_path):
    """The bf16 measurement's model (an unmerged LoRA per layer, ``W0 x + (x Aᵀ)(s·B)ᵀ``) in fp32 equals
    PEFT's forward of the same factors: only the dtype separates it from what the engines run."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlora.export.fold import served_model

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(tmp_path / "b")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "b").eval()
    rlora.inject(model, rlora.AdapterConfig(method="lora", r=2, alpha=6.0, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    folds = fold_adapter(model)
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "b"),
                          LoraConfig(r=2, lora_alpha=6.0, target_modules=["q_proj", "down_proj"])).eval()
    with torch.no_grad():
        for name, f in folds.items():
            mod = peft.base_model.model.get_submodule(name)
            mod.lora_A["default"].weight.copy_(f.A)
            mod.lora_B["default"].weight.copy_(f.B)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    served = served_model(LlamaForCausalLM.from_pretrained(tmp_path / "b"), folds, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, peft(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(served(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
