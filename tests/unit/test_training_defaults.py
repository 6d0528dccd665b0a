"""Defaults chosen for DP training: batch size, local epochs and learning rate left unset in a task
are resolved at the node from its (released) row count, the same way in its plan and its training."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgov.config.task import (
    AUTO_ADAM_LEARNING_RATE,
    AUTO_BATCH_SIZE,
    AUTO_DP_LEARNING_RATE,
    AUTO_LEARNING_RATE,
    AUTO_MAX_EPOCHS,
    AUTO_MIN_BATCH,
    AUTO_MIN_STEPS,
    AUTO_MIN_STEPS_FREE,
    PrivacySpec,
    TrainingSpec,
)
from fedgov.privacy.accounting import poisson_batches


def test_explicit_settings_are_kept() -> None:
    spec = TrainingSpec(batch_size=64, local_epochs=2, learning_rate=0.3)
    assert spec.resolved(10_000, dp_sgd=True) == spec
    assert spec.resolved(10, dp_sgd=False) == spec


def test_a_large_node_takes_one_epoch_of_full_batches() -> None:
    r = TrainingSpec().resolved(8_594, dp_sgd=True)
    assert (r.batch, r.epochs, r.lr) == (AUTO_BATCH_SIZE, 1, AUTO_DP_LEARNING_RATE)


def test_a_small_node_takes_smaller_batches_and_more_epochs() -> None:
    r = TrainingSpec().resolved(128, dp_sgd=True)
    assert r.batch == 32  # a quarter of its rows
    assert r.epochs == 3 and r.epochs * poisson_batches(rows=128, batch_size=r.batch)[2] >= AUTO_MIN_STEPS


def test_where_local_steps_spend_no_privacy_a_small_node_works_longer() -> None:
    private = TrainingSpec().resolved(190, dp_sgd=True)
    free = TrainingSpec().resolved(190, dp_sgd=False)  # distributed DP, or none: noise once on the sum
    assert free.batch == private.batch == 47
    assert free.epochs * 5 >= AUTO_MIN_STEPS_FREE > private.epochs * 5  # 5 batches an epoch
    assert free.lr == AUTO_LEARNING_RATE > 1 and private.lr == AUTO_DP_LEARNING_RATE


def test_learning_rate_depends_on_dp_sgd_and_the_optimizer() -> None:
    assert TrainingSpec().resolved(1000, dp_sgd=False).lr == AUTO_LEARNING_RATE
    assert TrainingSpec(optimizer="adam").resolved(1000, dp_sgd=True).lr == AUTO_ADAM_LEARNING_RATE
    assert TrainingSpec(learning_rate=0.2).resolved(1000, dp_sgd=True).lr == 0.2


def test_an_unresolved_spec_says_so() -> None:
    with pytest.raises(ValueError, match="resolve"):
        _ = TrainingSpec().lr
    with pytest.raises(ValueError, match="resolve"):
        _ = TrainingSpec().epochs
    with pytest.raises(ValueError, match="resolve"):
        _ = TrainingSpec().batch


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(min_value=2, max_value=2_000_000), dp=st.booleans())
def test_resolved_settings_stay_in_bounds(rows: int, dp: bool) -> None:
    r = TrainingSpec().resolved(rows, dp_sgd=dp)
    assert AUTO_MIN_BATCH <= r.batch <= AUTO_BATCH_SIZE
    assert 1 <= r.epochs <= AUTO_MAX_EPOCHS
    per_epoch = max(2, math.ceil(rows / r.batch)) if dp else max(1, math.ceil(rows / r.batch))
    assert r.epochs * per_epoch >= (AUTO_MIN_STEPS if dp else AUTO_MIN_STEPS_FREE) or r.epochs == AUTO_MAX_EPOCHS
    assert r.resolved(rows, dp_sgd=dp) == r  # resolving twice changes nothing


def test_the_plan_and_the_round_resolve_alike() -> None:
    from fedgov.config import Task
    from fedgov.models import build_model, make_dp_compatible
    from fedgov.node.training import train_dp_round
    from fedgov.privacy.plans import node_plan

    task = Task(
        name="t", contract="c.toml", training=TrainingSpec(rounds=2, seed=1),
        privacy=PrivacySpec(target_epsilon=2.0, delta=1e-5),
    )
    rows = 300  # the released count; the true count may differ
    plan = node_plan(task, rows)
    expected = task.training.resolved(rows, dp_sgd=True)
    assert (plan.batch_size, plan.local_epochs) == (expected.batch, expected.epochs)
    rng = np.random.default_rng(0)
    X = rng.random((310, 5)).astype(np.float32)
    y = (X[:, 0] > 0.5).astype(np.int64)
    model = make_dp_compatible(build_model(task.model, n_features=5, n_classes=2, seed=0))
    res = train_dp_round(model, X, y, training=task.training, privacy=task.privacy, plan=plan, history=[], seed=3)
    assert res.steps == plan.steps_per_round and res.epsilon is not None and res.epsilon <= 2.0
