"""The fold of each method into one low-rank update (in memory, no files)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import rlora
from rlora.export import ExportError
from rlora.export.fold import LowRank, compact, compact_all, fold_adapter, fold_layer, pad_rank, task_index
from rlora.export.peft_format import peft_config, peft_state_dict
from rlora.layers import LAYERS, MultiHeadLoRALinear


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


# ----------------------------------------------------------------------------------------------
# every function of fold.py with exact references (tiny modules, fixed seeds)
# ----------------------------------------------------------------------------------------------
def _raises(fn, *args, **kw) -> str:
    """The message of the ExportError ``fn(*args, **kw)`` raises."""
    with pytest.raises(ExportError) as err:
        fn(*args, **kw)
    return str(err.value)


class _Net(torch.nn.Module):
    """Two linear layers, one nested (``blk.q``) and one at the top (``v``), for name handling."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.blk = torch.nn.Module()
        self.blk.q = torch.nn.Linear(d, d)
        self.v = torch.nn.Linear(d, d - 1)


def _injected(method: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = _Net()
    cfg = rlora.AdapterConfig(method=method, r=2, num_heads=3, tasks=["a", "b"], dropout=0.0, alpha=3.0,
                              target_modules=["q", "v"], **kw)
    rlora.inject(net, cfg)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return net.eval()


def test_task_index_messages_and_results_are_exact():
    cfg = rlora.AdapterConfig
    assert task_index(cfg(method="lora", tasks=["a", "b"]), None) is None
    assert task_index(cfg(method="lora", tasks=["a", "b"]), "b") is None
    assert task_index(cfg(method="align", tasks=["a", "b"]), None) is None          # plain LoRA in the forward
    assert task_index(cfg(method="hydra", tasks=["a", "b"]), "a") == 0
    assert task_index(cfg(method="mtl", tasks=["a", "b"]), "b") == 1
    assert task_index(cfg(method="hydra"), "anything") is None
    assert _raises(task_index, cfg(method="hydra", tasks=["a", "b"]), None) == \
        "--task is required for a hydra adapter: one of ['a', 'b']"
    assert _raises(task_index, cfg(method="rlora"), None) == "--task is required for a rlora adapter"
    assert _raises(task_index, cfg(method="mtl"), "a") == \
        "the mtl adapter records no tasks in adapter_config.json: re-save it with adapter.tasks set"
    assert _raises(task_index, cfg(method="mtl", tasks=["a", "b"]), "c") == \
        "unknown task 'c': the adapter's tasks are ['a', 'b']"


def test_fold_layer_messages_are_exact():
    assert _raises(fold_layer, _layer("mtl")[0]) == "folding an MTL-LoRA layer needs a task: pass --task"
    assert _raises(fold_layer, _layer("hydra")[0]) == \
        "folding a hydra layer needs its average gates: pass --data with the task's dev rows"
    assert _raises(fold_layer, _layer("rlora")[0], gates=torch.ones(2, 2) / 4) == \
        "average gates have shape (2, 2), expected (4,)"
    cfg = rlora.AdapterConfig(method="lora", r=2)
    bare = MultiHeadLoRALinear(torch.nn.Linear(4, 4), cfg)
    assert _raises(fold_layer, bare) == "cannot fold a MultiHeadLoRALinear layer"


def test_fold_layer_factors_per_method():
    """The factors themselves (not only their product): lora A, B_1; mtl Λ_t A, Σ m_ti B_i; routed A and Σ ḡ_i B_i
    with [A; A⁰], [·, −B̄⁰] appended for R-LoRA; fp64 gates are used in fp32."""
    layer, _ = _layer("lora")
    f = fold_layer(layer, task=1, gates=torch.ones(4))                    # both ignored by lora
    assert torch.equal(f.A, layer.lora_A) and torch.equal(f.B, layer.lora_B[:, 0]) and f.scaling == 2.0
    layer, _ = _layer("mtl")
    f = fold_layer(layer, 1)
    m = torch.softmax(layer.task_weight[1].detach() / layer.temperature, 0)
    torch.testing.assert_close(f.A, layer.task_lambda[1].detach() @ layer.lora_A.detach(), rtol=0, atol=1e-7)
    torch.testing.assert_close(f.B, sum(m[i] * layer.lora_B[:, i].detach() for i in range(4)), rtol=0, atol=1e-6)
    g = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    for method in ("hydra", "rlora"):
        layer, _ = _layer(method)
        f = fold_layer(layer, gates=g)
        B1 = sum(float(g[i]) * layer.lora_B[:, i].detach() for i in range(4))
        assert f.A.dtype == f.B.dtype == torch.float32 and f.scaling == 2.0
        if method == "hydra":
            assert torch.equal(f.A, layer.lora_A)
            torch.testing.assert_close(f.B, B1, rtol=0, atol=1e-6)
        else:
            assert torch.equal(f.A, torch.cat([layer.lora_A, layer.offset_A]))
            torch.testing.assert_close(f.B, torch.cat([B1, -layer.offset_B], 1), rtol=0, atol=1e-6)


def test_rlora_without_offset_folds_to_rank_r():
    cfg = rlora.AdapterConfig(method="rlora", r=3, num_heads=4, tasks=["a"], dropout=0.0, alpha=6.0,
                              zero_start_offset=False)
    torch.manual_seed(0)
    layer = LAYERS["rlora"](torch.nn.Linear(12, 10), cfg, num_tasks=1).eval()
    f = fold_layer(layer, gates=torch.full((4,), 0.25))
    assert f.rank == 3 and torch.equal(f.A, layer.lora_A)
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x) + x @ f.delta().t(), rtol=1e-5, atol=1e-5)


