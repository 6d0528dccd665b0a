"""Client-level DP with distributed noise: DP-FedAvg over secure aggregation.

Each municipality's *whole* update is the unit of privacy (McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models", arXiv:1710.06963): a node clips its model
update to L2 norm ``clip``, and the noise is added once, to the sum, instead of at every node.
Noise at the sum is what lets 342 small nodes learn together: with local DP-SGD each small
node's own noise drowns its signal.

No one adds the whole noise: each node adds a *share* of it, and the shares are summed under
secure aggregation (:mod:`fedgov.privacy.secagg`), so the coordinator sees the noisy sum only. The
mechanism is the distributed discrete Gaussian of Kairouz, Liu and Steinke 2021
("The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
Aggregation", arXiv:2102.06387), which TensorFlow Federated's ``DistributedDpSumFactory``
implements:

1. clip the update ``x`` to ``|x| <= clip``;
2. scale it to integers: ``x / scale``, rounded stochastically (unbiased); each coordinate's
   rounding error is below 1, so the integer vector's norm is at most
   ``sensitivity = clip / scale + sqrt(d)`` (a deterministic bound: no conditional rounding);
3. add discrete Gaussian noise ``N_Z(0, sigma_node^2)`` to every coordinate, with
   ``sigma_node^2 = (z * sensitivity)^2 / min_contributors``: the shares of at least
   ``min_contributors`` nodes sum to a variance of at least ``(z * sensitivity)^2``;
4. reduce modulo ``2^32`` and mask (secure aggregation); the coordinator unmasks the sum,
   maps it back to signed integers, multiplies by ``scale`` and divides by the number of
   contributors (every node's weight is equal: the accounting needs bounded weights).

**Dropouts.** The shares are over-provisioned: ``min_contributors`` is the number of nodes
asked minus the dropouts the task allows (``privacy.dropout_tolerance``). When fewer nodes
than that contribute, the noise in the sum is below its target: the coordinator discards the
round (the global model does not move) and releases nothing.

**Accounting.** The sum of ``n`` discrete Gaussians is not exactly a discrete Gaussian;
Kairouz et al.'s Theorem 1 bounds the Renyi divergence of the sum mechanism by
``alpha * Delta^2 / (2 n sigma^2) + tau * d`` with
``tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))``: a Gaussian mechanism of noise
multiplier ``z`` plus ``tau * d``. fedgov refuses a round whose ``tau * d`` exceeds
``TAU_LIMIT`` (1e-9; for realistic shapes it is below 1e-300), and composes the rounds with
Opacus' accountant (PRV or RDP) as entries ``(z, q, 1)``: ``q`` the client sampling rate
(Poisson sampling of the municipalities each round; 1 when every node takes part). Amplification
by sampling is applied as for the continuous Gaussian, as TensorFlow Federated does.

The guarantee is per municipality: neighbouring inputs differ in one municipality's whole
data (its update replaced by zero). It bounds what anyone who sees the released models learns
about any one citizen as well, whose records are part of one municipality's data.

Trust: the coordinator is honest-but-curious and fewer than the secure-aggregation threshold
of nodes collude with it; a node that adds no noise weakens the others' guarantee by its share
(``1/min_contributors`` of the variance). The noise share and the stochastic rounding come from
a fresh :class:`~fedgov.privacy.rng.SecureRNG` per share (AES-256-CTR, a 256-bit key from
``os.urandom``), so nobody can regenerate a node's share. The discrete Gaussian is sampled on
the integers (rejection with float64 acceptance probabilities), so the share has none of the
low-order gaps of floating-point Gaussian noise. Pure: arrays in, arrays out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedgov.errors import PrivacyError
from fedgov.privacy.rng import SecureRNG

__all__ = [
    "DistributedPlan",
    "TAU_LIMIT",
    "clip_update",
    "decode_mean",
    "discrete_gaussian",
    "encode_share",
    "epsilon_distributed",
    "plan_distributed",
    "tau",
]

MODULUS = 1 << 32
TAU_LIMIT = 1e-9
"""Largest ``tau * d`` (Kairouz et al.'s correction for a sum of discrete Gaussians) a round may have."""
_HEADROOM = 100.0
"""``clip / scale = 100 sqrt(d)``: rounding adds at most 1% to the sensitivity."""


def discrete_gaussian(sigma2: float, size: int, rng: SecureRNG | np.random.Generator) -> np.ndarray:
    """``size`` draws of the discrete Gaussian ``N_Z(0, sigma2)`` (``P(x) ~ exp(-x^2 / 2 sigma2)``
    on the integers), by rejection from the discrete Laplace (Canonne, Kamath and Steinke 2020,
    arXiv:2004.00010, Algorithm 3), vectorised, the acceptance probabilities in float64.

    ``rng``: a :class:`~fedgov.privacy.rng.SecureRNG` (what a node uses) or, in tests, a NumPy
    generator; only its ``geometric`` and ``random`` are used."""
    if sigma2 <= 0:
        return np.zeros(size, dtype=np.int64)
    t = math.floor(math.sqrt(sigma2)) + 1
    p = -math.expm1(-1.0 / t)  # discrete Laplace of scale t as a difference of two geometrics
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        m = max(16, int(1.3 * (size - filled)))
        y = rng.geometric(p, m) - rng.geometric(p, m)
        keep = rng.random(m) < np.exp(-((np.abs(y) - sigma2 / t) ** 2) / (2 * sigma2))
        got = y[keep][: size - filled]
        out[filled : filled + len(got)] = got
        filled += len(got)
    return out


def tau(sigma2_node: float, contributors: int) -> float:
    """Kairouz et al.'s ``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))``."""
    if contributors < 2:
        return 0.0
    k = np.arange(1, contributors, dtype=np.float64)
    return float(10.0 * np.sum(np.exp(-2 * math.pi**2 * sigma2_node * k / (k + 1))))


class DistributedPlan(BaseModel):
    """The public parameters of a distributed-DP task, the same at every node and the coordinator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dimension: int = Field(ge=1, description="numbers in the model update")
    clip: float = Field(gt=0, description="L2 bound on a node's update")
    rounds: int = Field(ge=1)
    sample_rate: float = Field(gt=0, le=1, description="probability a node is asked in a round (Poisson)")
    target_epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    accountant: str
    noise_multiplier: float = Field(gt=0, description="z: the sum's noise standard deviation over its L2 sensitivity")
    scale: float = Field(gt=0, description="one integer unit, in the update's units")
    sensitivity: float = Field(gt=0, description="L2 sensitivity of a node's integer vector: clip/scale + sqrt(d)")
    planned_epsilon: float = Field(ge=0, description="epsilon per municipality after all rounds")

    @property
    def total_sigma(self) -> float:
        """Standard deviation of the sum's noise per coordinate, in integer units."""
        return self.noise_multiplier * self.sensitivity

    def node_variance(self, min_contributors: int) -> float:
        """Each node's noise variance (integer units) so that ``min_contributors`` shares reach the target."""
        if min_contributors < 1:
            raise PrivacyError(f"min_contributors must be at least 1, got {min_contributors}")
        return self.total_sigma**2 / min_contributors

    def round_entry(self) -> tuple[float, float, int]:
        """The ledger entry of one round: a Gaussian mechanism of multiplier z at rate q."""
        return (self.noise_multiplier, self.sample_rate, 1)

    def history_after(self, rounds: int) -> list[tuple[float, float, int]]:
        return [(self.noise_multiplier, self.sample_rate, rounds)] if rounds else []


def epsilon_distributed(*, noise_multiplier: float, sample_rate: float, rounds: int, delta: float, accountant: str) -> float:
    """Epsilon per municipality after ``rounds`` rounds (Gaussian mechanism, Opacus' accountant)."""
    from fedgov.privacy.accounting import epsilon_from_history

    return epsilon_from_history(history=[(noise_multiplier, sample_rate, rounds)], delta=delta, accountant=accountant)


def plan_distributed(
    *, dimension: int, clip: float, rounds: int, sample_rate: float, target_epsilon: float, delta: float,
    accountant: str = "prv", margin: float = 0.98,
) -> DistributedPlan:
    """Calibrate ``z`` so that ``rounds`` rounds spend at most ``margin * target_epsilon``."""
    from fedgov.privacy.accounting import calibrate_noise

    if dimension < 1:
        raise PrivacyError(f"the model update has no numbers (dimension {dimension})")
    z = calibrate_noise(
        target_epsilon=margin * target_epsilon, delta=delta, sample_rate=sample_rate, steps=rounds, accountant=accountant,
    )
    scale = clip / (_HEADROOM * math.sqrt(dimension))
    sensitivity = clip / scale + math.sqrt(dimension)
    planned = epsilon_distributed(noise_multiplier=z, sample_rate=sample_rate, rounds=rounds, delta=delta, accountant=accountant)
    return DistributedPlan(
        dimension=dimension, clip=clip, rounds=rounds, sample_rate=sample_rate, target_epsilon=target_epsilon,
        delta=delta, accountant=accountant, noise_multiplier=z, scale=scale, sensitivity=sensitivity,
        planned_epsilon=planned,
    )


def clip_update(update: np.ndarray, clip: float) -> np.ndarray:
    """``update`` scaled down to L2 norm ``clip`` when longer (float64)."""
    u = np.asarray(update, dtype=np.float64)
    norm = float(np.linalg.norm(u))
    return u * (clip / norm) if norm > clip else u


def encode_share(
    update: Sequence[np.ndarray] | Mapping[str, np.ndarray] | np.ndarray,
    plan: DistributedPlan,
    *,
    min_contributors: int,
    contributors: int,
    rng: SecureRNG | np.random.Generator | None = None,
) -> np.ndarray:
    """A node's contribution: its update clipped, scaled to integers (stochastic rounding), plus
    its discrete Gaussian noise share, modulo ``2^32`` (int64 in ``[0, 2^32)``), ready to mask.

    ``contributors``: the most nodes the round can have (for ``tau``); ``min_contributors``:
    the fewest whose shares the noise is calibrated for. Refuses when ``tau * d`` is not
    negligible (the discrete Gaussian analysis would not hold as accounted). ``rng``: None (a
    fresh :class:`~fedgov.privacy.rng.SecureRNG`, keyed from the OS) outside tests.
    """
    if isinstance(update, Mapping):
        flat = np.concatenate([np.asarray(update[k], dtype=np.float64).ravel() for k in sorted(update)])
    elif isinstance(update, np.ndarray):
        flat = update.astype(np.float64).ravel()
    else:
        flat = np.concatenate([np.asarray(u, dtype=np.float64).ravel() for u in update])
    if flat.size != plan.dimension:
        raise PrivacyError(f"the update has {flat.size} numbers, the plan {plan.dimension}")
    if not np.all(np.isfinite(flat)):
        raise PrivacyError("the update holds NaN or infinite values")
    if min_contributors < 1 or min_contributors > contributors:
        raise PrivacyError(f"min_contributors {min_contributors} must be between 1 and the round's {contributors} nodes")
    sigma2 = plan.node_variance(min_contributors)
    t_d = tau(sigma2, contributors) * plan.dimension
    if t_d > TAU_LIMIT:
        raise PrivacyError(
            f"each node's noise share (variance {sigma2:.3g}) is too small for the distributed discrete Gaussian "
            f"analysis over {contributors} nodes (tau * d = {t_d:.3g} > {TAU_LIMIT:g})"
        )
    rng = rng if rng is not None else SecureRNG.fresh()
    x = clip_update(flat, plan.clip) / plan.scale
    low = np.floor(x)
    ints = (low + (rng.random(x.size) < (x - low))).astype(np.int64)  # unbiased stochastic rounding
    ints += discrete_gaussian(sigma2, x.size, rng)
    return ints % MODULUS


def decode_mean(total: np.ndarray, contributors: int, plan: DistributedPlan) -> np.ndarray:
    """The mean update (float64) from the unmasked sum mod ``2^32`` of ``contributors`` shares."""
    if contributors < 1:
        raise PrivacyError("no contributions to decode")
    t = np.asarray(total, dtype=np.int64) % MODULUS
    signed = np.where(t >= MODULUS // 2, t - MODULUS, t)
    return signed.astype(np.float64) * plan.scale / contributors
