"""Privacy accounting for DP-SGD with Poisson sampling: epsilon of a ledger, noise calibration,
and the per-node plan for a whole task.

Pure: numbers in, numbers out. No model, no data, no files. The accountants are Opacus'
(``PRVAccountant``: the numerical composition of privacy-loss random variables of Gopi, Lee and
Wutschitz 2021, arXiv:2106.02848; ``RDPAccountant``: Renyi DP of the sampled Gaussian
mechanism, Mironov, Talwar and Zhang 2019, arXiv:1908.10530), used only as calculators: an
accountant is built, given a history and asked for epsilon. Importing Opacus imports torch, so
it is imported when first needed, not with this module.

The privacy ledger of a node is a list of ``(noise_multiplier, sample_rate, steps)`` entries,
the same plain data as Opacus' ``accountant.history``. Each entry is ``steps`` applications of
the Poisson-subsampled Gaussian mechanism (Abadi et al. 2016, arXiv:1607.00133). Epsilon is
always that of the composition of the *whole* ledger (all rounds, all processes), never of the
latest round alone.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedgov.errors import PrivacyError

__all__ = [
    "ACCOUNTANTS",
    "AccountantName",
    "HistoryEntry",
    "DPPlan",
    "merge_history",
    "epsilon_for",
    "epsilon_from_history",
    "calibrate_noise",
    "plan_node_dp",
    "poisson_batches",
]

AccountantName = Literal["prv", "rdp"]
"""The name of an accountant fedgov accepts (a task's ``privacy.accountant``)."""

ACCOUNTANTS: tuple[AccountantName, ...] = ("prv", "rdp")
"""Accountants fedgov accepts. Opacus' ``gdp`` is left out: it under-reports epsilon."""

HistoryEntry = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)``, as in Opacus' ``accountant.history``."""

EPSILON_TOLERANCE = 0.005
"""How far below the target :func:`calibrate_noise` may end (in epsilon)."""

MAX_NOISE_MULTIPLIER = 1e3


_RDP_CACHED = False


def _cache_rdp() -> None:
    """Memoise Opacus' RDP of one step of the sampled Gaussian, ``_compute_rdp(q, sigma, alpha)``.

    It is a pure function of three floats, and RDP is linear in the number of steps, so the
    cache changes no value. It matters: PRV bounds its discretisation domain with an RDP
    accountant at fractional orders, and that series took 0.9 s of every 1.0 s a node spent
    on a round of demo-12 (cProfile), recomputed every round for the same (q, sigma).
    """
    global _RDP_CACHED
    if _RDP_CACHED:
        return
    import functools

    from opacus.accountants.analysis import rdp as rdp_analysis
    from opacus.accountants.analysis.prv import prvs

    cached = functools.lru_cache(maxsize=65536)(rdp_analysis._compute_rdp)
    rdp_analysis._compute_rdp = cached
    prvs._compute_rdp = cached
    _RDP_CACHED = True


def _accountant(name: str) -> Any:
    _cache_rdp()
    if name == "prv":
        from opacus.accountants import PRVAccountant

        return PRVAccountant()
    if name == "rdp":
        from opacus.accountants import RDPAccountant

        return RDPAccountant()
    raise PrivacyError(f"unknown accountant '{name}'; use one of {', '.join(ACCOUNTANTS)}")


def _check_entry(entry: HistoryEntry) -> HistoryEntry:
    try:
        sigma, q, steps = entry
    except (TypeError, ValueError):
        raise PrivacyError(f"a history entry must be (noise_multiplier, sample_rate, steps), got {entry!r}") from None
    if not (isinstance(steps, (int, np.integer)) and steps >= 0):
        raise PrivacyError(f"history entry {entry!r}: steps must be a whole number >= 0")
    if not (math.isfinite(sigma) and sigma > 0):
        raise PrivacyError(f"history entry {entry!r}: noise_multiplier must be > 0")
    if not (0 < q <= 1):
        raise PrivacyError(f"history entry {entry!r}: sample_rate must be in (0, 1]")
    return float(sigma), float(q), int(steps)