def test_fold_adapter_takes_each_layers_own_gates():
    net = _injected("hydra")
    gates = {"blk.q": torch.tensor([0.7, 0.2, 0.1]), "v": torch.tensor([0.1, 0.1, 0.8])}
    folds = fold_adapter(net, None, gates)
    assert list(folds) == ["blk.q", "v"]
    for name, layer in (("blk.q", net.blk.q), ("v", net.v)):
        want = fold_layer(layer, gates=gates[name])
        assert torch.equal(folds[name].A, want.A) and torch.equal(folds[name].B, want.B)
    assert "needs its average gates" in _raises(fold_adapter, net, None, {"v": gates["v"]})


def test_compact_keeps_dtype_scaling_and_balances_the_factors():
    """B''ᵀB'' = A''A''ᵀ = diag(σ) with σ the singular values of B A (descending); A keeps A's dtype, B keeps B's."""
    g = torch.Generator().manual_seed(4)
    A, B = torch.randn(3, 9, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g)
    f = compact(LowRank(A, B, 0.25))
    assert f.A.dtype == torch.float64 and f.B.dtype == torch.float32 and f.scaling == 0.25 and f.rank == 3
    sigma = torch.linalg.svdvals(B.double() @ A)[:3]                   # the other 4 are 0
    torch.testing.assert_close(f.A @ f.A.t(), torch.diag(sigma), rtol=0, atol=1e-10)
    torch.testing.assert_close(f.B.double().t() @ f.B.double(), torch.diag(sigma), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(f.B.double() @ f.A, B.double() @ A, rtol=0, atol=1e-5)


def test_compact_rtol_cuts_between_singular_values_and_keeps_one_of_zero():
    """Singular values 1 and 1e-3: rtol 1e-2 keeps one direction, 1e-4 both (and compact_all passes rtol on);
    a zero update keeps one (zero) direction, so every layer still has a factor."""
    U = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(8, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64))[0]
    f = LowRank(V.t().clone(), U * torch.tensor([1.0, 1e-3], dtype=torch.float64), 1.0)
    assert compact(f, rtol=1e-2).rank == 1 and compact(f, rtol=1e-4).rank == 2 and compact(f).rank == 2
    assert {k: v.rank for k, v in compact_all({"x": f}, rtol=1e-2).items()} == {"x": 1}
    assert compact_all({"x": f}, rtol=1e-4)["x"].rank == 2
    z = compact(LowRank(torch.zeros(2, 8), torch.zeros(6, 2), 1.0))
    assert z.rank == 1 and not z.delta().any()
    assert compact_all({}) == {}
    f4 = LowRank(f.A, 4 * f.B, 1.0)                                      # σ = 4, 4e-3: the cut is rtol·σ_max
    assert compact(f4, rtol=1e-2).rank == 1 and compact(f4, rtol=1e-4).rank == 2
    exact = LowRank(torch.eye(2), torch.diag(torch.tensor([2.0, 1.0])), 1.0)
    assert compact(exact, rtol=0.5).rank == 1 and compact(exact, rtol=0.49).rank == 2   # strictly above the cut
    one = compact(LowRank(torch.ones(1, 3), torch.full((2, 1), 2.0), 1.0))
    assert one.rank == 1 and torch.allclose(one.delta(), torch.full((2, 3), 2.0))
    empty = compact(LowRank(torch.zeros(0, 3), torch.zeros(2, 0), 1.0))
    assert empty.A.shape == (0, 3) and empty.B.shape == (2, 0)


