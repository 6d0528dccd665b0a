"""Accounting: reference values, calibration, ledgers resumed in pieces, the node's plan."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgov.errors import PrivacyError
from fedgov.privacy import (
    calibrate_noise,
    epsilon_for,
    epsilon_from_history,
    merge_history,
    plan_node_dp,
    poisson_batches,
)

DELTA = 1e-5

# FLOWER-NOTES.md, "Accounting": (sigma, q, steps, Opacus RDP, Opacus PRV) at delta 1e-5.
REFERENCE = [
    (1.0, 0.0128, 781, 2.420, 2.131),
    (1.0, 0.0128, 1560, 3.315, 2.999),
    (1.0, 0.032, 625, 5.713, 5.164),
    (0.6, 0.01, 1000, 8.666, 7.444),
]


@pytest.mark.parametrize(("sigma", "q", "steps", "rdp", "prv"), REFERENCE)
def test_reference_values(sigma: float, q: float, steps: int, rdp: float, prv: float) -> None:
    got_prv = epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="prv")
    got_rdp = epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="rdp")
    assert got_prv == pytest.approx(prv, abs=0.02)
    assert got_rdp == pytest.approx(rdp, abs=0.02)
    assert got_prv < got_rdp  # RDP is a valid but looser bound


def test_default_accountant_is_prv() -> None:
    assert epsilon_for(noise_multiplier=1.0, sample_rate=0.0128, steps=781, delta=DELTA) == pytest.approx(
        2.131, abs=0.02
    )


def test_empty_history_spends_nothing() -> None:
    assert epsilon_from_history(history=[], delta=DELTA, accountant="prv") == 0.0
    assert epsilon_from_history(history=[(1.0, 0.01, 0)], delta=DELTA, accountant="rdp") == 0.0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_history_in_pieces_equals_one_uninterrupted_history(accountant: str) -> None:
    one = epsilon_from_history(history=[(1.0, 0.0128, 781)], delta=DELTA, accountant=accountant)
    two = epsilon_from_history(history=[(1.0, 0.0128, 300), (1.0, 0.0128, 481)], delta=DELTA, accountant=accountant)
    # a ledger saved as plain data (JSON) and resumed elsewhere
    resumed = json.loads(json.dumps([[1.0, 0.0128, 100]] * 7 + [[1.0, 0.0128, 81]]))
    many = epsilon_from_history(history=[tuple(e) for e in resumed], delta=DELTA, accountant=accountant)
    assert two == pytest.approx(one, abs=1e-6)
    assert many == pytest.approx(one, abs=1e-6)


def test_history_equals_what_opacus_records_step_by_step() -> None:
    from opacus.accountants import PRVAccountant

    acct = PRVAccountant()
    for _ in range(781):
        acct.step(noise_multiplier=1.0, sample_rate=0.0128)
    assert acct.history == [(1.0, 0.0128, 781)]  # Opacus merges equal consecutive steps
    assert epsilon_from_history(history=acct.history, delta=DELTA, accountant="prv") == pytest.approx(
        acct.get_epsilon(DELTA), abs=1e-9
    )


def test_merge_history_sums_equal_entries_in_any_order() -> None:
    history = [(1.0, 0.01, 100), (1.2, 0.01, 50), (1.0, 0.01, 100), (1.0, 0.02, 0)]
    assert merge_history(history) == [(1.0, 0.01, 200), (1.2, 0.01, 50)]
    a = epsilon_from_history(history=history, delta=DELTA, accountant="prv")
    b = epsilon_from_history(history=[(1.2, 0.01, 50), (1.0, 0.01, 200)], delta=DELTA, accountant="prv")
    assert a == pytest.approx(b, abs=1e-6)


@settings(max_examples=5, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.8, 1.0, 1.5]), st.sampled_from([0.01, 0.05]), st.integers(0, 200)),
        min_size=1,
        max_size=4,
    )
)
def test_merging_never_changes_epsilon(history: list[tuple[float, float, int]]) -> None:
    """Composition is commutative: merged, reversed and raw ledgers agree (RDP: fast)."""
    raw = epsilon_from_history(history=history, delta=DELTA, accountant="rdp")
    rev = epsilon_from_history(history=list(reversed(history)), delta=DELTA, accountant="rdp")
    assert raw == pytest.approx(rev, rel=1e-9, abs=1e-12)
    assert sum(s for *_, s in merge_history(history)) == sum(s for *_, s in history)


@pytest.mark.parametrize(
    "entry", [(0.0, 0.01, 10), (1.0, 0.0, 10), (1.0, 1.5, 10), (1.0, 0.01, -1), (1.0, 0.01, 2.5), (1.0, 0.01)]
)
def test_bad_history_entries_are_refused(entry: tuple) -> None:
    with pytest.raises(PrivacyError):
        merge_history([entry])


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrate_noise_is_within_target_and_near_tight(accountant: str) -> None:
    target, q, steps = 2.0, 0.02, 300
    sigma = calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, accountant=accountant)
    eps = epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant=accountant)
    assert target - 0.005 <= eps <= target
    less_noise = epsilon_for(
        noise_multiplier=0.97 * sigma, sample_rate=q, steps=steps, delta=DELTA, accountant=accountant
    )
    assert less_noise > target


def test_calibrate_noise_with_prior_history_resumes() -> None:
    """Unlike Opacus' make_private_with_epsilon, what was spent before counts."""
    q = 0.02
    prior = [(1.0, q, 300)]
    sigma = calibrate_noise(
        target_epsilon=3.0, delta=DELTA, sample_rate=q, steps=200, prior_history=prior, accountant="rdp"
    )
    total = epsilon_from_history(history=prior + [(sigma, q, 200)], delta=DELTA, accountant="rdp")
    assert 3.0 - 0.005 <= total <= 3.0
    alone = epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=200, delta=DELTA, accountant="rdp")
    assert alone < 3.0 - 0.5  # calibrating without the prior spend would have allowed epsilon 3.0