def merge_history(history: list[HistoryEntry]) -> list[HistoryEntry]:
    """The same ledger with equal ``(noise_multiplier, sample_rate)`` entries summed.

    Composition does not depend on order, so this changes no epsilon; it only keeps the ledger
    short. That matters for PRV: its cost grows linearly with the number of entries (checked:
    ``[(1, 0.0128, 780)] * 10`` costs ten times ``[(1, 0.0128, 7800)]``, about 0.5 s each, for
    the same epsilon to 1e-8). Opacus merges only a step equal to the *last* entry.
    Entries with 0 steps are dropped.
    """
    steps_by_key: dict[tuple[float, float], int] = {}
    for entry in history:
        sigma, q, steps = _check_entry(entry)
        if steps:
            steps_by_key[(sigma, q)] = steps_by_key.get((sigma, q), 0) + steps
    return [(sigma, q, steps) for (sigma, q), steps in steps_by_key.items()]


def epsilon_from_history(*, history: list[HistoryEntry], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of the composition of every entry in ``history`` (0 if empty).

    PRV returns Opacus' upper estimate (``eps_upper``, numerical error at most 0.01), so the
    value is a guarantee, not a point estimate.
    """
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    merged = merge_history(history)
    _accountant(accountant)  # an unknown name fails here, before the cache
    if not merged:
        return 0.0
    return _epsilon_cached(tuple((float(s), float(q), int(k)) for s, q, k in merged), float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(merged: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    """Epsilon is a pure function of the merged ledger: within one process a node computes the
    same one several times a round (the hard cap before training, the ledger's composition
    after), so it is kept (measured: 20 to 40 ms per PRV evaluation)."""
    acct = _accountant(accountant)
    acct.history = list(merged)
    # PRV's discretisation takes log(0) on purpose where it masks a branch with np.where;
    # the warnings say nothing. The errstate is local to this call (and thread).
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(acct.get_epsilon(delta=delta))


def epsilon_for(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv"
) -> float:
    """Epsilon of ``steps`` steps of DP-SGD at ``noise_multiplier`` and Poisson ``sample_rate``."""
    return epsilon_from_history(history=[(noise_multiplier, sample_rate, steps)], delta=delta, accountant=accountant)


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    tolerance: float = EPSILON_TOLERANCE,
    prior_history: list[HistoryEntry] | None = None,
) -> float:
    """The smallest noise multiplier (to within ``tolerance`` in epsilon) that keeps
    ``prior_history`` plus ``steps`` new steps at ``sample_rate`` within ``target_epsilon``.

    The result ``sigma`` satisfies ``epsilon(sigma) <= target_epsilon`` always, and
    ``epsilon(sigma) > target_epsilon - tolerance`` unless the bracket shrank below 1e-6.

    Search: a bracket, then false position (see ``solve``). For PRV the bracket starts from the RDP answer, which is
    cheap and close (RDP is 9 to 16% looser); PRV is evaluated only near the answer, since its
    cost explodes for small sigma (seconds at sigma 0.3, minutes at 0.1 for 1000 steps).
    Unlike Opacus' ``get_noise_multiplier``, this accounts for what was spent before
    (``prior_history``), so it can be used to resume.
    """
    if not 0 < sample_rate <= 1:
        raise PrivacyError(
            f"sample_rate must be in (0, 1] (1: no sampling, no amplification), got {sample_rate}"
        )
    if steps < 1:
        raise PrivacyError(f"steps must be at least 1, got {steps}")
    if not target_epsilon > 0:
        raise PrivacyError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    _accountant(accountant)  # unknown name -> PrivacyError before any work
    prior = merge_history(list(prior_history or []))

    memo: dict[tuple[float, str], float] = {}

    def eps(sigma: float, acct: str = accountant) -> float:
        if (sigma, acct) not in memo:
            memo[(sigma, acct)] = epsilon_from_history(
                history=prior + [(sigma, sample_rate, steps)], delta=delta, accountant=acct
            )
        return memo[(sigma, acct)]

    if prior:
        spent = epsilon_from_history(history=prior, delta=delta, accountant=accountant)
        if spent >= target_epsilon:
            raise PrivacyError(
                f"the recorded history already spends epsilon {spent:.3f}, at or beyond the target "
                f"{target_epsilon}: no noise multiplier allows {steps} more steps"
            )

    def bracket_from(guess: float, acct: str) -> tuple[float | None, float]:
        """(lo, hi): eps(lo) > target (None: not yet known), eps(hi) <= target."""
        lo: float | None = None
        hi = guess
        while eps(hi, acct) > target_epsilon:
            lo = hi
            hi *= 2
            if hi > MAX_NOISE_MULTIPLIER:
                raise PrivacyError(
                    f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches epsilon {target_epsilon} "
                    f"at delta {delta:g} with sample rate {sample_rate:.4g} and {steps} steps; "
                    "raise the target, or lower the rounds, epochs or batch size"
                )
        return lo, hi

    def solve(lo: float | None, hi: float, acct: str, tol: float) -> float:
        """Shrink [lo, hi] around the answer; return hi once eps(hi) is within tol of the target.

        False position on log(epsilon) against log(sigma), which is close to a straight line
        near the answer: two to four evaluations instead of bisection's ten or more. The new
        point stays at least 5% of the bracket away from either end, so the bracket always
        shrinks geometrically.
        """
        while lo is None:  # walk down until the target is exceeded
            cand = hi * 0.8
            if eps(cand, acct) > target_epsilon:
                lo = cand
            else:
                hi = cand
        aim = math.log(target_epsilon - tol / 2)
        while hi - lo > 1e-6 * hi and target_epsilon - eps(hi, acct) > tol:
            f_lo, f_hi = math.log(eps(lo, acct)) - aim, math.log(eps(hi, acct)) - aim
            x_lo, x_hi = math.log(lo), math.log(hi)
            x = x_lo - f_lo * (x_hi - x_lo) / (f_hi - f_lo) if f_hi < f_lo else 0.5 * (x_lo + x_hi)
            mid = min(max(math.exp(x), lo + 0.05 * (hi - lo)), hi - 0.05 * (hi - lo))
            if eps(mid, acct) > target_epsilon:
                lo = mid
            else:
                hi = mid
        return hi

    if accountant == "prv":
        # Cheap RDP answer (to 5% of epsilon) as the starting point for PRV.
        try:
            lo_r, hi_r = bracket_from(1.0, "rdp")
            guess = solve(lo_r, hi_r, "rdp", 0.02 * target_epsilon)
        except PrivacyError:  # RDP is looser: PRV may still reach the target
            guess = MAX_NOISE_MULTIPLIER
        lo, hi = bracket_from(guess, "prv")
        return solve(lo, hi, "prv", tolerance)
    lo, hi = bracket_from(1.0, accountant)
    return solve(lo, hi, accountant, tolerance)


def poisson_batches(*, rows: int, batch_size: int) -> tuple[int, float, int]:
    """How Opacus turns ``batch_size`` into Poisson sampling, reproduced exactly.

    Returns ``(batches, sample_rate, steps_per_epoch)``:

    - ``batches = max(2, ceil(rows / batch_size))``: the length of the plain DataLoader that
      fedgov hands to ``make_private`` (at least 2, so that the sample rate is below 1);
    - ``DPDataLoader.from_data_loader`` samples each row with probability ``1 / batches``;
    - its ``UniformWithReplacementSampler`` yields ``int(1 / (1 / batches))`` batches per epoch:
      in floating point that is ``batches - 1`` for some values (93, 99, 105, ...);
    - ``make_private`` records ``sample_rate = 1 / steps_per_epoch`` in the accountant.

    When the two differ, the recorded rate is slightly above the real one: conservative.
    """
    if rows < 2:
        raise PrivacyError(f"DP-SGD needs at least 2 training rows, got {rows}")
    if batch_size < 1:
        raise PrivacyError(f"batch_size must be at least 1, got {batch_size}")
    batches = max(2, math.ceil(rows / batch_size))
    steps_per_epoch = int(1 / (1 / batches))
    return batches, 1 / steps_per_epoch, steps_per_epoch


class DPPlan(BaseModel):
    """A node's DP-SGD plan for a whole task, fixed before round 1.

    Sampling is Poisson (every row joins each batch independently with probability
    ``sample_rate``; expected batch ``rows * sample_rate <= batch_size``), as the accountant
    assumes. The noise multiplier is calibrated once so that ``total_steps`` steps, all rounds
    together, spend at most ``margin * target_epsilon``; the margin absorbs the accountant's
    numerical error. ``target_epsilon`` stays the node's hard cap.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: int = Field(ge=2)
    batch_size: int = Field(ge=1, description="requested (maximum expected) batch size")
    local_epochs: int = Field(ge=1)
    rounds: int = Field(ge=1)
    target_epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    accountant: AccountantName
    margin: float = Field(gt=0, le=1)
    loader_batches: int = Field(ge=2, description="length of the plain DataLoader given to Opacus")
    sample_rate: float = Field(gt=0, lt=1, description="q, as the accountant records it")
    steps_per_epoch: int = Field(ge=1)
    steps_per_round: int = Field(ge=1)
    total_steps: int = Field(ge=1)
    noise_multiplier: float = Field(gt=0)
    planned_epsilon: float = Field(ge=0, description="epsilon of all total_steps steps and the planned evaluations")
    evaluations: int = Field(default=0, ge=0, description="evaluations of the global model at the node, each a DP release")
    evaluation_noise: float | None = Field(
        default=None, gt=0, description="noise multiplier z of each evaluation's counts (std z * sqrt(2) per count)"
    )

    @property
    def loader_batch_size(self) -> int:
        """Batch size of the plain DataLoader; ``ceil(rows / it) == loader_batches``."""
        return math.ceil(self.rows / self.loader_batches)

    @property
    def expected_batch_size(self) -> float:
        return self.rows * self.sample_rate

    def round_entry(self) -> HistoryEntry:
        """The ledger entry of one round."""
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)

    def history_after(self, rounds: int) -> list[HistoryEntry]:
        """The (merged) ledger after ``rounds`` rounds of this plan's training."""
        return [(self.noise_multiplier, self.sample_rate, rounds * self.steps_per_round)] if rounds else []

    def evaluation_entry(self) -> HistoryEntry:
        """The ledger entry of one evaluation: a Gaussian mechanism on (correct, total) counts."""
        if self.evaluation_noise is None:
            raise PrivacyError("this plan has no evaluations at the node")
        return (self.evaluation_noise, 1.0, 1)

    def planned_history(self) -> list[HistoryEntry]:
        """Everything the task may spend at the node: all rounds' training and all evaluations."""
        out = self.history_after(self.rounds)
        if self.evaluations and self.evaluation_noise is not None:
            out.append((self.evaluation_noise, 1.0, self.evaluations))
        return out


