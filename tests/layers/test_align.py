"""Align-LoRA: the layer is plain LoRA in the forward; the alignment term (rlora.alignment) is the symmetric
KL of the tasks' Gaussian fits, with the gradient autograd computes checked against finite differences."""
import math

import pytest
import torch
from torch import nn

import rlora
from rlora.alignment import (AlignmentRecorder, gaussian_fit, layer_alignment, record_alignment, symmetric_kl)
from rlora.layers import AlignLoRALinear, LoRALinear


def test_symmetric_kl_is_the_mean_of_both_directions_of_the_gaussians_kl():
    """Against torch.distributions (an independent formula with the log terms): D = ½ (KL(p‖q) + KL(q‖p)),
    summed over the components, with ε added to both variances."""
    from torch.distributions import Normal, kl_divergence

    g = torch.Generator().manual_seed(0)
    mu_p, mu_q = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    var_p = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    var_q = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    eps = 1e-3
    p, q = Normal(mu_p, (var_p + eps).sqrt()), Normal(mu_q, (var_q + eps).sqrt())
    want = 0.5 * (kl_divergence(p, q) + kl_divergence(q, p)).sum()
    got = symmetric_kl(mu_p, var_p, mu_q, var_q, eps=eps)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    # a hand value: N(0, 1) and N(1, 4) in one dimension, ε = 0: ¼ (1/4 + 4 − 2 + 1 · (1 + 1/4)) = 0.875
    one = symmetric_kl(torch.zeros(1), torch.ones(1), torch.ones(1), torch.full((1,), 4.0), eps=0.0)
    assert one.item() == pytest.approx(0.875, rel=1e-6)
    assert symmetric_kl(mu_p, var_p, mu_p, var_p).item() == 0.0


def test_layer_term_pairs_the_tasks_present_and_uses_the_memory_only_for_a_lone_task():
    z = torch.tensor([[0.0, 1.0], [2.0, 3.0], [1.0, 1.0], [5.0, -1.0], [4.0, 0.0], [9.0, 9.0], [3.0, 2.0]],
                     dtype=torch.float64)
    tasks = torch.tensor([0, 0, 0, 1, 1, 2, 1])            # task 2 has one token: no fit, left out
    term, fits = layer_alignment(z, tasks)
    assert sorted(fits) == [0, 1]
    mu0, var0 = z[:3].mean(0), z[:3].var(0)                 # unbiased
    mu1, var1 = z[[3, 4, 6]].mean(0), z[[3, 4, 6]].var(0)
    assert torch.equal(fits[0][0], mu0) and torch.allclose(fits[0][1], var0)
    assert var0.tolist() == pytest.approx([1.0, 4.0 / 3.0])
    assert term.item() == pytest.approx(symmetric_kl(mu0, var0, mu1, var1).item(), rel=1e-12)
    zg = z.clone().requires_grad_(True)                      # the one-token task gets no gradient, and no NaN
    layer_alignment(zg, tasks)[0].backward()
    assert torch.isfinite(zg.grad).all() and zg.grad[5].abs().sum() == 0 and zg.grad[:5].abs().sum() > 0

    # three tasks: the mean over the three pairs
    tasks3 = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    term3, f3 = layer_alignment(z, tasks3)
    pairs = [symmetric_kl(*f3[a], *f3[b]) for a, b in ((0, 1), (0, 2), (1, 2))]
    assert term3.item() == pytest.approx(torch.stack(pairs).mean().item(), rel=1e-12)

    # one task: no pair without memory (None, the loop adds 0), else the pairs with the other remembered tasks
    lone = torch.zeros(7, dtype=torch.long)
    assert layer_alignment(z, lone)[0] is None
    memory = {0: (torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)),
              1: (mu1, var1), 2: (mu0 + 1, var0 * 2)}
    term_m, f_m = layer_alignment(z, lone, memory)
    mu, var = gaussian_fit(z)
    want = (symmetric_kl(mu, var, mu1, var1) + symmetric_kl(mu, var, mu0 + 1, var0 * 2)) / 2   # not task 0 itself
    assert term_m.item() == pytest.approx(want.item(), rel=1e-12) and list(f_m) == [0]
    # with two tasks present the memory is not used
    assert layer_alignment(z, tasks, memory)[0].item() == term.item()


def _layer(dropout=0.0, r=3, d_in=5, d_out=4, alpha=6.0, cls=AlignLoRALinear):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).double()
    cfg = rlora.AdapterConfig(method="align" if cls is AlignLoRALinear else "lora", r=r, alpha=alpha, dropout=dropout)
    layer = cls(base, cfg).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer.train()


