"""DP noise from a CSPRNG (fedgov.privacy.rng): independent fresh generators, DP-SGD rounds the
coordinator cannot regenerate (the seed-search attack of issue 14), distributed-DP shares whose
only randomness is the OS key, the Gaussian law of the fused path's noise, and reproducible
noise refused outside simulation.

Every statistical bound below fails with probability below 1e-6 (stated per test).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import fedgov.node.training as T
from fedgov import protocol as P
from fedgov.node.admission import precheck
from fedgov.config import load_task
from fedgov.config.task import ModelSpec, PrivacySpec, TrainingSpec
from fedgov.models import build_model, get_state
from fedgov.privacy import plan_node_dp
from fedgov.privacy.distributed import discrete_gaussian, encode_share, plan_distributed
from fedgov.privacy.dpsgd import FusedClipper, noised_mean_grad, poisson_indices
from fedgov.privacy.rng import KEY_BYTES, SecureRNG, draw_normal

ROOT = Path(__file__).resolve().parents[2]
ROWS, FEATURES, CLASSES, BATCH = 600, 4, 3, 60
Z = 5.5  # P(|N(0,1)| > 5.5) = 3.8e-8: a handful of such checks per test stay below 1e-6


def _fixed_urandom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key the OS hands out is the same: what is left random is not from the key."""
    monkeypatch.setattr(os, "urandom", lambda n: bytes(range(n % 256))[:n] if n <= 256 else b"\x5a" * n)


# --- (i) fresh generators are independent ------------------------------------------------------


@pytest.mark.statistical
def test_fresh_generators_give_independent_streams() -> None:
    n = 100_000
    a = SecureRNG.fresh().standard_normal(n, np.float64)
    b = SecureRNG.fresh().standard_normal(n, np.float64)
    assert not np.array_equal(a, b)
    # Independent: the sample correlation is ~ N(0, 1/n); 10 sigma fails with probability ~1e-23.
    assert abs(np.corrcoef(a, b)[0, 1]) < 10 / math.sqrt(n)
    # and not shifted copies of one stream either
    assert not np.isin(a[:100], b).any()


def test_seeded_generators_are_reproducible_and_keys_are_256_bits() -> None:
    assert KEY_BYTES == 32
    a, b, c = SecureRNG.from_seed(7), SecureRNG.from_seed(7), SecureRNG.from_seed(8)
    x = a.standard_normal(1000)
    assert np.array_equal(x, b.standard_normal(1000)) and not np.array_equal(x, c.standard_normal(1000))
    assert x.dtype == np.float32
    assert b.standard_normal((2, 3), torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="32 bytes"):
        SecureRNG(b"\x00" * 16)
    assert repr(a) == "SecureRNG(AES-256-CTR)"  # never the key


def test_fresh_keys_come_from_the_os(monkeypatch: pytest.MonkeyPatch) -> None:
    _fixed_urandom(monkeypatch)
    assert np.array_equal(SecureRNG.fresh().uniform(100), SecureRNG.fresh().uniform(100))


# --- (ii) a DP-SGD round without seed cannot be regenerated -----------------------------------


@pytest.fixture(scope="module")
def softmax_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
    y = (X @ rng.normal(size=(FEATURES, CLASSES))).argmax(axis=1).astype(np.int64)
    return X, y


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    training = TrainingSpec(rounds=1, local_epochs=1, batch_size=BATCH, learning_rate=0.5)
    privacy = PrivacySpec(target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0, accountant="rdp")
    plan = plan_node_dp(rows=ROWS, batch_size=BATCH, local_epochs=1, rounds=1, target_epsilon=3.0, delta=1e-5, accountant="rdp", margin=0.98)
    return training, privacy, plan


def _logreg() -> torch.nn.Module:
    return build_model(ModelSpec(name="logreg"), n_features=FEATURES, n_classes=CLASSES, seed=0)


def _noise_fingerprint(state: dict[str, np.ndarray], start: dict[str, np.ndarray]) -> np.ndarray:
    """For a softmax model the gradient of the logits sums to zero over the classes, for every
    example, clipped or not: the per-class sum of the update's weight columns and bias is the
    sum of the noise alone (what the coordinator can compute from one plaintext update)."""
    dw = (state["0.weight"].astype(np.float64) - start["0.weight"]).sum(axis=0)
    db = (state["0.bias"].astype(np.float64) - start["0.bias"]).sum()
    return np.append(dw, db)


def _round(data, setup, seed: int | None = None, mode: str = "fused"):  # type: ignore[no-untyped-def]
    X, y = data
    training, privacy, plan = setup
    model = _logreg()
    start = {k: v.astype(np.float64) for k, v in get_state(model).items()}
    res = T.train_dp_round(
        model, X, y, training=training, privacy=privacy.model_copy(update={"grad_sample_mode": mode}), plan=plan, history=[], seed=seed
    )
    return _noise_fingerprint(res.state, start)


