"""Each method's forward equals a naive reference written with explicit loops over heads and samples."""
import pytest
import torch
import torch.nn.functional as F

import rlora
from rlora.layers import LAYERS, AdapterError

D_IN, D_OUT, R, N, TASKS = 12, 20, 4, 3, ["a", "b", "c"]


def make(method, **kw):
    torch.manual_seed(0)
    base = torch.nn.Linear(D_IN, D_OUT)
    cfg = rlora.AdapterConfig(method=method, r=R, num_heads=N, alpha=8, dropout=0.0, tasks=TASKS, **kw)
    layer = LAYERS[method](base, cfg, num_tasks=len(TASKS)).eval()
    with torch.no_grad():  # give every trainable tensor a non-trivial value
        for name, p in layer.named_parameters():
            if name.startswith("base"):
                continue
            p.normal_(0, 0.3)
    return layer


def naive(layer, x, tids=None):
    """h = W0 x + Σ_i (per-method weight of head i) B_i (...) — loops over samples and heads."""
    W0, b0, A, B, s = layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B, layer.scaling
    out = torch.empty(*x.shape[:-1], D_OUT)
    for n in range(x.shape[0]):
        for l in range(x.shape[1]):
            xi = x[n, l]
            h = W0 @ xi + b0
            if layer.method == "lora":
                h = h + s * B[:, 0] @ (A @ xi)
            elif layer.method in ("hydra", "rlora"):
                g = torch.softmax(layer.router @ xi, dim=0)
                for i in range(N):
                    h = h + s * g[i] * (B[:, i] @ (A @ xi))
                if layer.method == "rlora" and layer.use_offset:
                    h = h - s * layer.offset_B @ (layer.offset_A @ xi)
            else:  # mtl
                t = int(tids[n])
                lam = torch.diag(layer.task_lambda[t]) if layer.diagonal else layer.task_lambda[t]
                m = torch.softmax(layer.task_weight[t] / layer.temperature, dim=0)
                Bmix = sum(m[i] * B[:, i] for i in range(N))
                h = h + s * Bmix @ (lam @ (A @ xi))
            out[n, l] = h
    return out


@pytest.mark.parametrize("method,kw", [("lora", {}), ("hydra", {}), ("rlora", {}), ("rlora", {"rslora": True}),
                                       ("mtl", {}), ("mtl", {"diagonal": True})])
def test_forward_equals_naive_reference(method, kw):
    layer = make(method, **kw)
    x = torch.randn(3, 5, D_IN)
    tids = torch.tensor([2, 0, 1])
    with rlora.task_ids(tids):
        got = layer(x)
    ref = naive(layer, x, tids)
    assert (got - ref).abs().max().item() <= 1e-6 * max(1.0, ref.abs().max().item())


def test_scaling_modes():
    cfg = rlora.AdapterConfig(r=16, alpha=32)
    assert cfg.scaling == 2.0
    assert rlora.AdapterConfig(r=16, alpha=32, rslora=True).scaling == 8.0


def test_rlora_init_statistics_and_zero_router():
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 1024)
    cfg = rlora.AdapterConfig(method="rlora", r=8, num_heads=4, gamma=64)
    layer = LAYERS["rlora"](base, cfg)
    scale = 1024 ** 0.25 / 8
    assert layer.lora_A.std().item() == pytest.approx(scale / 256 ** 0.5, rel=0.05)
    assert layer.lora_B.std().item() == pytest.approx(scale / 1024 ** 0.5, rel=0.05)
    assert torch.count_nonzero(layer.router) == 0
    # heads are independent draws: pairwise cosine of flattened heads near 0
    heads = layer.lora_B.permute(1, 0, 2).reshape(4, -1)
    cos = F.cosine_similarity(heads[:, None], heads[None], dim=-1)
    assert cos[~torch.eye(4, dtype=bool)].abs().max() < 0.1
    # the offset cancels the initial update (up to the fp32 rounding of the stored mean head)
    x = torch.randn(7, 256, dtype=torch.float64)
    layer64 = layer.double().eval()
    assert (layer64(x) - layer64.base(x)).abs().max() < 1e-7


def test_rlora_multi_head_dropout_masks_differ_between_heads():
    torch.manual_seed(0)
    cfg = rlora.AdapterConfig(method="rlora", r=8, num_heads=3, dropout=0.5, zero_start_offset=False)
    layer = LAYERS["rlora"](torch.nn.Linear(16, 16), cfg).train()
    x = torch.randn(64, 16)
    u = layer.rank_features(x).reshape(64, 3, 8)       # u_i = s * g_i * drop_i(A x)
    masks = u != 0
    assert not torch.equal(masks[:, 0], masks[:, 1]) and not torch.equal(masks[:, 1], masks[:, 2])
    # each head keeps ~half of the rank activations and rescales them by 1/(1-p)
    z = x @ layer.lora_A.t()
    kept = u[:, 0][masks[:, 0]] / (layer.scaling / 3)
    assert torch.allclose(kept, (z * 2)[masks[:, 0]], atol=1e-5)
    assert 0.35 < masks.float().mean() < 0.65


