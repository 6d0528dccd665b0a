"""The privacy budget as values: frozen events, their composition, and the rules a spend must meet.

Pure, with no I/O: the SQLite store (:mod:`fedgov.node.ledger`) folds its rows into these
values and asks the rules below before it commits anything, as dp_accounting's
``PrivacyAccountant`` dry-runs a composition before it composes.

* :class:`~fedgov.privacy.events.Mechanism` (shared with the statistics code) is what a task
  reserves or a round spends (dp_accounting's ``DpEvent``); :class:`Budget` a data set's total for a period; :class:`LedgerEvent` one row of the ledger;
  :class:`BudgetStatus` a data set's balance.
* :func:`compose` is the epsilon of several mechanisms on the same data.
* :func:`check_spend` decides whether a new reservation fits the budget on top of what is
  already committed; :func:`check_within_reservation` whether a round's spend stays within its
  task's reservation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedgov.errors import PrivacyError
from fedgov.privacy.accounting import HistoryEntry, epsilon_from_history, merge_history
from fedgov.privacy.events import Mechanism

__all__ = [
    "Budget",
    "BudgetStatus",
    "LedgerEvent",
    "Mechanism",
    "SpendCheck",
    "TaskState",
    "check_spend",
    "check_within_reservation",
    "compose",
]

TaskState = Literal["none", "open", "closed"]
"""A task in the ledger: never reserved, reserved and not released, or released."""


# --------------------------------------------------------------------------- values


class Budget(BaseModel):
    """A data set's total privacy budget for a period (``year``: a calendar year in UTC)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    period: Literal["year", "forever"] = "year"


class LedgerEvent(BaseModel):
    """One immutable row of the ledger.

    ``mechanism`` is None for ``release``; ``round`` is set for ``spend``; ``budget`` is the
    budget a ``reserve`` was checked against (kept for audit).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int
    time: datetime
    dataset: str
    task_id: str
    kind: Literal["reserve", "spend", "release"]
    mechanism: Mechanism | None
    round: int | None = None
    note: str = ""
    budget: Budget | None = None


class BudgetStatus(BaseModel):
    """A data set's balance in the budget period of some moment.

    ``epsilon_committed`` is the composition (:func:`compose`) of every open task's
    reservation and every closed task's spends, at the budget's delta: this is what is
    checked against the budget. ``epsilon_naive`` is, for comparison, the plain sum of each
    task's epsilon alone at the budget's delta (what summing per-task reports would give; it
    is not a guarantee at that delta). ``remaining = budget.epsilon - epsilon_committed``.
    ``events`` counts the events of the tasks in the period; ``year`` is None for ``forever``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    budget: Budget
    year: int | None
    epsilon_committed: float
    epsilon_naive: float
    remaining: float
    open_tasks: list[str]
    closed_tasks: list[str]
    events: int


# --------------------------------------------------------------------------- composition


