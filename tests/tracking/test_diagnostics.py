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
from rlora.tracking.interference import PER_TASK_PARAMETERS, shared_adapter_params
from rlora.tracking.metric_names import flatten, unique_segments
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
# learned and effective head updates
# ------------------------------------------------------------------------------------------------
def naive_update_cosines(layer, kind):
    """[N, N] cosines of the full d_out x d_in per-head matrices, formed explicitly in float64."""
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    N = B.shape[1]
    if kind == "learned":
        mats = [(B[:, i] - layer.initial_B[:, i].double()) @ A for i in range(N)]
    else:
        mats = [B[:, i] @ A - layer.offset_B.double() @ layer.offset_A.double() for i in range(N)]
    flat = torch.stack([m.reshape(-1) for m in mats])
    n = flat.norm(dim=1)
    return ((flat @ flat.t()) / torch.outer(n, n)).numpy()


def test_fresh_rlora_has_no_learned_update_but_nonzero_raw_similarity():
    model = adapter_model("rlora", heads=3, r=4, hidden=128)
    raw = D.head_similarity(model)
    upd = D.update_similarity(model)
    assert set(upd) == set(raw)
    assert any(abs(s["B_cos"]) > 1e-3 for s in raw.values())                # random heads: not exactly 0
    assert all(s["learned_cos"] == 0.0 for s in upd.values())               # B_i = B_i⁰: no learned update
    for m in D.head_similarity_matrices(model, "learned").values():
        assert np.array_equal(m, np.zeros((3, 3)))                            # zero updates, zero diagonal
    for name, layer in rlora.adapter_layers(model):                         # (B_i⁰ − B̄⁰) A⁰ sum to zero
        assert upd[name]["effective_cos"] == pytest.approx(-0.5, abs=0.25)
    metrics = D.run_diagnostics(model, None, TASKS).metrics()
    assert metrics["diag/head_cos_learned/mean"] == 0.0 and metrics["diag/head_cos_learned/max"] == 0.0
    assert metrics["diag/head_cos_B/max"] != 0.0 and "diag/head_cos_effective/q_proj" in metrics


def test_same_learned_delta_on_every_rlora_head_gives_learned_similarity_one():
    model = adapter_model("rlora")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, layer in rlora.adapter_layers(model):
            delta = torch.randn(layer.d_out, layer.r, generator=g) * layer.initial_B.std()   # as large as B⁰
            layer.lora_B.copy_(layer.initial_B + delta[:, None, :])            # B_i = B_i⁰ + δ for all i
    upd, raw = D.update_similarity(model), D.head_similarity(model)
    for name in upd:
        assert upd[name]["learned_cos"] == pytest.approx(1.0, abs=1e-12)
        assert abs(raw[name]["B_cos"]) < 0.9                                  # the raw heads still differ
    for m in D.head_similarity_matrices(model, "learned").values():
        assert np.allclose(m, np.ones((3, 3)), atol=1e-12)


def test_learned_and_effective_cosines_equal_the_full_matrices():
    model = randomise(adapter_model("rlora", heads=3, r=4), std=0.1)
    learned = D.head_similarity_matrices(model, "learned")
    effective = D.head_similarity_matrices(model, "effective")
    for name, layer in rlora.adapter_layers(model):
        assert np.allclose(learned[name], naive_update_cosines(layer, "learned"), atol=1e-10)
        assert np.allclose(effective[name], naive_update_cosines(layer, "effective"), atol=1e-10)


@pytest.mark.parametrize("method", ["hydra", "mtl"])
def test_zero_initialised_methods_learned_and_effective_equal_raw_BA(method):
    model = randomise(adapter_model(method), std=0.1)
    ba = D.head_similarity_matrices(model, "BA")
    for kind in ("learned", "effective"):
        mats = D.head_similarity_matrices(model, kind)
        assert set(mats) == set(ba) and all(np.array_equal(mats[k], ba[k]) for k in ba)
    sim, upd = D.head_similarity(model), D.update_similarity(model)
    assert all(upd[k] == {"learned_cos": sim[k]["BA_cos"], "effective_cos": sim[k]["BA_cos"]} for k in sim)