def test_pad_rank_returns_the_same_fold_or_pads_with_zeros():
    A, B = torch.randn(2, 5), torch.randn(4, 2)
    f = LowRank(A, B, 0.5)
    assert pad_rank(f, 2) is f and pad_rank(f, 1) is f
    g = pad_rank(f, 3)
    assert g.A.shape == (3, 5) and g.B.shape == (4, 3) and g.scaling == 0.5
    assert torch.equal(g.A[:2], A) and torch.equal(g.B[:, :2], B) and not g.A[2].any() and not g.B[:, 2].any()


@pytest.mark.parametrize("method,task", [("lora", None), ("mtl", 0), ("mtl", 1), ("hydra", None), ("rlora", None)])
def test_folded_weights_are_w0_plus_the_update_and_leave_the_model_unmerged(method, task):
    from rlora.export.fold import folded_weights

    net = _injected(method)
    w0 = {n: m.base.weight.detach().clone() for n, m in (("blk.q", net.blk.q), ("v", net.v))}
    gates = {"blk.q": torch.tensor([0.5, 0.3, 0.2]), "v": torch.tensor([0.2, 0.2, 0.6])}
    folds = fold_adapter(net, task, gates if method in ("hydra", "rlora") else None)
    got = folded_weights(net, method, task, folds)
    assert list(got) == ["blk.q", "v"]
    for name, layer in (("blk.q", net.blk.q), ("v", net.v)):
        delta = layer.delta_weight(task) if method in ("lora", "mtl") else folds[name].delta()
        torch.testing.assert_close(got[name], w0[name] + delta.detach(), rtol=0, atol=1e-6)
        assert torch.equal(layer.base.weight, w0[name]) and layer.merged_task is None
        assert not got[name].requires_grad and got[name].data_ptr() != layer.base.weight.data_ptr()


def test_folded_weights_are_formed_on_the_base_weights_device():
    """A fold computed on the CPU is moved to the base weight's device (here the meta device) before the sum."""
    from rlora.export.fold import folded_weights

    net = _injected("hydra")
    folds = fold_adapter(net, None, {"blk.q": torch.full((3,), 1 / 3), "v": torch.full((3,), 1 / 3)})
    for layer in (net.blk.q, net.v):
        layer.base.to("meta")
    got = folded_weights(net, "hydra", None, folds)
    assert {w.device.type for w in got.values()} == {"meta"} and got["v"].shape == (5, 6)


