"""The pure budget rules (:mod:`fedgov.node.budget`): a spend that fits never takes the budget beyond
its limit, one that does not is refused, and a round never spends beyond its reservation.

The (epsilon, delta) mechanisms compose by plain addition, so hypothesis can try many of them
cheaply; the DP-SGD properties use a few fixed histories (their epsilons are cached).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgov.errors import PrivacyError
from fedgov.node.budget import Budget, Mechanism, check_spend, check_within_reservation, compose

DELTA = 1e-5
SIGMA, Q = 1.38, 1 / 34
DPSGD = [Mechanism.dpsgd([(SIGMA, Q, steps)]) for steps in (34, 170, 340)]

pure = st.builds(
    Mechanism,
    kind=st.sampled_from(["gaussian", "laplace", "other"]),
    epsilon=st.floats(min_value=0.0, max_value=3.0, allow_nan=False),
    delta=st.sampled_from([0.0, 0.0, 1e-7, 1e-6]),
)
budgets = st.builds(
    Budget,
    epsilon=st.floats(min_value=0.01, max_value=10.0, allow_nan=False),
    delta=st.sampled_from([1e-6, 1e-5]),
    period=st.just("forever"),
)


def _fits_by_compose(mechanisms: list[Mechanism], budget: Budget) -> bool:
    try:
        return compose(mechanisms, delta=budget.delta) <= budget.epsilon
    except PrivacyError:  # the (epsilon, delta) mechanisms leave no delta for the rest
        return False


@given(committed=st.lists(pure, max_size=6), mechanism=pure, budget=budgets)
def test_a_spend_that_fits_never_exceeds_the_budget(committed: list[Mechanism], mechanism: Mechanism, budget: Budget) -> None:
    check = check_spend(committed=committed, mechanism=mechanism, budget=budget)
    if check.fits:
        assert compose([*committed, mechanism], delta=budget.delta) <= budget.epsilon
    assert check.fits == _fits_by_compose([*committed, mechanism], budget)


@given(mechanisms=st.lists(pure, max_size=12), budget=budgets)
def test_reserving_only_what_fits_keeps_the_committed_total_within_the_budget(
    mechanisms: list[Mechanism], budget: Budget
) -> None:
    """What the ledger does: a reservation is written only when check_spend fits."""
    committed: list[Mechanism] = []
    for m in mechanisms:
        if check_spend(committed=committed, mechanism=m, budget=budget).fits:
            committed.append(m)
        if committed:
            assert compose(committed, delta=budget.delta) <= budget.epsilon


@settings(max_examples=25, deadline=None)
@given(
    committed=st.lists(st.sampled_from(DPSGD), max_size=2),
    mechanism=st.sampled_from(DPSGD),
    epsilon=st.floats(min_value=0.3, max_value=6.0, allow_nan=False),
)
def test_dpsgd_spends_fit_exactly_when_the_composition_does(
    committed: list[Mechanism], mechanism: Mechanism, epsilon: float
) -> None:
    """The cheap RDP pre-check never changes the answer: compose is min(PRV, RDP)."""
    budget = Budget(epsilon=epsilon, delta=DELTA, period="forever")
    check = check_spend(committed=committed, mechanism=mechanism, budget=budget)
    assert check.fits == (compose([*committed, mechanism], delta=DELTA) <= epsilon)
    if check.epsilon is not None:  # evaluated exactly, near the edge
        assert check.epsilon == pytest.approx(compose([*committed, mechanism], delta=DELTA))


def test_a_spend_at_the_edge_fits_and_just_beyond_it_does_not() -> None:
    m = DPSGD[-1]
    eps = compose([m], delta=DELTA)
    assert check_spend(committed=[], mechanism=m, budget=Budget(epsilon=eps, delta=DELTA)).fits
    beyond = check_spend(committed=[], mechanism=m, budget=Budget(epsilon=eps * (1 - 1e-6), delta=DELTA))
    assert not beyond.fits and beyond.epsilon == pytest.approx(eps) and beyond.why == ""


def test_delta_the_budget_has_not_is_refused_with_its_reason() -> None:
    budget = Budget(epsilon=100.0, delta=DELTA)
    greedy = Mechanism(kind="gaussian", epsilon=0.1, delta=2 * DELTA)
    check = check_spend(committed=[], mechanism=greedy, budget=budget)
    assert not check.fits and "delta" in check.why
    # all the delta to (epsilon, delta) mechanisms: nothing left for DP-SGD
    check = check_spend(committed=[Mechanism(kind="gaussian", epsilon=0.1, delta=DELTA)], mechanism=DPSGD[0], budget=budget)
    assert not check.fits and "leaving nothing for DP-SGD" in check.why


@given(
    reserved=st.integers(min_value=0, max_value=500),
    spent=st.lists(st.integers(min_value=0, max_value=200), max_size=5),
    steps=st.integers(min_value=0, max_value=200),
)
def test_a_round_spends_within_its_reservation_or_is_refused(reserved: int, spent: list[int], steps: int) -> None:
    res = Mechanism.dpsgd([(SIGMA, Q, reserved)])
    problem = check_within_reservation(
        reserved=res, spent=[Mechanism.dpsgd([(SIGMA, Q, s)]) for s in spent], mechanism=Mechanism.dpsgd([(SIGMA, Q, steps)]),
        task_id="t", dataset="d",
    )
    assert (problem is None) == (sum(spent) + steps <= reserved)
    if problem is not None:
        assert f"would take {sum(spent) + steps} DP-SGD steps" in problem and f"it reserved {reserved}" in problem


def test_a_spend_of_another_mechanism_than_the_reservation_is_refused() -> None:
    res = Mechanism.dpsgd([(SIGMA, Q, 100)])
    other_key = check_within_reservation(
        reserved=res, spent=[], mechanism=Mechanism.dpsgd([(SIGMA, 2 * Q, 1)]), task_id="t", dataset="d"
    )
    assert other_key is not None and "it reserved 0" in other_key
    kind = check_within_reservation(
        reserved=res, spent=[], mechanism=Mechanism(kind="laplace", epsilon=0.1), task_id="t", dataset="d"
    )
    assert kind == "task 't' reserved a dpsgd/prv mechanism; a laplace/prv spend does not match it"
    accountant = check_within_reservation(
        reserved=res, spent=[], mechanism=Mechanism.dpsgd([(SIGMA, Q, 1)], accountant="rdp"), task_id="t", dataset="d"
    )
    assert accountant is not None and "dpsgd/rdp" in accountant


def test_epsilon_delta_spends_add_up_against_their_reservation() -> None:
    res = Mechanism(kind="gaussian", epsilon=1.0, delta=1e-6)
    half = Mechanism(kind="gaussian", epsilon=0.5, delta=5e-7)
    assert check_within_reservation(reserved=res, spent=[half], mechanism=half, task_id="t", dataset="d") is None
    over = check_within_reservation(reserved=res, spent=[half, half], mechanism=half, task_id="t", dataset="d")
    assert over == "task 't' on data set 'd' would spend epsilon 1.5, delta 1.5e-06; it reserved epsilon 1, delta 1e-06"