@pytest.mark.parametrize("q", [1.5, 0.0, -0.1])
def test_calibrate_noise_refuses_sample_rate_outside_0_1(q: float) -> None:
    with pytest.raises(PrivacyError, match="sample_rate"):
        calibrate_noise(target_epsilon=2.0, delta=DELTA, sample_rate=q, steps=100)


def test_calibrate_noise_without_sampling_is_the_composed_gaussian() -> None:
    """q = 1 (every municipality every round, distributed DP): no amplification; 10 Gaussian
    releases at the calibrated sigma spend the target, and a smaller sigma would not do."""
    sigma = calibrate_noise(target_epsilon=2.0, delta=DELTA, sample_rate=1.0, steps=10, accountant="rdp")
    assert epsilon_from_history(history=[(sigma, 1.0, 10)], delta=DELTA, accountant="rdp") <= 2.0
    assert epsilon_from_history(history=[(0.97 * sigma, 1.0, 10)], delta=DELTA, accountant="rdp") > 2.0
    assert sigma > calibrate_noise(target_epsilon=2.0, delta=DELTA, sample_rate=0.5, steps=10, accountant="rdp")


def test_calibrate_noise_refuses_bad_steps_delta_accountant() -> None:
    with pytest.raises(PrivacyError, match="steps"):
        calibrate_noise(target_epsilon=2.0, delta=DELTA, sample_rate=0.01, steps=0)
    with pytest.raises(PrivacyError, match="delta"):
        calibrate_noise(target_epsilon=2.0, delta=1.0, sample_rate=0.01, steps=10)
    with pytest.raises(PrivacyError, match="accountant"):
        calibrate_noise(target_epsilon=2.0, delta=DELTA, sample_rate=0.01, steps=10, accountant="gdp")


def test_calibrate_noise_unreachable_target(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedgov.privacy.accounting as accounting

    monkeypatch.setattr(accounting, "MAX_NOISE_MULTIPLIER", 4.0)  # keeps the search short
    for accountant in ("rdp", "prv"):
        with pytest.raises(PrivacyError, match="no noise multiplier up to 4"):
            calibrate_noise(target_epsilon=0.1, delta=DELTA, sample_rate=0.2, steps=300, accountant=accountant)


def test_calibrate_noise_refuses_when_history_already_spent_the_target() -> None:
    with pytest.raises(PrivacyError, match="already spends"):
        calibrate_noise(target_epsilon=2.0, delta=DELTA, sample_rate=0.01, steps=10, prior_history=[(0.6, 0.01, 1000)])


def test_poisson_batches_mirror_opacus() -> None:
    assert poisson_batches(rows=26000, batch_size=256) == (102, 1 / 102, 102)
    # batch >= rows: still two batches, so q = 0.5 < 1
    assert poisson_batches(rows=10, batch_size=256) == (2, 0.5, 2)
    # int(1 / (1 / 93)) == 92 in floating point: Opacus takes 92 steps and records q = 1/92
    assert poisson_batches(rows=9300, batch_size=100) == (93, 1 / 92, 92)
    with pytest.raises(PrivacyError):
        poisson_batches(rows=1, batch_size=1)


def test_plan_node_dp_covers_all_rounds_within_target() -> None:
    plan = plan_node_dp(
        rows=3000,
        batch_size=128,
        local_epochs=2,
        rounds=3,
        target_epsilon=2.0,
        delta=DELTA,
        accountant="prv",
        margin=0.98,
    )
    assert plan.loader_batches == math.ceil(3000 / 128)
    assert plan.sample_rate == 1 / plan.steps_per_epoch < 1
    assert plan.expected_batch_size <= 128
    assert math.ceil(plan.rows / plan.loader_batch_size) == plan.loader_batches
    assert plan.steps_per_round == 2 * plan.steps_per_epoch
    assert plan.total_steps == 3 * plan.steps_per_round
    # the whole task: within margin * target, and near it
    assert 0.98 * 2.0 - 0.01 <= plan.planned_epsilon <= 0.98 * 2.0
    full = epsilon_from_history(history=plan.history_after(3), delta=DELTA, accountant="prv")
    assert full == pytest.approx(plan.planned_epsilon, abs=1e-9)
    by_round = [plan.round_entry()] * 3
    assert epsilon_from_history(history=by_round, delta=DELTA, accountant="prv") == pytest.approx(full, abs=1e-6)
    # a fourth round would break the target
    assert epsilon_from_history(history=plan.history_after(4), delta=DELTA, accountant="prv") > 2.0


def test_plan_node_dp_errors() -> None:
    kwargs = dict(
        batch_size=64, local_epochs=1, rounds=3, target_epsilon=2.0, delta=DELTA, accountant="prv", margin=0.98
    )
    with pytest.raises(PrivacyError):
        plan_node_dp(rows=1, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(PrivacyError):
        plan_node_dp(rows=1000, **{**kwargs, "margin": 0.0})  # type: ignore[arg-type]
    with pytest.raises(PrivacyError):
        plan_node_dp(rows=1000, **{**kwargs, "rounds": 0})  # type: ignore[arg-type]