def test_learned_similarity_left_out_when_the_initial_heads_are_unknown(tmp_path):
    from helpers import tiny_llama

    model = randomise(adapter_model("rlora"), std=0.1)
    rlora.save_adapter(model, tmp_path / "a")
    same = rlora.load_adapter(tiny_llama(hidden=64, layers=2), tmp_path / "a")   # same seed: same B_i⁰ drawn
    assert D.update_similarity(same) == D.update_similarity(model)
    base = tiny_llama(hidden=64, layers=2)
    torch.manual_seed(123)                                                        # another random init
    loaded = rlora.load_adapter(base, tmp_path / "a")
    upd = D.update_similarity(loaded)
    assert upd and all("learned_cos" not in s and "effective_cos" in s for s in upd.values())
    assert D.head_similarity_matrices(loaded, "learned") == {}
    metrics = D.run_diagnostics(loaded, None, TASKS).metrics()
    assert not any(k.startswith("diag/head_cos_learned/") for k in metrics)
    assert metrics["diag/head_cos_effective/mean"] == pytest.approx(
        D.run_diagnostics(model, None, TASKS).metrics()["diag/head_cos_effective/mean"], abs=1e-9)


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
    assert all("route" not in l.__dict__ for _, l in rlora.adapter_layers(model))
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
    assert all("route" not in l.__dict__ for _, l in rlora.adapter_layers(model))
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
def naive_interference(model, probe, num_tasks, shared_only=True):
    """One backward per task into .grad, cosines in numpy float64 (over the shared parameters, or all)."""
    model.eval()
    params = [p for _, l in rlora.adapter_layers(model) for n, p in l.named_parameters()
              if p.requires_grad and not (shared_only and n in PER_TASK_PARAMETERS)]
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


@pytest.mark.parametrize("diagonal", [False, True])
def test_mtl_interference_uses_shared_parameters_only(diagonal):
    model = randomise(adapter_model("mtl", diagonal=diagonal), std=0.1)
    shared = shared_adapter_params(model)
    private = [p for _, l in rlora.adapter_layers(model) for n, p in l.named_parameters() if n in PER_TASK_PARAMETERS]
    assert len(private) == 2 * 6 and not any(p is q for p in shared for q in private)   # Λ_t and w_t, 6 layers
    assert all(p.requires_grad for p in private)
    probe = probe_for()
    got = D.task_interference(model, probe, 3)
    assert np.abs(got - naive_interference(model, probe, 3)).max() < 1e-6
    everything = naive_interference(model, probe, 3, shared_only=False)        # Λ/w included: the old figure
    assert np.abs(got - everything).max() > 1e-4


def test_interference_zero_gradient_and_absent_tasks():
    model = randomise(adapter_model("rlora"), std=0.1)
    rows = synthetic_rows(["alpha", "beta"])
    silent = [{"input_ids": r["input_ids"], "labels": [-100] * len(r["input_ids"])} for r in rows["beta"]]
    probe = {"alpha": left_padded_batch(rows["alpha"], 0, [0, 0]), "beta": left_padded_batch(silent, 0, [1, 1])}
    c = D.task_interference(model, probe, 3)
    assert c[0, 0] == 1.0
    assert c[1, 0] == 0.0 and c[0, 1] == 0.0 and c[1, 1] == 0.0              # zero gradient: zero row/column
    assert np.isnan(c[2]).all() and np.isnan(c[:, 2]).all()                  # gamma not probed
    metrics = flatten(D.Diagnostics(task_names=TASKS, interference=c))
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
    assert np.allclose(D.interference_summary(partial), [c[0, 1], c[0, 1], c[0, 1]])  # unknown: mean of known
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
    with pytest.raises(D.DiagnosticsError, match="no trainable shared adapter parameter"):
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
        assert name.startswith(("diag/", "train/diagnostics_seconds")) and math.isfinite(value) \
            and isinstance(value, float)
    assert "diag/eff_rank/mean" in metrics and "diag/interference/mean" in metrics
    assert len([k for k in metrics if k.startswith("diag/interference/") and "__" in k]) == 10
    if method in ("hydra", "rlora"):
        assert "diag/router_usage/bool_q_head2" in metrics and "diag/router_entropy/_" in metrics
        assert np.allclose(d.router["usage"], D.router_usage(model, probe_for(tasks))["usage"], atol=1e-6)
        ent = [metrics[f"diag/router_entropy/{s}"] for s in unique_segments(tasks)]
        assert all(0.0 <= e <= 1.0 for e in ent)
    if method == "mtl":
        assert "diag/mtl_mix/a b_head0" in metrics and "diag/lambda_dev/a_b" in metrics
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
    assert unique_segments(["a:b", "a_b", "a/b"]) == ["a_b", "a_b_1", "a_b_2"]
