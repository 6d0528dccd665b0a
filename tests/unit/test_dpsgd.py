"""Fused DP-SGD clipping (fedgov.privacy.dpsgd) against per-sample gradients computed one by one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedgov.privacy.dpsgd import FusedClipper, clipped_grad_sum, fused_supported, noised_mean_grad, poisson_batches, poisson_indices


def _brute_force(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, clip: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each example's gradient by its own backward pass, clipped as Opacus clips, summed."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(yb)):
        loss = nn.functional.cross_entropy(model(xb[i : i + 1]), yb[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    return total, torch.stack(norms)


MODELS = {
    "logreg": lambda: nn.Sequential(nn.Linear(6, 3)),
    "mlp-relu": lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
    "tanh-no-bias": lambda: nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 4)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 40), clip=st.floats(0.01, 10.0), seed=st.integers(0, 10_000))
def test_clipped_sum_equals_per_sample_clipping(name: str, batch: int, clip: float, seed: int) -> None:
    torch.manual_seed(seed)
    model = MODELS[name]()
    xb = torch.randn(batch, 6) * 3
    yb = torch.randint(0, model[-1].out_features, (batch,))
    expected, norms = _brute_force(model, xb, yb, clip)
    got = clipped_grad_sum(model, xb, yb, clip)
    torch.testing.assert_close(got.norms, norms, rtol=1e-4, atol=1e-5)
    for g, e in zip(got.grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    for g in got.grads:  # no example contributes more than clip
        assert float(g.norm()) <= batch * clip * (1 + 1e-4)
    losses = nn.functional.cross_entropy(model(xb), yb, reduction="sum")
    assert math.isclose(got.loss_sum, float(losses.detach()), rel_tol=1e-5, abs_tol=1e-5)


def test_a_clipper_is_reused_and_an_empty_batch_gives_zero() -> None:
    torch.manual_seed(0)
    model = MODELS["mlp-relu"]()
    clipper = FusedClipper(model)
    x1, y1 = torch.randn(7, 6), torch.randint(0, 2, (7,))
    x2, y2 = torch.randn(5, 6), torch.randint(0, 2, (5,))
    first = [g.clone() for g in clipper.step(x1, y1, 1.0).grads]
    second = clipper.step(x2, y2, 1.0, input_sq_norms=(x2 * x2).sum(1))
    for g, e in zip(second.grads, _brute_force(model, x2, y2, 1.0)[0], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(first, second.grads, strict=True))
    empty = clipper.step(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), 1.0)
    assert all(float(g.abs().sum()) == 0 for g in empty.grads) and empty.loss_sum == 0


def test_noise_has_the_dp_sgd_scale() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 50))
    clipper = FusedClipper(model)
    step = clipper.step(torch.zeros(0, 200), torch.zeros(0, dtype=torch.long), 1.0)  # zero clipped sum
    sigma, clip, expected = 1.3, 0.7, 40.0
    grads = noised_mean_grad(
        step, noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=expected, generator=torch.Generator().manual_seed(1)
    )
    flat = torch.cat([g.reshape(-1) for g in grads]).double()
    n = flat.numel()  # 10,050 draws: the sample std is within 3% of the target with overwhelming probability
    assert abs(float(flat.mean())) < 4 * sigma * clip / expected / math.sqrt(n)
    assert float(flat.std()) == pytest.approx(sigma * clip / expected, rel=0.03)
    # noise drawn ahead (standard normal) is scaled the same way
    z = torch.randn(step.flat.numel(), generator=torch.Generator().manual_seed(2))
    step = clipper.step(torch.zeros(0, 200), torch.zeros(0, dtype=torch.long), 1.0)
    ahead = noised_mean_grad(step, noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=expected, generator=None, standard_normal=z)
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in ahead]), z * sigma * clip / expected)


def test_fused_supported() -> None:
    assert fused_supported(MODELS["logreg"]()) and fused_supported(MODELS["tanh-no-bias"]())
    assert not fused_supported(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    assert not fused_supported(nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 2)))  # a parameter
    assert not fused_supported(nn.Linear(4, 2))  # not a Sequential
    assert not fused_supported(nn.Sequential(nn.ReLU()))  # no Linear layer
    frozen = MODELS["logreg"]()
    frozen[0].weight.requires_grad_(False)
    assert not fused_supported(frozen)
    with pytest.raises(ValueError, match="Sequential"):
        FusedClipper(nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Linear(4, 2)))


@pytest.mark.parametrize("together", [False, True])
@pytest.mark.parametrize("rows,rate", [(1000, 0.05), (50, 0.5), (20_000, 1 / 128)])
def test_poisson_batches_have_the_bernoulli_law(rows: int, rate: float, together: bool) -> None:
    """Each row in each batch independently with probability ``rate``: per-row frequency and the
    batch size's mean and variance match Binomial(rows, rate); one batch at a time
    (``poisson_indices``) or an epoch's batches drawn together (``poisson_batches``)."""
    g = torch.Generator().manual_seed(3)
    draws = 3000
    hits = torch.zeros(rows)
    sizes = []
    batches = iter(poisson_batches(rows, rate, draws, g)) if together else None
    for _ in range(draws):
        idx = next(batches) if batches is not None else poisson_indices(rows, rate, g)
        assert idx.dtype == torch.long
        assert len(idx) == 0 or (int(idx.min()) >= 0 and int(idx.max()) < rows)
        assert len(torch.unique(idx)) == len(idx)
        hits[idx] += 1
        sizes.append(len(idx))
    mean, var = rows * rate, rows * rate * (1 - rate)
    assert np.mean(sizes) == pytest.approx(mean, abs=5 * math.sqrt(var / draws))
    assert np.var(sizes) == pytest.approx(var, rel=0.15)
    freq = hits / draws  # every row equally likely, the first and the last included
    sd = math.sqrt(rate * (1 - rate) / draws)
    assert float((freq - rate).abs().max()) < 6 * sd
    assert abs(float(freq[: max(1, rows // 10)].mean() - freq[-max(1, rows // 10) :].mean())) < 6 * sd
    with pytest.raises(ValueError):
        poisson_indices(10, 1.0, g)
