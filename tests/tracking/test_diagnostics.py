"""Head, router, mixing and task-interference diagnostics against direct (naive) computations."""
import math

import numpy as np
import pytest
import torch
from mlflow.utils.validation import _validate_metric_name

import rlora
from diag_models import TASKS, adapter_model, probe_for, randomise, synthetic_rows
from rlora.config import SamplerConfig
from rlora.layers import HydraLoRALinear
from rlora.sampler.dynamic import DynamicBalancer
from rlora.tracking import diagnostics as D
from rlora.train.batches import forward_loss, left_padded_batch

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------
# head geometry
# ------------------------------------------------------------------------------------------------
def test_rlora_random_init_heads_are_nearly_orthogonal():
    model = adapter_model("rlora", heads=4, r=8, hidden=256, targets=ALL7)
    sim = D.head_similarity(model)
    assert len(sim) == 2 * 7
    b = np.array([s["B_cos"] for s in sim.values()])
    ba = np.array([s["BA_cos"] for s in sim.values()])
    assert np.abs(b).max() < 0.1 and np.abs(ba).max() < 0.1
    assert abs(b.mean()) < 0.03 and abs(ba.mean()) < 0.03


@pytest.mark.parametrize("method", ["hydra", "mtl"])
def test_zero_initialised_heads_have_cosine_exactly_zero(method):
    model = adapter_model(method)
    sim = D.head_similarity(model)
    assert sim and all(s == {"B_cos": 0.0, "BA_cos": 0.0} for s in sim.values())
    for m in D.head_similarity_matrices(model, "B").values():
        assert np.array_equal(m, np.zeros((3, 3)))          # zero heads: not even the diagonal is 1
    assert all(np.array_equal(v, np.zeros(3)) for v in D.head_norms(model).values())
    assert all(np.array_equal(v, np.zeros(3)) for v in D.effective_rank(model).values())
    metrics = D.diagnostics_metrics(model, probe_for(), TASKS)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["diag/head_cos_B/mean"] == 0.0 and metrics["diag/head_cos_BA/max"] == 0.0


def test_identical_heads_give_cosine_one_and_opposite_heads_minus_one():
    model = adapter_model("rlora")
    with torch.no_grad():
        for _, layer in rlora.adapter_layers(model):
            layer.lora_B[:, 1:] = layer.lora_B[:, :1]
    for s in D.head_similarity(model).values():
        assert s["B_cos"] == pytest.approx(1.0, abs=1e-12) and s["BA_cos"] == pytest.approx(1.0, abs=1e-12)
    with torch.no_grad():
        for _, layer in rlora.adapter_layers(model):
            layer.lora_B[:, 1] = -layer.lora_B[:, 0]
    for m in D.head_similarity_matrices(model, "BA").values():
        assert m[0, 1] == pytest.approx(-1.0, abs=1e-12) and m[0, 2] == pytest.approx(1.0, abs=1e-12)
        assert np.allclose(m, m.T) and np.array_equal(np.diag(m), np.ones(3))


def test_cosine_from_gram_convention_for_zero_vectors():
    v = np.array([[1.0, 0.0], [0.0, 0.0], [2.0, 2.0]])
    cos = D.cosine_from_gram(v @ v.T)
    assert np.array_equal(cos[1], np.zeros(3)) and np.array_equal(cos[:, 1], np.zeros(3))
    assert cos[0, 0] == 1.0 and cos[0, 2] == pytest.approx(1 / math.sqrt(2))
    assert D.mean_pairwise(cos) == pytest.approx((0 + 1 / math.sqrt(2) + 0) / 3)
    assert D.mean_pairwise(np.ones((1, 1))) == 0.0