def test_folded_weights_of_a_bf16_model_are_rounded_once_from_fp32():
    """(W0 + ΔW) is formed in fp32 and rounded to the weight's dtype once."""
    from rlora.export.fold import folded_weights

    net = _injected("hydra")
    with torch.no_grad():
        for layer in (net.blk.q, net.v):
            layer.base.weight.data = layer.base.weight.data.bfloat16()
    folds = fold_adapter(net, None, {"blk.q": torch.full((3,), 1 / 3), "v": torch.full((3,), 1 / 3)})
    got = folded_weights(net, "hydra", None, folds)
    for name, layer in (("blk.q", net.blk.q), ("v", net.v)):
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], (layer.base.weight.float() + folds[name].delta()).bfloat16())


def test_apply_weights_copies_into_the_plain_model_and_names_what_does_not_fit():
    from rlora.export.fold import apply_weights

    plain = _Net().bfloat16()
    w = {"blk.q": torch.randn(6, 6), "v": torch.randn(5, 6)}
    assert apply_weights(plain, w) is plain
    assert torch.equal(plain.blk.q.weight, w["blk.q"].bfloat16()) and torch.equal(plain.v.weight, w["v"].bfloat16())
    assert plain.v.weight.dtype == torch.bfloat16
    assert _raises(apply_weights, _Net(), {"blk.k": torch.zeros(6, 6)}) == \
        "the base model has no module blk.k: pass the --base-model the adapter was trained on"
    fit = "module {} of the base model does not fit the adapter: pass the --base-model the adapter was trained on"
    assert _raises(apply_weights, _Net(), {"v": torch.zeros(6, 6)}) == fit.format("v")
    assert _raises(apply_weights, _Net(), {"blk": torch.zeros(6, 6)}) == fit.format("blk")


def test_served_lora_linear_rounds_factors_to_the_dtype_on_the_base_device():
    """y = W0 x + (x Aᵀ)(s·B)ᵀ with A and s·B rounded to the dtype first (not s·(x Aᵀ Bᵀ))."""
    from rlora.export.fold import ServedLoRALinear

    g = torch.Generator().manual_seed(7)
    f = LowRank(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 0.3)
    lin = torch.nn.Linear(6, 5).bfloat16()
    served = ServedLoRALinear(lin, f, torch.bfloat16)
    assert served.A.dtype == served.B.dtype == torch.bfloat16 and served.base is lin
    assert torch.equal(served.A, f.A.bfloat16()) and torch.equal(served.B, (0.3 * f.B).bfloat16())
    x = torch.randn(4, 6, generator=g).bfloat16()
    with torch.no_grad():
        assert torch.equal(served(x), lin(x) + (x @ f.A.bfloat16().t()) @ (0.3 * f.B).bfloat16().t())
    on_meta = ServedLoRALinear(torch.nn.Linear(6, 5, device="meta"), f, torch.float16)
    assert on_meta.A.device.type == on_meta.B.device.type == "meta" and on_meta.A.dtype == torch.float16


def test_served_model_replaces_nested_and_top_level_layers():
    from rlora.export.fold import ServedLoRALinear, served_model

    net = _Net().train()
    q, v = net.blk.q, net.v
    folds = {"blk.q": LowRank(torch.ones(1, 6), torch.ones(6, 1), 1.0), "v": LowRank(torch.ones(1, 6), torch.ones(5, 1), 1.0)}
    out = served_model(net, folds)
    assert out is net and not net.training
    assert isinstance(net.blk.q, ServedLoRALinear) and net.blk.q.base is q
    assert isinstance(net.v, ServedLoRALinear) and net.v.base is v
    assert q.weight.dtype == torch.bfloat16 and net.v.A.dtype == torch.bfloat16
    assert _raises(served_model, _Net(), {"blk.k": folds["v"]}) == \
        "the base model has no module blk.k: pass the --base-model the adapter was trained on"
    assert served_model(_Net(), {}, torch.float16).v.weight.dtype == torch.float16


def test_iter_layer_gates_rounds_to_six_digits():
    from rlora.export.fold import iter_layer_gates

    got = list(iter_layer_gates({"a": torch.tensor([0.1234567, 0.8765433]), "b": torch.tensor([1.0])}))
    assert got == [("a", [0.123457, 0.876543]), ("b", [1.0])]