def plan_node_dp(
    *,
    rows: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    target_epsilon: float,
    delta: float,
    accountant: AccountantName,
    margin: float,
    evaluations: int = 0,
    evaluation_epsilon: float = 0.0,
) -> DPPlan:
    """Plan a node's DP-SGD for a task: sampling, steps, and the calibrated noise multiplier.

    With ``evaluations`` > 0, the node also releases that many noisy evaluations (Gaussian
    counts, ``(z_eval, 1, 1)`` each) whose noise keeps them, alone, within
    ``evaluation_epsilon``; DP-SGD is then calibrated for what they leave of
    ``margin * target_epsilon``, composed with them by the accountant.

    ``sample_rate`` and ``steps_per_epoch`` follow :func:`poisson_batches` (what Opacus will
    do and record), ``steps_per_round = local_epochs * steps_per_epoch``,
    ``total_steps = rounds * steps_per_round``, and ``noise_multiplier`` is the smallest one
    keeping ``total_steps`` within ``margin * target_epsilon`` at ``delta``.
    """
    if local_epochs < 1 or rounds < 1:
        raise PrivacyError(f"local_epochs and rounds must be at least 1, got {local_epochs} and {rounds}")
    if not 0 < margin <= 1:
        raise PrivacyError(f"margin must be in (0, 1], got {margin}")
    batches, q, steps_per_epoch = poisson_batches(rows=rows, batch_size=batch_size)
    steps_per_round = local_epochs * steps_per_epoch
    total_steps = rounds * steps_per_round
    extra: list[HistoryEntry] = []
    z_eval = None
    if evaluations > 0:
        if not 0 < evaluation_epsilon < margin * target_epsilon:
            raise PrivacyError(
                f"evaluation.epsilon {evaluation_epsilon} must be above 0 and below the task's target epsilon {target_epsilon}"
            )
        z_eval = calibrate_noise(
            target_epsilon=evaluation_epsilon, delta=delta, sample_rate=1.0, steps=evaluations, accountant=accountant,
        )
        extra = [(z_eval, 1.0, evaluations)]
    sigma = calibrate_noise(
        target_epsilon=margin * target_epsilon,
        delta=delta,
        sample_rate=q,
        steps=total_steps,
        accountant=accountant,
        prior_history=extra,
    )
    planned = epsilon_from_history(history=merge_history(extra + [(sigma, q, total_steps)]), delta=delta, accountant=accountant)
    return DPPlan(
        rows=rows,
        batch_size=batch_size,
        local_epochs=local_epochs,
        rounds=rounds,
        target_epsilon=target_epsilon,
        delta=delta,
        accountant=accountant,
        margin=margin,
        loader_batches=batches,
        sample_rate=q,
        steps_per_epoch=steps_per_epoch,
        steps_per_round=steps_per_round,
        total_steps=total_steps,
        noise_multiplier=sigma,
        planned_epsilon=planned,
        evaluations=evaluations,
        evaluation_noise=z_eval,
    )