@functools.lru_cache(maxsize=4096)
def _dpsgd_epsilon(history: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    """Epsilon of one merged DP-SGD history (cached: the ledger runs it under its write lock)."""
    return epsilon_from_history(history=list(history), delta=delta, accountant=accountant)


@dataclass(frozen=True)
class _Parts:
    """Mechanisms split for composition: the merged DP-SGD history and the rest."""

    merged: tuple[HistoryEntry, ...]
    delta_dpsgd: float  # the delta left for the DP-SGD part
    accountant: str
    eps_other: float
    delta_other: float


def _parts(mechanisms: Sequence[Mechanism], delta: float) -> _Parts:
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    history: list[HistoryEntry] = []
    accountant = "prv"
    eps_other = 0.0
    delta_other = 0.0
    for m in mechanisms:
        if m.kind == "dpsgd":
            history.extend(m.history)
            if m.accountant == "rdp":
                accountant = "rdp"
        else:
            eps_other += float(m.epsilon or 0.0)
            delta_other += m.delta
    merged = tuple(sorted(merge_history(history)))  # sorted: one cache key per multiset
    return _Parts(merged, delta - delta_other, accountant, eps_other, delta_other)


def _dpsgd_bound(p: _Parts, *, cheap: bool) -> float:
    """Epsilon of the merged DP-SGD history. ``cheap``: the RDP bound only (milliseconds)."""
    if not p.merged:
        return 0.0
    rdp = _dpsgd_epsilon(p.merged, p.delta_dpsgd, "rdp")
    if p.accountant == "rdp" or cheap:
        return rdp
    return min(_dpsgd_epsilon(p.merged, p.delta_dpsgd, "prv"), rdp)


def compose(mechanisms: Sequence[Mechanism], *, delta: float) -> float:
    """Epsilon at ``delta`` of all ``mechanisms`` run on the same data, in any adaptive order.

    How:

    1. Every DP-SGD history is merged into ONE accountant history (equal
       ``(noise_multiplier, sample_rate)`` entries summed; order does not matter to
       composition). Each entry is a Poisson-subsampled Gaussian mechanism; the PRV
       accountant (Gopi, Lee and Wutschitz 2021, arXiv:2106.02848) composes their
       privacy-loss random variables numerically, which is valid for adaptive composition:
       the same theorem that lets one accountant cover all steps of one training run covers
       the steps of several tasks on the same data. That is why ``k`` identical tasks cost
       much less than ``k`` times one.
    2. The other mechanisms (``gaussian``, ``laplace``, ``other``, each an ``(eps_i,
       delta_i)`` guarantee) are added by basic composition (Dwork and Roth 2014, Thm. 3.16,
       which also holds adaptively): the result is ``(eps_dpsgd + sum eps_i, delta)``-DP with
       the DP-SGD part evaluated at ``delta_dpsgd = delta - sum delta_i``. If nothing is
       left for DP-SGD (``delta_dpsgd <= 0``) this raises :class:`PrivacyError`.
    3. If any DP-SGD mechanism asks for ``rdp``, the whole history is evaluated with RDP
       (Mironov et al. 2019, arXiv:1908.10530): the looser of the two, so every task's own
       choice is honoured. With ``prv`` the result is ``min(PRV, RDP)``: both are valid
       upper bounds at the same delta, so their minimum is too. In practice PRV is always
       the smaller (RDP is 9 to 16% looser; FLOWER-NOTES); taking the minimum makes the cheap
       RDP pre-check of :func:`check_spend` exact rather than approximately right.

    DP-SGD evaluations are cached per (merged history, delta, accountant).
    """
    p = _parts(mechanisms, delta)
    if p.delta_dpsgd < 0 or (p.merged and p.delta_dpsgd <= 0):
        raise PrivacyError(
            f"the non-DP-SGD mechanisms use delta {p.delta_other:g}, which leaves "
            f"{'nothing' if p.delta_dpsgd <= 0 else f'{p.delta_dpsgd:g}'} of the total delta {delta:g}"
            + (" for the DP-SGD steps" if p.merged else "")
        )
    return p.eps_other + _dpsgd_bound(p, cheap=False)


# --------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class SpendCheck:
    """The answer of :func:`check_spend`.

    ``epsilon`` is the composed epsilon when it had to be evaluated exactly (near the edge of
    the budget), else None; ``why`` says why it does not fit when epsilon is not the reason
    (the (epsilon, delta) mechanisms take more delta than the budget has), else "".
    """

    fits: bool
    epsilon: float | None = None
    why: str = ""


def check_spend(*, committed: Sequence[Mechanism], mechanism: Mechanism, budget: Budget) -> SpendCheck:
    """Whether ``mechanism``, composed with what is already ``committed``, stays within ``budget``.

    The dry run before a commit: :meth:`~fedgov.node.ledger.PrivacyLedger.reserve` writes the
    reservation only when this fits, so a reservation that fits never takes the composed
    epsilon (:func:`compose`) at ``budget.delta`` beyond ``budget.epsilon``.

    The ledger asks under its write lock, so the cheap RDP bound is tried first: if that
    fits, so does :func:`compose` (which is at most the RDP bound), and the expensive PRV
    evaluation is left for after the commit. Only near the edge of the budget is PRV
    evaluated here.
    """
    p = _parts([*committed, mechanism], budget.delta)
    if p.delta_other > budget.delta or (p.merged and p.delta_dpsgd <= 0):
        return SpendCheck(
            fits=False,
            why=f"the (epsilon, delta) mechanisms would use delta {p.delta_other:g} of the budget's {budget.delta:g}"
            + (", leaving nothing for DP-SGD" if p.merged else ""),
        )
    if p.eps_other + _dpsgd_bound(p, cheap=True) <= budget.epsilon:
        return SpendCheck(fits=True)
    eps = p.eps_other + _dpsgd_bound(p, cheap=False)
    return SpendCheck(fits=eps <= budget.epsilon, epsilon=eps)


def check_within_reservation(
    *, reserved: Mechanism, spent: Sequence[Mechanism], mechanism: Mechanism, task_id: str, dataset: str
) -> str | None:
    """None when ``mechanism``, on top of the task's earlier spends ``spent``, stays within its
    reservation ``reserved``; else why not (``task_id`` and ``dataset`` name it in the text).

    The kind and accountant must be the reservation's. For DP-SGD, per ``(noise_multiplier,
    sample_rate)`` the total steps may not exceed the reserved steps (which implies a smaller
    epsilon, exactly, with no accountant in the loop); for the others, the summed epsilon and
    delta may not exceed the reserved ones.
    """
    res = reserved
    if mechanism.kind != res.kind or mechanism.accountant != res.accountant:
        return (
            f"task '{task_id}' reserved a {res.kind}/{res.accountant} mechanism; "
            f"a {mechanism.kind}/{mechanism.accountant} spend does not match it"
        )
    spends = [*spent, mechanism]
    if res.kind == "dpsgd":
        limit = res.steps_by_key()
        used: dict[tuple[float, float], int] = {}
        for m in spends:
            for key, n in m.steps_by_key().items():
                used[key] = used.get(key, 0) + n
        for (sigma, q), n in used.items():
            if n > limit.get((sigma, q), 0):
                return (
                    f"task '{task_id}' on data set '{dataset}' would take {n} DP-SGD steps at noise "
                    f"multiplier {sigma:g} and sample rate {q:g}; it reserved {limit.get((sigma, q), 0)}"
                )
        return None
    eps = sum(float(m.epsilon or 0.0) for m in spends)
    dlt = sum(m.delta for m in spends)
    if eps > float(res.epsilon or 0.0) * (1 + 1e-12) or dlt > res.delta * (1 + 1e-12):
        return (
            f"task '{task_id}' on data set '{dataset}' would spend epsilon {eps:g}, delta {dlt:g}; "
            f"it reserved epsilon {res.epsilon:g}, delta {res.delta:g}"
        )
    return None