# ----------------------------------------------------------------------------------------------
# measurements on a tiny Llama (1 layer, vocab 64)
# ----------------------------------------------------------------------------------------------
def _llama(method: str | None = None, seed: int = 0, dropout: float = 0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    if method is not None:
        rlora.inject(model, rlora.AdapterConfig(method=method, r=2, num_heads=3, tasks=["a", "b"], dropout=dropout,
                                                alpha=4.0, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.5)
    return model


def _batches():
    """Two batches: 5 + 3 real tokens, then 3 (11 in all). The second row is padded on the left: the model must
    be given the mask (with right padding alone a causal model's real tokens never see the padding)."""
    from rlora.export.fold import TokenBatch

    ids = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(8))
    return [TokenBatch(ids[:2], torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])),
            TokenBatch(ids[2:, :3], torch.ones(1, 3, dtype=torch.long))]


def _logits(model, batches, task=None):
    """The model's logits at the real tokens of each batch, one tensor per batch."""
    out = []
    with torch.no_grad(), rlora.task_ids(None if task is None else task):
        for b in batches:
            out.append(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[b.attention_mask.bool()])
    return out


def test_reference_pass_averages_the_router_over_real_tokens_and_keeps_the_heads_input():
    from rlora.export.fold import average_gates, reference_pass
    from rlora.inject import adapter_layers

    model = _llama("hydra", dropout=0.5).train()                          # the pass runs it in eval mode
    layers = dict(adapter_layers(model))
    batches = _batches()
    seen = {n: [] for n in layers}
    hooks = [l.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0])) for n, l in layers.items()]
    model.eval()
    want_logits = _logits(model, batches)
    for h in hooks:
        h.remove()
    model.train()
    ref = reference_pass(model, batches)
    assert model.training and all(not l._forward_pre_hooks for l in layers.values())
    assert not model.lm_head._forward_pre_hooks
    assert ref.tokens == 11 and sorted(ref.gates) == sorted(layers)
    for n, l in layers.items():
        x = torch.cat([xb[b.attention_mask.bool()] for xb, b in zip(seen[n], batches)])      # [11, d_in]
        want = torch.softmax(x.double() @ l.router.detach().double().t(), -1).mean(0)
        assert ref.gates[n].dtype == torch.float32
        torch.testing.assert_close(ref.gates[n].double(), want, rtol=0, atol=1e-6)
    assert len(ref.hidden) == 2 and [h.shape[0] for h in ref.hidden] == [8, 3]
    for h, want in zip(ref.hidden, want_logits):
        torch.testing.assert_close(model.lm_head(h), want, rtol=1e-5, atol=1e-5)
    gates, tokens = average_gates(model, batches)
    assert tokens == 11 and all(torch.equal(gates[n], ref.gates[n]) for n in layers)


def test_reference_pass_routes_the_task_and_refuses_empty_rows():
    from rlora.export.fold import TokenBatch, reference_pass

    model = _llama("mtl")
    batches = _batches()
    ref = reference_pass(model, batches, task=1)
    assert ref.gates == {} and ref.tokens == 11
    for h, want in zip(ref.hidden, _logits(model, batches, task=1)):
        torch.testing.assert_close(model.lm_head(h), want, rtol=1e-5, atol=1e-5)
    empty = [TokenBatch(torch.ones(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))]
    assert _raises(reference_pass, model, empty, 0) == "the dev rows hold no tokens: cannot measure the average gates"


def test_reference_pass_keeps_no_hidden_states_without_a_plain_llama_head():
    from rlora.export.fold import reference_pass

    model = _llama("hydra")
    model.config.model_type = "gpt2"
    ref = reference_pass(model, _batches())
    assert ref.hidden is None and ref.tokens == 11 and len(ref.gates) == 2


def _want_error(adapter_logits, cand_logits) -> float:
    num = sum(float(((c.double() - a.double()) ** 2).sum()) for a, c in zip(adapter_logits, cand_logits))
    den = sum(float((a.double() ** 2).sum()) for a in adapter_logits)
    return (num / den) ** 0.5


