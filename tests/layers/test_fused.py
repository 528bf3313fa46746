"""The adapters' fused autograd functions equal the plain autograd formulas they replace: gradcheck in
float64, forward/backward equality with the same dropout mask, the layers in training mode against a
reference written with plain ops, and dtypes under bf16 autocast."""
import copy

import pytest
import torch

import rlora
from rlora.layers import LAYERS
from rlora.layers.dropout import keep_mask
from rlora.layers.fused import (DroppedDownProjection, RoutedDroppedDownProjection, down_project,
                                routed_down_project)


def mask(shape, p=0.3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) >= p).to(dtype)


def test_dropped_down_projection_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    m = mask((7, 5))
    assert torch.autograd.gradcheck(lambda x, A: DroppedDownProjection.apply(x, A, m, 1.7), (x, A))


def test_routed_dropped_down_projection_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    R = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    m = mask((6, 5), seed=1)
    assert torch.autograd.gradcheck(lambda x, A, R: RoutedDroppedDownProjection.apply(x, A, R, m, 0.9), (x, A, R))


def plain_and_fused_grads(fn_fused, fn_plain, *shapes):
    torch.manual_seed(2)
    leaves = [torch.randn(*s, requires_grad=True) for s in shapes]
    outs = []
    for fn in (fn_fused, fn_plain):
        ins = [t.detach().clone().requires_grad_(True) for t in leaves]
        y = fn(*ins)
        y = torch.cat([t.reshape(-1) for t in y]) if isinstance(y, tuple) else y.reshape(-1)
        w = torch.linspace(-1, 1, y.numel())
        (y * w).sum().backward()
        outs.append((y.detach(), [t.grad for t in ins]))
    return outs


def test_dropped_down_projection_equals_plain_autograd():
    m = mask((64, 40), p=0.1, dtype=torch.float32)
    c = 2.0 / 0.9
    (y1, g1), (y2, g2) = plain_and_fused_grads(lambda x, A: DroppedDownProjection.apply(x, A, m, c),
                                               lambda x, A: (x * m) @ A.t() * c, (64, 40), (8, 40))
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_routed_projection_equals_plain_autograd():
    m = mask((64, 40), p=0.1, dtype=torch.float32)
    c = 1.0 / 0.9
    (y1, g1), (y2, g2) = plain_and_fused_grads(
        lambda x, A, R: RoutedDroppedDownProjection.apply(x, A, R, m, c),
        lambda x, A, R: ((x * m) @ A.t() * c, x @ R.t()), (64, 40), (8, 40), (3, 40))
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_down_project_draws_the_seeded_mask_and_moves_the_scale_to_rank_space():
    x, A = torch.randn(33, 24), torch.randn(4, 24)
    torch.manual_seed(5)
    z = down_project(x, A, 0.2, True, scale=3.0)
    torch.manual_seed(5)
    m, inv_keep = keep_mask(x.shape, 0.2, x.dtype, x.device)
    torch.testing.assert_close(z, (x * m * inv_keep) @ A.t() * 3.0, rtol=1e-5, atol=1e-6)
    # off in eval or with p = 0: the plain product
    torch.testing.assert_close(down_project(x, A, 0.2, False, 3.0), x @ A.t() * 3.0)
    torch.testing.assert_close(down_project(x, A, 0.0, True, 3.0), x @ A.t() * 3.0)


def reference(layer, x, m, inv_keep):
    """h = W0 x + u B_catᵀ with u written with plain ops and the given input-dropout mask."""
    s, A, B = layer.scaling, layer.lora_A, layer.lora_B
    z = (x * m * inv_keep) @ A.t()
    if layer.method == "lora":
        u = z * s
    else:  # hydra
        g = torch.softmax(x @ layer.router.t(), dim=-1)
        u = ((g * s).unsqueeze(-1) * z.unsqueeze(-2)).reshape(x.shape[0], -1)
    return layer.base(x) + u @ B.reshape(B.shape[0], -1).t()


@pytest.mark.parametrize("method", ["lora", "hydra"])
def test_layers_in_training_equal_the_plain_formula(method):
    torch.manual_seed(0)
    cfg = rlora.AdapterConfig(method=method, r=4, num_heads=3, dropout=0.25, tasks=["a"])
    layer = LAYERS[method](torch.nn.Linear(24, 16), cfg).train()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    ref_layer = copy.deepcopy(layer)
    x = torch.randn(40, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.manual_seed(9)
    y = layer(x)
    torch.manual_seed(9)
    m, inv_keep = keep_mask(x.shape, 0.25, x.dtype, x.device)
    y_ref = reference(ref_layer, x_ref, m, inv_keep)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for (n, p), (_, q) in zip(layer.named_parameters(), ref_layer.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=n)


def test_rlora_shared_router_matmul_equals_separate_router():
    """R-LoRA in fp32 takes the router's logits from the down-projection's matmul: the same output and
    gradients as a separate fp32 router matmul (as under autocast), with the same rank-space masks."""
    torch.manual_seed(0)
    cfg = rlora.AdapterConfig(method="rlora", r=4, num_heads=3, dropout=0.25)
    layer = LAYERS["rlora"](torch.nn.Linear(24, 16), cfg).train()
    with torch.no_grad():
        layer.router.normal_(0, 0.5)
    ref = copy.deepcopy(layer)
    x = torch.randn(40, 24)
    torch.manual_seed(3)
    u = layer.rank_features(x)
    torch.manual_seed(3)
    T, N, r = 40, 3, 4
    zz = x @ torch.cat([ref.lora_A, ref.offset_A]).t()
    g = torch.softmax(x @ ref.router.t(), dim=-1)
    z_heads = torch.nn.functional.dropout(zz[:, :r].unsqueeze(1).expand(T, N, r), 0.25, True)
    u_ref = torch.cat([((g * ref.scaling).unsqueeze(-1) * z_heads).reshape(T, N * r), zz[:, r:] * -ref.scaling], 1)
    torch.testing.assert_close(u, u_ref, rtol=1e-5, atol=1e-6)
    u.pow(2).sum().backward()
    u_ref.pow(2).sum().backward()
    for name in ("lora_A", "router"):
        torch.testing.assert_close(getattr(layer, name).grad, getattr(ref, name).grad, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_keeps_dtypes_and_values():
    torch.manual_seed(0)
    x = torch.randn(32, 48, requires_grad=True)
    A = torch.randn(8, 48, requires_grad=True)
    R = torch.randn(3, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(4)
        z, logits = routed_down_project(x, A, R, 0.1, True)
        as_gates = x.float() @ R.float().t()  # how HydraLoRALinear.gates forms the logits
    assert z.dtype == torch.bfloat16 and logits.dtype == as_gates.dtype
    torch.testing.assert_close(logits, as_gates)
    (z.float().sum() + logits.sum()).backward()
    assert x.grad.dtype == torch.float32 and A.grad.dtype == torch.float32 and R.grad.dtype == torch.float32
    torch.manual_seed(4)
    m, inv_keep = keep_mask(x.shape, 0.1, torch.bfloat16, x.device)
    torch.testing.assert_close(z.float(), (x * m.float() * inv_keep) @ A.t(), rtol=3e-2, atol=5e-2)