def test_norms_similarity_and_effective_rank_equal_the_full_update():
    model = randomise(adapter_model("hydra", heads=3, r=4))
    name, layer = next(iter(rlora.adapter_layers(model)))
    with torch.no_grad():
        layer.lora_B[:, 0, 2:] = 0.0          # head 0 has rank 2
        layer.lora_B[:, 2] = 0.0              # head 2 is zero
    norms, ranks = D.head_norms(model), D.effective_rank(model)
    cos = D.head_similarity_matrices(model, "BA")
    for name, layer in rlora.adapter_layers(model):
        A, B, s = layer.lora_A.detach().double(), layer.lora_B.detach().double(), layer.scaling
        full = [s * B[:, i] @ A for i in range(3)]                                  # [d_out, d_in] each
        for i, dw in enumerate(full):
            assert norms[name][i] == pytest.approx(torch.linalg.matrix_norm(dw).item(), rel=1e-12, abs=1e-15)
            sigma = torch.linalg.svdvals(dw).numpy()
            if sigma.sum() == 0:
                expected = 0.0
            else:
                p = sigma[sigma > 1e-12 * sigma.max()] / sigma.sum()
                expected = float(np.exp(-(p * np.log(p)).sum()))
            assert ranks[name][i] == pytest.approx(expected, rel=1e-6, abs=1e-12)
        flat = torch.stack([dw.reshape(-1) for dw in full])
        n = flat.norm(dim=1)
        ref = (flat @ flat.t()) / torch.outer(n, n).clamp(min=1e-300)
        assert cos[name][0, 1] == pytest.approx(ref[0, 1].item(), abs=1e-12)
    first = next(iter(ranks))
    assert ranks[first][0] <= 2.0 + 1e-9 and ranks[first][1] > 2.0 and ranks[first][2] == 0.0


def test_head_diagnostics_cover_plain_lora_without_pairs():
    model = randomise(adapter_model("lora"))
    assert D.head_similarity(model) == {} and D.head_similarity_matrices(model) == {}
    assert all(v.shape == (1,) and v[0] > 0 for v in D.head_norms(model).values())


# ------------------------------------------------------------------------------------------------
# router usage
# ------------------------------------------------------------------------------------------------
def naive_router(model, probe):
    """Gates recomputed from each routed layer's input on the non-pad tokens, in float64."""
    layers = [(n, l) for n, l in rlora.adapter_layers(model) if isinstance(l, HydraLoRALinear)]
    usage, entropy = [], []
    model.eval()
    for batch in probe.values():
        seen = {}
        hooks = [l.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach()))
                 for n, l in layers]
        with torch.no_grad(), rlora.task_ids(batch["task_ids"]):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"])
        for h in hooks:
            h.remove()
        mask = batch["attention_mask"].reshape(-1).bool()
        u, e = [], []
        for n, l in layers:
            x = seen[n].reshape(-1, l.d_in)[mask].double()
            g = torch.softmax(x @ l.router.detach().double().t(), dim=-1)
            u.append(g.mean(0))
            e.append((-(g * g.log()).sum(-1) / math.log(g.shape[-1])).mean())
        usage.append(torch.stack(u).mean(0).numpy())
        entropy.append(torch.stack(e).mean().item())
    return np.array(usage), np.array(entropy)


def test_router_usage_at_rlora_init_is_uniform_with_entropy_one():
    model = adapter_model("rlora")
    res = D.router_usage(model, probe_for())
    assert res["tasks"] == TASKS and res["usage"].shape == (3, 3)
    assert np.allclose(res["usage"], 1 / 3, atol=1e-7)
    assert np.allclose(res["entropy"], 1.0, atol=1e-9) and (res["entropy"] <= 1.0).all()
    assert len(res["per_layer"]) == 2 * 3


def test_router_usage_matches_naive_and_restores_the_model():
    model = randomise(adapter_model("hydra"), std=1.0)
    model.train()
    model.model.layers[0].eval()                    # a mixed train/eval state must come back exactly
    modes = [m.training for m in model.modules()]
    probe = probe_for()
    res = D.router_usage(model, probe)
    assert [m.training for m in model.modules()] == modes
    assert all("gates" not in l.__dict__ for _, l in rlora.adapter_layers(model))
    assert np.allclose(res["usage"].sum(axis=1), 1.0, atol=1e-9)
    assert ((res["entropy"] >= 0) & (res["entropy"] <= 1)).all() and res["entropy"].max() < 0.99
    usage, entropy = naive_router(model, probe)
    assert np.allclose(res["usage"], usage, atol=1e-6) and np.allclose(res["entropy"], entropy, atol=1e-6)


def test_router_usage_restores_gates_on_error():
    model = adapter_model("rlora")
    probe = probe_for()
    probe["beta"] = {k: v for k, v in probe["beta"].items() if k != "input_ids"}
    with pytest.raises(D.DiagnosticsError, match=r"probe\['beta'\] lacks \['input_ids'\]"):
        D.router_usage(model, probe)
    assert all("gates" not in l.__dict__ for _, l in rlora.adapter_layers(model))
    assert D.router_usage(adapter_model("mtl"), probe_for()) is None