@pytest.mark.parametrize("method,task", [("hydra", None), ("mtl", 1)])
def test_relative_errors_equal_the_independent_formula_with_and_without_the_reference(method, task):
    from rlora.export.fold import reference_pass, relative_errors, relative_logit_error

    model, plain, other = _llama(method), _llama(), _llama(method, seed=3)
    batches = _batches()
    la = _logits(model, batches, task)
    want = {"plain": _want_error(la, _logits(plain, batches)), "other": _want_error(la, _logits(other, batches, task))}
    assert 0.01 < want["plain"] < 10 and want["plain"] != pytest.approx(want["other"], rel=1e-3)
    cands = {"plain": plain, "other": other, "self": model}
    for ref in (None, reference_pass(model, batches, task)):
        got = relative_errors(model, cands, batches, task, ref)
        assert list(got) == ["plain", "other", "self"]
        assert got["plain"] == pytest.approx(want["plain"], rel=1e-6)
        assert got["other"] == pytest.approx(want["other"], rel=1e-6)
        assert got["self"] < 1e-6
    assert relative_logit_error(model, plain, batches, task) == pytest.approx(want["plain"], rel=1e-6)


def test_relative_errors_recompute_the_logits_when_the_reference_kept_no_hidden_states():
    from rlora.export.fold import Reference, relative_errors

    model, plain = _llama("hydra"), _llama()
    batches = _batches()
    want = _want_error(_logits(model, batches), _logits(plain, batches))
    got = relative_errors(model, {"p": plain}, batches, None, Reference({}, 11, None))["p"]
    assert got == pytest.approx(want, rel=1e-6)


def test_relative_errors_reuse_the_kept_hidden_states_instead_of_a_second_adapter_forward():
    from rlora.export.fold import reference_pass, relative_errors

    model, plain = _llama("hydra"), _llama()
    batches = _batches()
    ref = reference_pass(model, batches)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    got = relative_errors(model, {"p": plain}, batches, None, ref)["p"]
    hook.remove()
    assert calls == [] and got == pytest.approx(_want_error(_logits(model, batches), _logits(plain, batches)), rel=1e-6)


def test_relative_errors_of_a_bf16_model_through_the_kept_hidden_states():
    """The kept hidden states are fp32; the bf16 output layer gets them in its own dtype."""
    from rlora.export.fold import reference_pass, relative_errors

    model, plain = _llama("hydra").bfloat16(), _llama().bfloat16()
    batches = _batches()
    again = relative_errors(model, {"p": plain}, batches)["p"]
    kept = relative_errors(model, {"p": plain}, batches, None, reference_pass(model, batches))["p"]
    assert kept == pytest.approx(again, rel=1e-2) and 0.01 < kept < 10


class _Fixed(torch.nn.Module):
    """A stand-in causal LM that returns the given logits [b, L, V] call after call (indexing them with the
    matching given mask) and records, per call, the devices of input_ids, attention_mask and of the mask its
    logits are indexed with, and use_cache. Its one parameter sits on ``device`` (the meta device stands for an
    accelerator here: it holds no data)."""

    def __init__(self, logits: list, masks: list, device: str = "cpu"):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1, device=device))
        self.outs, self.masks, self.calls = list(logits), list(masks), []

    def forward(self, input_ids, attention_mask, use_cache):
        call = [input_ids.device.type, attention_mask.device.type, use_cache]
        self.calls.append(call)
        out, mask = self.outs[len(self.calls) - 1], self.masks[len(self.calls) - 1]

        class Logits:
            def __getitem__(self, m):
                call.append(m.device.type)
                return out[mask.bool()]

        return SimpleNamespace(logits=Logits())