def _per_head_features(method, p=0.5, tokens=256):
    """(v, z): v [T, N, r] the rank features of each head with gate and scaling divided out, and
    z = A x [T, r] without dropout. Without dropout every head would have v_i = z exactly."""
    torch.manual_seed(0)
    cfg = rlora.AdapterConfig(method=method, r=8, num_heads=3, dropout=p, zero_start_offset=False)
    layer = LAYERS[method](torch.nn.Linear(16, 16), cfg).train()
    x = torch.randn(tokens, 16)
    heads = 1 if method == "lora" else 3
    u = layer.rank_features(x).reshape(tokens, heads, 8)
    gate = torch.ones(tokens, 1) if method == "lora" else layer.gates(x)         # rlora: exactly 1/N
    return u / (layer.scaling * gate).unsqueeze(-1), x @ layer.lora_A.t()


def test_dropout_is_on_x_for_lora_and_rank_space_for_rlora():
    """R-LoRA drops entries of A·x, independently per head: each v_i[t, k] is 0 or z[t, k] / (1 - p).
    LoRA (and HydraLoRA) drop entries of x before A: v = A (m ⊙ x) / (1 - p) mixes kept and dropped
    inputs, so almost no entry is 0 or z / (1 - p), and all heads share the one mask."""
    v, z = _per_head_features("rlora")
    z3 = z.unsqueeze(1).expand_as(v)
    dropped = v == 0
    assert torch.allclose(v[~dropped], 2 * z3[~dropped], rtol=1e-5, atol=1e-6)    # kept: z / (1 - p)
    assert 0.45 < dropped.float().mean() < 0.55
    # independent masks per head: P(kept in head i and in head j) = (1 - p)^2, not 1 - p
    kept = ~dropped
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert abs((kept[:, i] & kept[:, j]).float().mean().item() - 0.25) < 0.04
    # a mask is per rank entry, not per token: within one token, entries of one head differ
    assert (kept.float().mean(-1) % 1 != 0).float().mean() > 0.9

    for method in ("lora", "hydra"):
        v, z = _per_head_features(method)
        z3 = z.unsqueeze(1).expand_as(v)
        rank_space_like = (v.abs() < 1e-6) | torch.isclose(v, 2 * z3, rtol=1e-5, atol=1e-6)
        assert rank_space_like.float().mean() < 0.02, method
        assert torch.allclose(v, v[:, :1].expand_as(v), atol=1e-5), method      # one shared mask on x


def test_mtl_errors():
    layer = make("mtl")
    x = torch.randn(2, 3, D_IN)
    with pytest.raises(AdapterError, match="needs per-sample task ids"):
        layer(x)
    with rlora.task_ids([0, 3]), pytest.raises(AdapterError, match="task id 3 is out of range"):
        layer(x)
    with rlora.task_ids([0, 1, 2]), pytest.raises(AdapterError, match="3 task ids for a batch of 2"):
        layer(x)


def test_only_adapter_parameters_train():
    for method in LAYERS:
        layer = make(method)
        trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
        assert trainable and not any(n.startswith("base.") for n in trainable)
        assert not layer.base.weight.requires_grad


def test_backward_reaches_every_trainable_parameter():
    for method in LAYERS:
        layer = make(method).train()
        with rlora.task_ids([0, 1]):
            layer(torch.randn(2, 4, D_IN)).pow(2).sum().backward()
        for n, p in layer.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, (method, n)


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("shape", [(4, D_IN), (4, 3, D_IN)])
def test_mtl_batch_is_the_first_dimension_for_2d_and_3d_inputs(shape, diagonal):
    """[b, d_in] with b task ids is b one-token samples; [b, L, d_in] is b samples of L tokens."""
    layer = make("mtl", diagonal=diagonal)
    x = torch.randn(*shape)
    tids = torch.tensor([2, 0, 1, 0])
    with rlora.task_ids(tids):
        got = layer(x)
    ref = naive(layer, x if x.dim() == 3 else x[:, None], tids).reshape(*shape[:-1], D_OUT)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-6 * max(1.0, ref.abs().max().item())


def _lora_delta(**kw):
    """(h - W0 x, layer) of a plain LoRA layer with fixed non-zero B, for x [6, D_IN]."""
    torch.manual_seed(0)
    base = torch.nn.Linear(D_IN, D_OUT)
    layer = LAYERS["lora"](base, rlora.AdapterConfig(method="lora", dropout=0.0, **kw)).eval()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return layer(x) - layer.base(x), layer


