"""The adapters' input dropout: keep rate, exact expectation, independence, reproducibility, gradient."""
import math

import pytest
import torch

from rlora.layers.dropout import dropout, keep_mask

N = 1 << 20


def keep_rate_bounds(p_keep: float, n: int, sigmas: float = 5.0) -> tuple[float, float]:
    sd = math.sqrt(p_keep * (1 - p_keep) / n)
    return p_keep - sigmas * sd, p_keep + sigmas * sd


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_rate_and_scale(p):
    torch.manual_seed(0)
    mask, scale = keep_mask(torch.Size([N]), p, torch.float32, torch.device("cpu"))
    k = round(p * 2 ** 15)
    p_keep = 1 - k / 2 ** 15
    assert abs(k / 2 ** 15 - p) <= 2 ** -16
    assert scale == pytest.approx(1 / p_keep, rel=1e-12)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    lo, hi = keep_rate_bounds(p_keep, N)
    assert lo <= mask.mean().item() <= hi
    # the four 16-bit slices of each 64-bit draw (the top one has only 15 random bits) keep alike
    for j in range(4):
        lo, hi = keep_rate_bounds(p_keep, N // 4)
        assert lo <= mask[j::4].mean().item() <= hi, j


def test_neighbours_are_independent():
    torch.manual_seed(1)
    mask, _ = keep_mask(torch.Size([N]), 0.5, torch.float64, torch.device("cpu"))
    c = mask - mask.mean()
    for lag in (1, 2, 3, 4, 5):
        corr = (c[:-lag] * c[lag:]).mean() / c.var()
        assert abs(corr.item()) < 5 / math.sqrt(N), lag


def test_expectation_is_exact_and_values_are_scaled_input():
    torch.manual_seed(2)
    x = torch.randn(512, 2048)
    y = dropout(x, 0.05, True)
    scale = 2 ** 15 / (2 ** 15 - round(0.05 * 2 ** 15))
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] * scale, rtol=1e-6, atol=0)
    ones = dropout(torch.ones(N), 0.05, True)
    sd = scale * math.sqrt(0.05 * 0.95 / N)
    assert abs(ones.mean().item() - 1) < 5 * sd


def test_identity_when_off_and_reproducible_by_seed():
    x = torch.randn(64, 32)
    assert dropout(x, 0.05, False) is x
    assert dropout(x, 0.0, True) is x
    torch.manual_seed(3)
    a = dropout(x, 0.2, True)
    torch.manual_seed(3)
    b = dropout(x, 0.2, True)
    assert torch.equal(a, b)
    assert not torch.equal(a, dropout(x, 0.2, True))


def test_gradient_is_the_scaled_mask():
    torch.manual_seed(4)
    x = torch.randn(300, 77, requires_grad=True)
    y = dropout(x, 0.3, True)
    y.sum().backward()
    scale = 2 ** 15 / (2 ** 15 - round(0.3 * 2 ** 15))
    torch.testing.assert_close(x.grad, (y != 0).float() * scale, rtol=1e-6, atol=0)


def test_bf16_input_keeps_its_dtype():
    x = torch.randn(16, 40, dtype=torch.bfloat16)
    assert dropout(x, 0.1, True).dtype == torch.bfloat16