def test_relative_errors_sum_squares_in_fp64_on_each_models_device():
    """Logits of 1e25 (their squares overflow fp32) give the exact ratio; every model gets its inputs on its own
    device, without a key/value cache."""
    from rlora.export.fold import TokenBatch, relative_errors

    g = torch.Generator().manual_seed(9)
    mask = [torch.tensor([[1, 1, 0], [0, 1, 1]]), torch.tensor([[1, 1, 1]])]
    batches = [TokenBatch(torch.ones_like(m), m) for m in mask]
    la = [torch.randn(*m.shape, 4, generator=g) * 1e25 for m in mask]
    lp = [a + torch.randn(a.shape, generator=g) * 1e24 for a in la]
    adapter, cand = _Fixed(la, mask, "meta"), _Fixed(lp, mask, "meta")
    got = relative_errors(adapter, {"c": cand}, batches)["c"]
    want = _want_error([a[m.bool()] for a, m in zip(la, mask)], [p[m.bool()] for p, m in zip(lp, mask)])
    assert math.isfinite(got) and got == pytest.approx(want, rel=1e-9) and 0.01 < want < 1
    assert adapter.calls == cand.calls == [["meta", "meta", False, "meta"]] * 2


def test_reference_pass_sends_the_rows_to_the_models_device_without_a_cache():
    from rlora.export.fold import TokenBatch, reference_pass

    batches = [TokenBatch(torch.ones(1, 3, dtype=torch.long), torch.tensor([[1, 1, 0]]))] * 2
    model = _Fixed([torch.zeros(1, 3, 2)] * 2, [b.attention_mask for b in batches], "meta")
    ref = reference_pass(model, batches)
    assert ref.tokens == 4 and ref.gates == {} and ref.hidden is None
    assert model.calls == [["meta", "meta", False]] * 2


def test_relative_errors_refuse_rows_without_tokens():
    from rlora.export.fold import TokenBatch, relative_errors

    empty = [TokenBatch(torch.ones(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))]
    assert _raises(relative_errors, _llama("lora"), {"p": _llama()}, empty) == \
        "the dev rows hold no tokens: cannot measure the logit error"


def test_logit_head_only_for_a_plain_linear_head_of_the_llama_family():
    from types import SimpleNamespace

    from rlora.export.fold import _logit_head

    class M(torch.nn.Module):
        def __init__(self, head, mtype):
            super().__init__()
            self.head = head
            if mtype is not None:
                self.config = SimpleNamespace(model_type=mtype)

        def get_output_embeddings(self):
            return self.head

    lin = torch.nn.Linear(4, 8)
    for mtype in ("llama", "mistral", "qwen2", "qwen3"):
        assert _logit_head(M(lin, mtype)) is lin
    for mtype in ("gpt2", "gemma2", None):
        assert _logit_head(M(lin, mtype)) is None
    assert _logit_head(M(torch.nn.Embedding(8, 4), "llama")) is None
    lora_head = LAYERS["lora"](torch.nn.Linear(4, 8), rlora.AdapterConfig(method="lora", r=1))
    assert _logit_head(M(lora_head, "llama")) is None
    bare = torch.nn.Linear(4, 8)
    bare.config = SimpleNamespace(model_type="llama")
    assert _logit_head(bare) is None                                     # no get_output_embeddings
    assert _logit_head(_llama()) is not None


def test_routing_sets_one_task_id_per_row_and_device_reads_the_parameters():
    from rlora.context import current_task_ids
    from rlora.export.fold import _device, _routing

    with _routing(None, 3):
        assert current_task_ids() is None
    with _routing(1, 3):
        ids = current_task_ids()
        assert ids.dtype == torch.long and ids.tolist() == [1, 1, 1]
    assert _device(torch.nn.Linear(2, 2, device="meta")).type == "meta"