def _round_with_torch_seeds(data, setup, monkeypatch, sample_seed: int, noise_seed: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The round as the old code ran it: torch generators seeded from the OS's 63 bits."""
    monkeypatch.setattr(T, "_dp_sources", lambda seed: (torch.Generator().manual_seed(sample_seed), torch.Generator().manual_seed(noise_seed)))
    try:
        return _round(data, setup, seed=0)
    finally:
        monkeypatch.undo()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=1e-3, atol=1e-7))


def test_the_fingerprint_is_pure_noise_so_the_seed_attack_works_on_torch_generators(softmax_data, setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The attack of issue 14 on the old scheme: torch's CPU generator keeps the low 32 bits of
    a seed, so ``s + 2**32`` (any 63-bit seed) is found by searching ``s`` in ``[0, 2**32)``."""
    victim = _round_with_torch_seeds(softmax_data, setup, monkeypatch, sample_seed=11, noise_seed=1234 + 2**32)
    assert np.abs(victim).max() > 1e-3  # noise of scale lr * sigma * C * sqrt(steps * classes) / B
    # The batches do not matter (the coordinator does not know them): only the noise seed does.
    found = _round_with_torch_seeds(softmax_data, setup, monkeypatch, sample_seed=99, noise_seed=1234)
    assert _same(found, victim)
    assert not _same(_round_with_torch_seeds(softmax_data, setup, monkeypatch, sample_seed=11, noise_seed=1235), victim)


@pytest.fixture(scope="module")
def torch_seed_rounds(softmax_data, setup) -> dict[int, np.ndarray]:
    """The noise fingerprint of the round under each torch seed an attacker would try: ``0..127``
    and ``s, s + 2**32``. Seeded, so computed once for the module."""
    candidates = list(range(128)) + [s + k * 2**32 for s in (17, 2**31 + 5) for k in (0, 1)]
    with pytest.MonkeyPatch.context() as mp:
        return {s: _round_with_torch_seeds(softmax_data, setup, mp, sample_seed=0, noise_seed=s) for s in candidates}


@pytest.mark.statistical
def test_a_round_without_seed_is_not_regenerated_by_any_torch_seed(softmax_data, setup, torch_seed_rounds) -> None:  # type: ignore[no-untyped-def]
    """Same global model, same data, no seed: two rounds differ, and none of the torch seeds
    ``0..127`` nor ``s, s + 2**32`` gives its noise. Matching all 5 fingerprint numbers to 1e-3
    by chance has probability far below 1e-12 per candidate."""
    a = _round(softmax_data, setup)
    b = _round(softmax_data, setup)
    assert not _same(a, b)
    for s, guess in torch_seed_rounds.items():
        assert not _same(guess, a) and not _same(guess, b), s


@pytest.mark.statistical
@pytest.mark.parametrize("mode", ["fused", "hooks", "ghost"])
def test_the_os_key_is_the_rounds_only_randomness(softmax_data, setup, monkeypatch, mode: str) -> None:  # type: ignore[no-untyped-def]
    """Batches and noise of a round without seed, in fedgov's fused path and in Opacus' modes,
    come from the OS key alone: with a fixed key two rounds are equal, with fresh keys they differ.
    (So Opacus' own torch draws, seeded or global, play no part.)"""
    fresh = [_round(softmax_data, setup, mode=mode) for _ in range(2)]
    assert not _same(*fresh)
    _fixed_urandom(monkeypatch)
    torch.manual_seed(1)
    first = _round(softmax_data, setup, mode=mode)
    torch.manual_seed(2)  # the global generator must not matter either
    assert np.array_equal(first, _round(softmax_data, setup, mode=mode))


def test_replaying_opacus_needs_a_seed(softmax_data, setup) -> None:  # type: ignore[no-untyped-def]
    X, y = softmax_data
    training, privacy, plan = setup
    with pytest.raises(Exception, match="needs a seed"):
        T.train_dp_round(_logreg(), X, y, training=training, privacy=privacy, plan=plan, history=[], seed=None, replay_opacus=True)


# --- (iii) distributed DP: the share's randomness is the key --------------------------------------


@pytest.mark.statistical
def test_distributed_shares_come_from_the_csprng(monkeypatch: pytest.MonkeyPatch) -> None:
    p = plan_distributed(dimension=64, clip=1.0, rounds=5, sample_rate=1.0, target_epsilon=2.0, delta=1e-5, accountant="rdp")
    update = np.linspace(-0.05, 0.05, 64)  # fractional in integer units: stochastic rounding draws too
    one = encode_share(update, p, min_contributors=3, contributors=4)
    two = encode_share(update, p, min_contributors=3, contributors=4)
    assert not np.array_equal(one, two)
    _fixed_urandom(monkeypatch)
    assert np.array_equal(encode_share(update, p, min_contributors=3, contributors=4), encode_share(update, p, min_contributors=3, contributors=4))


@pytest.mark.statistical
def test_discrete_gaussian_from_the_csprng_has_its_law() -> None:
    """Mean and variance of 200,000 draws at sigma^2 = 9 (variance exact to 1e-70 there), and the
    rounding and geometric draws it rests on. Each bound is 5.5 standard errors."""
    sigma2, n = 9.0, 200_000
    x = discrete_gaussian(sigma2, n, SecureRNG.fresh())
    assert x.dtype == np.int64
    assert abs(x.mean()) < Z * math.sqrt(sigma2 / n)
    # the variance estimate's sd is sqrt(2 / n) sigma^2 (kurtosis 3; a 6-sigma margin for the excess)
    assert abs(x.var() - sigma2) < 6 * sigma2 * math.sqrt(2 / n)
    g = SecureRNG.fresh().geometric(0.25, n)
    assert g.min() >= 1 and abs(g.mean() - 4.0) < Z * math.sqrt(0.75 / 0.25**2 / n)


# --- (iv) the law of the fused path's noise ----------------------------------------------------


@pytest.mark.statistical
def test_the_fused_paths_noise_is_gaussian_with_the_right_scale() -> None:
    """The noise the fused path adds to an empty batch's (zero) gradient sum, std sigma * C: mean,
    variance, fourth moment and the mass beyond 1, 2 and 3 sd, each within 5.5 standard errors
    (7 checks of 3.8e-8 each: below 1e-6 together)."""
    n, sigma, clip = 1_000_000, 1.3, 0.7
    model = torch.nn.Sequential(torch.nn.Linear(999, 1000))  # 1,000,000 parameters
    clipper = FusedClipper(model)
    step = clipper.step(torch.zeros(0, 999), torch.zeros(0, dtype=torch.int64), clip)
    grads = noised_mean_grad(step, noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=1.0, generator=SecureRNG.fresh())
    assert sum(g.numel() for g in grads) == n and step.flat.dtype == torch.float32
    z = step.flat.double().numpy() / (sigma * clip)
    assert abs(z.mean()) < Z / math.sqrt(n)
    assert abs(z.var() - 1) < Z * math.sqrt(2 / n)
    assert abs(np.mean(z**4) - 3) < Z * math.sqrt(96 / n)
    for k, tail in ((1, 0.31731050786291415), (2, 0.04550026389635842), (3, 0.0026997960632601866)):
        assert abs(np.mean(np.abs(z) > k) - tail) < Z * math.sqrt(tail * (1 - tail) / n)
    # the noise drawn ahead for many steps (fused plain SGD) is the same draw
    ahead = draw_normal((4, 250_000), SecureRNG.fresh())
    assert ahead.dtype == torch.float32 and abs(float(ahead.double().mean())) < Z / math.sqrt(n)


@pytest.mark.statistical
def test_poisson_batches_from_the_csprng_take_each_row_with_probability_q() -> None:
    """10,000 rows at q = 0.1: the batch size is Binomial(10,000, 0.1) (sd 30), and the rows are distinct and in range."""
    idx = poisson_indices(10_000, 0.1, SecureRNG.fresh())
    assert abs(len(idx) - 1000) < Z * 30
    assert len(set(idx.tolist())) == len(idx) and int(idx.min()) >= 0 and int(idx.max()) < 10_000


# --- (v) reproducible noise is for simulations only -----------------------------------------------


def test_a_deployed_node_refuses_reproducible_noise_a_simulated_one_accepts(node_home) -> None:
    task, contract = load_task(ROOT / "configs" / "tasks" / "adult-income.toml")
    home = node_home()
    assert task.privacy.enabled
    reproducible = task.model_copy(update={"privacy": task.privacy.model_copy(update={"reproducible_noise": True})})
    refused = precheck(home, reproducible, contract, node="GM0363")
    assert refused is not None and not refused.accepted
    assert refused.code == P.RefusalCode.REPRODUCIBLE_NOISE.value == "reproducible-noise"
    assert "simulations only" in refused.reason
    assert precheck(home, reproducible, contract, node="GM0363", simulated=True) is None
    assert precheck(home, task, contract, node="GM0363") is None  # fresh noise: accepted when deployed
    no_dp = reproducible.model_copy(update={"privacy": reproducible.privacy.model_copy(update={"enabled": False})})
    other = precheck(home, no_dp, contract, node="GM0363")  # no DP noise to reproduce (refused for its own reason)
    assert other is None or other.code != "reproducible-noise"