class _Root(nn.Module):
    """The minimal model record_alignment expects: one Align-LoRA layer and the adapter config."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.rlora_config = rlora.AdapterConfig(method="align")


@pytest.mark.parametrize("lone_task", [False, True])
def test_alignment_gradient_matches_finite_differences(lone_task):
    """float64, tiny sizes, input dropout on (the same mask in every evaluation: the seed is fixed inside the
    function), left padding in the mask: torch.autograd.gradcheck compares autograd's gradient of the term
    with respect to A and x with central differences. With a lone task the pairs are with a remembered
    task's fit, which is constant (no gradient flows into it)."""
    layer = _layer(dropout=0.3)
    root = _Root(layer)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    ids = torch.tensor([0, 0, 0]) if lone_task else torch.tensor([0, 1, 0])
    memory = {1: (torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64), torch.tensor([0.5, 1.5, 0.7], dtype=torch.float64))}

    def term(A, x):
        layer.align_memory = dict(memory)
        torch.manual_seed(1)
        with record_alignment(root, mask, ids) as rec:
            torch.func.functional_call(layer, {"lora_A": A}, (x,))
        return rec.loss()

    A = layer.lora_A.detach().clone().requires_grad_(True)
    value = term(A, x)
    assert value.item() > 0.01 and math.isfinite(value.item())
    assert torch.autograd.gradcheck(term, (A, x), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_the_fit_uses_the_real_tokens_only_and_features_divided_by_the_scaling():
    """Padding positions (mask 0) are left out whatever their values; the features are A drop(x) (u / s)."""
    layer = _layer()
    root = _Root(layer)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    ids = torch.tensor([0, 1])
    with record_alignment(root, mask, ids) as rec:
        layer(x)
    x2 = x.clone()
    x2[0, 0], x2[1, :2] = 100.0, -50.0                     # padding changed
    with record_alignment(root, mask, ids) as rec2:
        layer(x2)
    assert rec.loss().item() == rec2.loss().item()
    z = x @ layer.lora_A.detach().t()                       # [2, 4, r], unscaled
    want = symmetric_kl(*gaussian_fit(z[0, 1:]), *gaussian_fit(z[1, 2:]))
    assert rec.loss().item() == pytest.approx(want.item(), rel=1e-12)


def test_align_is_plain_lora_in_the_forward():
    """Same seed: the same parameters as LoRA; same weights: identical outputs (dropout on, same RNG; and in
    eval), with or without the recorder open, and the same merged update. The loss is the only difference."""
    align, lora = _layer(dropout=0.2), _layer(dropout=0.2, cls=LoRALinear)
    assert align.state_dict().keys() == lora.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(align.state_dict().values(), lora.state_dict().values()))
    root = _Root(align)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    for train in (True, False):
        align.train(train), lora.train(train), root.train(train)
        torch.manual_seed(3)
        with record_alignment(root, torch.ones(2, 4), torch.tensor([0, 1])) as rec:
            out_a = align(x)
        torch.manual_seed(3)
        out_l = lora(x)
        assert torch.equal(out_a, out_l), train
        assert (rec is not None) == train                   # recorded in training only
    assert torch.equal(align.delta_weight(), lora.delta_weight())


def test_the_recorder_opens_only_for_align_models_in_training_with_gradients():
    layer = _layer()
    root = _Root(layer)
    ids, mask = torch.tensor([0, 1]), torch.ones(2, 4)
    with record_alignment(root, mask, ids) as rec:
        assert rec is not None
    with torch.no_grad(), record_alignment(root, mask, ids) as rec:
        assert rec is None
    root.rlora_config = rlora.AdapterConfig(method="lora")
    with record_alignment(root, mask, ids) as rec:
        assert rec is None


def test_features_that_do_not_fit_the_batch_are_refused():
    layer = _layer()
    rec = AlignmentRecorder(torch.ones(2, 4), torch.tensor([0, 1, 1]))   # 3 ids for 2 samples
    rec.add(layer, torch.randn(8, 3, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match="pass one task id per sample"):
        rec.loss()


def test_reentrant_checkpointing_is_refused_rather_than_dropping_the_gradient():
    """Re-entrant checkpointing runs the forward without autograd: the features carry no gradient, and the
    loss says so instead of silently training plain LoRA."""
    layer = _layer()
    rec = AlignmentRecorder(torch.ones(2, 4), torch.tensor([0, 1]))
    with torch.no_grad():
        u = layer.rank_features(torch.randn(8, 5, dtype=torch.float64))
    rec.add(layer, u)
    with pytest.raises(RuntimeError, match="non-re-entrant"):
        rec.loss()