# ----------------------------------------------------------------------------------------------
# dev rows -> token batches
# ----------------------------------------------------------------------------------------------
def test_token_batches_sort_pad_and_mask(monkeypatch):
    """Rows sorted by length, right-padded with the pad id (eos, then 0, when there is none), mask 1 on real
    tokens; max_length and use_chat_template reach the encoder. Rows are encoded by a stand-in that makes
    row i a run of (i+1) tokens of value 20-i, so that sorting by length differs from sorting the lists (the
    encoder itself is tested in tests/data)."""
    from types import SimpleNamespace

    import rlora.data.tokenization as tokenization
    from rlora.export.fold import token_batches

    calls = []

    def encode(tok, ex, max_length, use_chat_template):
        assert tok is current
        calls.append((ex, max_length, use_chat_template))
        return {"input_ids": [20 - ex] * (ex + 1)}

    monkeypatch.setattr(tokenization, "encode_example", encode)
    tok = current = SimpleNamespace(pad_token_id=7, eos_token_id=5)
    out = token_batches(tok, [2, 0, 4, 1, 3], max_length=33, batch_size=2, use_chat_template=False)
    assert calls == [(i, 33, False) for i in (2, 0, 4, 1, 3)]
    assert [b.input_ids.tolist() for b in out] == [[[20, 7], [19, 19]], [[18, 18, 18, 7], [17, 17, 17, 17]],
                                                   [[16] * 5]]
    assert [b.attention_mask.tolist() for b in out] == [[[1, 0], [1, 1]], [[1, 1, 1, 0], [1, 1, 1, 1]], [[1] * 5]]
    assert all(b.input_ids.dtype == b.attention_mask.dtype == torch.long for b in out)
    calls.clear()
    current = SimpleNamespace(pad_token_id=None, eos_token_id=5)
    out = token_batches(current, [1, 0])
    assert calls == [(1, 256, True), (0, 256, True)] and len(out) == 1
    assert out[0].input_ids.tolist() == [[20, 5], [19, 19]]
    pads = []
    for eos in (None, 0):
        current = SimpleNamespace(pad_token_id=None, eos_token_id=eos)
        pads.append(token_batches(current, [1, 0])[0].input_ids[0, 1].item())
    assert pads == [0, 0]
    current = tok
    assert [b.input_ids.shape[0] for b in token_batches(tok, list(range(9)))] == [4, 4, 1]


def test_load_dev_examples_reads_the_first_rows_and_names_the_fix(tmp_path, monkeypatch):
    import json

    from rlora.export.fold import load_dev_examples

    (tmp_path / "t1").mkdir()
    (tmp_path / "t2").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    rows = [{"id": f"r{i}", "input": f"q{i}", "options": None, "target": f"a{i}"} for i in range(4)]
    (tmp_path / "t1" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_dev_examples(tmp_path, "t1", 3)
    assert [e.id for e in got] == ["r0", "r1", "r2"] and {e.task for e in got} == {"t1"}
    assert [e.id for e in load_dev_examples(str(tmp_path), "t1", 1)] == ["r0"]
    assert _raises(load_dev_examples, tmp_path, "t3", 2) == \
        f"--data {tmp_path} has no folder for task 't3' (folders: ['t1', 't2']): pass the run's data directory " \
        "(one folder per task)"
    missing = tmp_path / "nowhere"
    assert _raises(load_dev_examples, missing, "t1", 2) == \
        f"--data {missing} has no folder for task 't1' (folders: []): pass the run's data directory (one folder per task)"
    assert _raises(load_dev_examples, tmp_path, "t1", 0) == "--max-examples must be >= 1, got 0"
    (tmp_path / "g").mkdir()
    (tmp_path / "t1").rename(tmp_path / "g" / "t1")                      # the rows carry the task name given
    assert {e.task for e in load_dev_examples(tmp_path, "g/t1", 2)} == {"g/t1"}
    (tmp_path / "g" / "t1").rename(tmp_path / "t1")
    (tmp_path / "g").rmdir()
    monkeypatch.setenv("HOME", str(tmp_path))                             # "~" is expanded
    assert [e.id for e in load_dev_examples("~", "t1", 2)] == ["r0", "r1"]
    assert _raises(load_dev_examples, "~", "t9", 2) == \
        "--data ~ has no folder for task 't9' (folders: ['t1', 't2']): pass the run's data directory (one folder per task)"