def test_alpha_r_and_rslora_set_the_update_scale():
    """s = alpha / r (alpha / sqrt(r) with rslora) multiplies B A x; r is the rank of A and B."""
    d8, layer = _lora_delta(r=4, alpha=8)
    d16, _ = _lora_delta(r=4, alpha=16)
    assert layer.lora_A.shape == (4, D_IN) and layer.lora_B.shape == (D_OUT, 1, 4)
    assert d8.abs().max() > 1e-3
    torch.testing.assert_close(d16, 2 * d8)                        # alpha doubles the update
    plain, wide = _lora_delta(r=16, alpha=8)
    assert wide.lora_A.shape == (16, D_IN) and wide.lora_B.shape == (D_OUT, 1, 16)
    rs, _ = _lora_delta(r=16, alpha=8, rslora=True)
    torch.testing.assert_close(rs, 4 * plain)                      # (8 / sqrt(16)) / (8 / 16) = 4


@pytest.mark.parametrize("method", ["hydra", "rlora", "mtl"])
def test_num_heads_sets_the_number_of_b_heads(method):
    for n in (2, 5):
        layer = LAYERS[method](torch.nn.Linear(D_IN, D_OUT),
                               rlora.AdapterConfig(method=method, r=R, num_heads=n, tasks=TASKS), num_tasks=len(TASKS))
        assert layer.num_heads == n and layer.lora_B.shape == (D_OUT, n, R)
        if method == "mtl":
            assert layer.task_weight.shape == (len(TASKS), n)        # per-task mixing over the n heads
        else:
            assert layer.router.shape[0] == n                        # one gate per head
    lora = LAYERS["lora"](torch.nn.Linear(D_IN, D_OUT), rlora.AdapterConfig(method="lora", r=R, num_heads=5))
    assert lora.lora_B.shape == (D_OUT, 1, R)                        # lora ignores num_heads


def test_rlora_gamma_sets_the_init_scale():
    """A, B *= d_out^(1/4) / sqrt(gamma): with the same seed, gamma 4 gives 4x the gamma 64 init."""
    layers = {}
    for gamma in (4.0, 64.0):
        torch.manual_seed(0)
        layers[gamma] = LAYERS["rlora"](torch.nn.Linear(D_IN, D_OUT), rlora.AdapterConfig(method="rlora", r=R,
                                                                                          gamma=gamma))
    torch.testing.assert_close(layers[4.0].lora_A, 4 * layers[64.0].lora_A)
    torch.testing.assert_close(layers[4.0].lora_B, 4 * layers[64.0].lora_B)


def test_zero_start_offset_cancels_the_initial_update_only_when_on():
    x = torch.randn(5, D_IN, dtype=torch.float64)
    for on in (True, False):
        torch.manual_seed(0)
        layer = LAYERS["rlora"](torch.nn.Linear(D_IN, D_OUT), rlora.AdapterConfig(
            method="rlora", r=R, num_heads=N, dropout=0.0, zero_start_offset=on)).double().eval()
        gap = (layer(x) - layer.base(x)).abs().max().item()
        assert hasattr(layer, "offset_A") == on
        assert (gap < 1e-6) if on else (gap > 1e-3), (on, gap)


def test_mtl_temperature_sets_the_head_mixing():
    """m_t = softmax(w_t / tau): a lower temperature sharpens the mixing and changes the output."""
    x, tids = torch.randn(3, 2, D_IN), torch.tensor([0, 1, 2])
    out, mix = {}, {}
    for tau in (0.1, 1.0):
        layer = make("mtl", temperature=tau)                          # same seed: same w, A, B, Lambda
        mix[tau] = layer.mixing()
        torch.testing.assert_close(mix[tau], torch.softmax(layer.task_weight / tau, dim=-1))
        with rlora.task_ids(tids), torch.no_grad():
            out[tau] = layer(x)
    assert (mix[0.1].max(dim=-1).values > mix[1.0].max(dim=-1).values).all()
    assert (out[0.1] - out[1.0]).abs().max() > 1e-3


def test_mtl_diagonal_keeps_lambda_diagonal():
    """diagonal: Lambda_t is a vector [r] (r parameters per task) instead of a full [r, r] matrix."""
    full, diag = make("mtl"), make("mtl", diagonal=True)
    assert full.task_lambda.shape == (len(TASKS), R, R) and diag.task_lambda.shape == (len(TASKS), R)
    lam = diag.lambdas()
    assert torch.equal(lam, torch.diag_embed(diag.task_lambda))
    assert torch.count_nonzero(lam * (1 - torch.eye(R))) == 0     # no off-diagonal entry can exist