# ------------------------------------------------------------------------------------------------
# MTL-LoRA mixing
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("diagonal", [False, True])
def test_mtl_mixing_rows_sum_to_one_and_lambda_deviation(diagonal):
    model = adapter_model("mtl", diagonal=diagonal)
    res = D.mtl_mixing(model)
    assert res["mixing"].shape == (3, 3) and np.allclose(res["mixing"].sum(axis=1), 1.0, atol=1e-6)
    assert np.array_equal(res["lambda_dev"], np.zeros(3))                    # Λ = I at init
    randomise(model)
    res = D.mtl_mixing(model)
    mix, dev = [], []
    for _, l in rlora.adapter_layers(model):
        mix.append(torch.softmax(l.task_weight.double() / l.temperature, dim=-1))
        lam = torch.diag_embed(l.task_lambda.double()) if diagonal else l.task_lambda.double()
        dev.append(torch.stack([torch.linalg.matrix_norm(lam[t] - torch.eye(l.r, dtype=torch.float64))
                                for t in range(3)]))
    assert np.allclose(res["mixing"], torch.stack(mix).mean(0).detach().numpy(), atol=1e-6)
    assert np.allclose(res["lambda_dev"], torch.stack(dev).mean(0).detach().numpy(), atol=1e-6)
    assert np.allclose(res["mixing"].sum(axis=1), 1.0, atol=1e-6) and (res["lambda_dev"] > 0).all()
    assert D.mtl_mixing(adapter_model("hydra")) is None


# ------------------------------------------------------------------------------------------------
# task interference
# ------------------------------------------------------------------------------------------------
def naive_interference(model, probe, num_tasks):
    """One backward per task into .grad, cosines in numpy float64."""
    model.eval()
    params = [p for _, l in rlora.adapter_layers(model) for p in l.parameters() if p.requires_grad]
    grads = []
    for batch in probe.values():
        model.zero_grad(set_to_none=True)
        forward_loss(model, batch, num_tasks)[0].backward()
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                for p in params]).double().numpy())
    model.zero_grad(set_to_none=True)
    g = np.stack(grads)
    n = np.linalg.norm(g, axis=1)
    return (g @ g.T) / np.outer(n, n)


@pytest.mark.parametrize("method", ["lora", "rlora", "mtl"])
def test_interference_equals_naive_per_task_backward(method):
    model = randomise(adapter_model(method), std=0.1)
    model.train()
    probe = probe_for()
    got = D.task_interference(model, probe, 3)
    assert all(m.training for m in model.modules())                         # mode restored
    assert all(p.grad is None for p in model.parameters())                 # .grad untouched
    assert np.allclose(got, got.T, atol=1e-12) and np.allclose(np.diag(got), 1.0, atol=1e-12)
    assert np.array_equal(got, D.task_interference(model, probe, 3))       # eval mode: deterministic
    ref = naive_interference(model, probe, 3)
    assert np.abs(got - ref).max() < 1e-6
    assert (np.abs(got) <= 1.0).all() and not np.allclose(got, 1.0)


def test_interference_zero_gradient_and_absent_tasks():
    model = randomise(adapter_model("rlora"), std=0.1)
    rows = synthetic_rows(["alpha", "beta"])
    silent = [{"input_ids": r["input_ids"], "labels": [-100] * len(r["input_ids"])} for r in rows["beta"]]
    probe = {"alpha": left_padded_batch(rows["alpha"], 0, [0, 0]), "beta": left_padded_batch(silent, 0, [1, 1])}
    c = D.task_interference(model, probe, 3)
    assert c[0, 0] == 1.0
    assert c[1, 0] == 0.0 and c[0, 1] == 0.0 and c[1, 1] == 0.0              # zero gradient: zero row/column
    assert np.isnan(c[2]).all() and np.isnan(c[:, 2]).all()                  # gamma not probed
    metrics = D._flatten(D.Diagnostics(task_names=TASKS, interference=c))
    assert metrics["diag/interference/alpha__beta"] == 0.0
    assert not any("gamma" in k for k in metrics) and all(math.isfinite(v) for v in metrics.values())


def test_interference_summary_is_what_the_dynamic_sampler_uses():
    model = randomise(adapter_model("hydra"), std=0.1)
    c = D.task_interference(model, probe_for(), 3)
    summary = D.interference_summary(c)
    expected = [(c[t].sum() - c[t, t]) / 2 for t in range(3)]
    assert np.allclose(summary, expected, atol=1e-12)
    cfg = SamplerConfig(strategy="dynamic", dynamic_signal="loss_ratio+conflict")
    balancer = DynamicBalancer(np.array([10, 10, 10]), cfg)
    balancer.observe([1.0, 1.0, 1.0], step=1, conflict=c)
    assert np.allclose(balancer.conflict, summary, atol=1e-12)
    partial = c.copy()
    partial[2, :] = partial[:, 2] = np.nan
    assert np.allclose(D.interference_summary(partial), [c[0, 1], c[0, 1], 0.0])
    assert np.array_equal(D.interference_summary(np.ones((1, 1))), [0.0])


def test_probe_errors_are_one_line():
    model = adapter_model("rlora")
    rows = synthetic_rows(["alpha", "beta"])
    mixed = {"alpha": left_padded_batch(rows["alpha"] + rows["beta"], 0, [0, 0, 1, 1])}
    with pytest.raises(D.DiagnosticsError, match=r"probe\['alpha'\] mixes task ids \[0, 1\]"):
        D.task_interference(model, mixed, 3)
    bad = {"alpha": left_padded_batch(rows["alpha"], 0, [5, 5])}
    with pytest.raises(D.DiagnosticsError, match=r"task id 5, outside 0..2"):
        D.task_interference(model, bad, 3)
    with pytest.raises(D.DiagnosticsError, match="not in task_names"):
        D.run_diagnostics(model, probe_for(), ["alpha"])
    from helpers import tiny_llama
    with pytest.raises(D.DiagnosticsError, match="no adapter layer"):
        D.run_diagnostics(tiny_llama(), None, TASKS)
    with pytest.raises(D.DiagnosticsError, match="per_task must be >= 1"):
        D.make_probe(rows, ["alpha", "beta"], 0, per_task=0)
    frozen = adapter_model("lora")
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(D.DiagnosticsError, match="no trainable adapter parameter"):
        D.task_interference(frozen, probe_for(), 3)


# ------------------------------------------------------------------------------------------------
# the flat metrics
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "hydra", "rlora", "mtl"])
def test_metrics_are_finite_and_valid_mlflow_names(method):
    tasks = ["bool/q", "..", "ünï:code", "a b", "a_b"]
    model = randomise(adapter_model(method, tasks=tasks), std=0.1)
    d = D.run_diagnostics(model, probe_for(tasks), tasks)
    metrics = d.metrics()
    for name, value in metrics.items():
        _validate_metric_name(name)
        assert name.startswith("diag/") and math.isfinite(value) and isinstance(value, float)
    assert "diag/eff_rank/mean" in metrics and "diag/interference/mean" in metrics
    assert len([k for k in metrics if k.startswith("diag/interference/") and "__" in k]) == 10
    if method in ("hydra", "rlora"):
        assert "diag/router_usage/bool_q/head2" in metrics and "diag/router_entropy/_" in metrics
        assert np.allclose(d.router["usage"], D.router_usage(model, probe_for(tasks))["usage"], atol=1e-6)
        ent = [metrics[f"diag/router_entropy/{s}"] for s in D._unique_segments(tasks)]
        assert all(0.0 <= e <= 1.0 for e in ent)
    if method == "mtl":
        assert "diag/mtl_mix/a b/head0" in metrics and "diag/lambda_dev/a_b" in metrics
    if method != "lora":
        assert {"diag/head_cos_B/q_proj", "diag/head_cos_BA/down_proj", "diag/head_cos_B/max"} <= set(metrics)
    assert np.array_equal(d.conflict, D.task_interference(model, probe_for(tasks), len(tasks)))


def test_metric_count_does_not_grow_with_depth():
    shallow = D.diagnostics_metrics(adapter_model("rlora", layers=2), probe_for(), TASKS)
    deep = D.diagnostics_metrics(adapter_model("rlora", layers=4), probe_for(), TASKS)
    assert set(shallow) == set(deep) and len(deep) < 60


def test_metric_segment():
    assert D.metric_segment("model.layers.0.q_proj") == "model.layers.0.q_proj"
    assert D.metric_segment("a/b:c") == "a_b_c" and D.metric_segment("..") == "_" and D.metric_segment("") == "_"
    assert D._unique_segments(["a:b", "a_b", "a/b"]) == ["a_b", "a_b_1", "a_b_2"]
