"""Local DP-SGD rounds: learning, accounting across rounds and processes, the hard cap, modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from fedgov.config.task import ModelSpec, PrivacySpec, TrainingSpec
from fedgov.errors import ModelError, PrivacyError
from fedgov.models import build_model, get_state, set_state
from fedgov.privacy import DPPlan, epsilon_for, epsilon_from_history, plan_node_dp, poisson_batches
from fedgov.models import evaluate
from fedgov.node.training import train_dp_round, train_nonprivate_round

ROWS, FEATURES, BATCH, ROUNDS, TARGET, DELTA = 2000, 10, 100, 3, 3.0, 1e-5


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """Linearly separable with a margin; about 70% in class 0."""
    rng = np.random.default_rng(42)
    X = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
    w = rng.normal(size=FEATURES)
    score = X @ w
    y = (score > np.quantile(score, 0.7)).astype(np.int64)
    return X, y


@pytest.fixture(scope="module")
def training() -> TrainingSpec:
    return TrainingSpec(rounds=ROUNDS, local_epochs=1, batch_size=BATCH, learning_rate=0.5)


@pytest.fixture(scope="module")
def privacy() -> PrivacySpec:
    return PrivacySpec(target_epsilon=TARGET, delta=DELTA, max_grad_norm=1.0)


@pytest.fixture(scope="module")
def plan() -> DPPlan:
    return plan_node_dp(
        rows=ROWS,
        batch_size=BATCH,
        local_epochs=1,
        rounds=ROUNDS,
        target_epsilon=TARGET,
        delta=DELTA,
        accountant="prv",
        margin=0.98,
    )


@pytest.fixture(scope="module")
def rdp_privacy() -> PrivacySpec:
    return PrivacySpec(target_epsilon=TARGET, delta=DELTA, accountant="rdp")


@pytest.fixture(scope="module")
def rdp_plan() -> DPPlan:
    """RDP is much cheaper to evaluate than PRV: used where the accountant is not the point."""
    return plan_node_dp(
        rows=ROWS,
        batch_size=BATCH,
        local_epochs=1,
        rounds=ROUNDS,
        target_epsilon=TARGET,
        delta=DELTA,
        accountant="rdp",
        margin=0.98,
    )


def _model(name: str = "logreg", seed: int = 0) -> nn.Module:
    return build_model(ModelSpec(name=name, hidden=[16]), n_features=FEATURES, n_classes=2, seed=seed)


def test_dp_rounds_learn_and_epsilon_adds_up(data, training, privacy, plan) -> None:
    X, y = data
    majority = max(np.mean(y), 1 - np.mean(y))
    model = _model()
    history: list = []
    for r in range(1, ROUNDS + 1):
        result = train_dp_round(model, X, y, training=training, privacy=privacy, plan=plan, history=history, seed=r)
        history = result.history
        assert result.steps == plan.steps_per_round
        assert result.num_examples == ROWS
        assert history == plan.history_after(r)  # so epsilon is that of r rounds of the plan
    assert result.epsilon == pytest.approx(
        epsilon_from_history(history=plan.history_after(ROUNDS), delta=DELTA, accountant="prv"), abs=1e-9
    )
    assert result.epsilon == pytest.approx(plan.planned_epsilon, abs=1e-9)
    assert result.epsilon <= 0.98 * TARGET
    metrics = evaluate(model, X, y)
    assert metrics.accuracy > majority + 0.15
    # the returned state is the plain model's, and is what the model now holds
    assert set(result.state) == {"0.weight", "0.bias"}
    assert all(np.array_equal(v, get_state(model)[k]) for k, v in result.state.items())
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())


def test_two_separate_calls_equal_one_uninterrupted_run(data, training, privacy, plan) -> None:
    """Round 2 runs 'elsewhere': new model object, ledger passed on as JSON."""
    X, y = data
    first = train_dp_round(_model(), X, y, training=training, privacy=privacy, plan=plan, history=[], seed=1)
    ledger = json.loads(json.dumps(first.history))
    second_model = _model(seed=99)
    set_state(second_model, first.state)
    second = train_dp_round(
        second_model,
        X,
        y,
        training=training,
        privacy=privacy,
        plan=plan,
        history=[tuple(e) for e in ledger],
        seed=2,
    )
    one_run = epsilon_for(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=2 * plan.steps_per_round,
        delta=DELTA,
    )
    assert second.epsilon == pytest.approx(one_run, abs=1e-9)
    assert first.epsilon < second.epsilon <= TARGET


def test_hard_cap_refuses_a_round_beyond_the_plan(data, training, privacy, plan) -> None:
    X, y = data
    model = _model()
    before = get_state(model)
    with pytest.raises(PrivacyError, match="refusing to train"):
        train_dp_round(
            model,
            X,
            y,
            training=training,
            privacy=privacy,
            plan=plan,
            history=plan.history_after(plan.rounds),
            seed=0,
        )
    assert all(np.array_equal(before[k], v) for k, v in get_state(model).items())


@pytest.mark.parametrize("optimizer", [{}, {"momentum": 0.9}, {"optimizer": "adam", "learning_rate": 0.01}])
def test_fused_equals_opacus_hooks_and_ghost_number_for_number(data, rdp_plan, optimizer) -> None:
    """fedgov's fused clipping, drawing batches and noise as Opacus does, gives Opacus' own round."""
    X, y = data
    training = TrainingSpec(rounds=ROUNDS, batch_size=BATCH, **({"learning_rate": 0.5} | optimizer))
    for name in ("logreg", "mlp"):
        states = {}
        for mode in ("fused", "hooks", "ghost"):
            privacy = PrivacySpec(target_epsilon=TARGET, delta=DELTA, grad_sample_mode=mode, accountant="rdp")
            result = train_dp_round(
                _model(name), X, y, training=training, privacy=privacy, plan=rdp_plan, history=[], seed=5,
                replay_opacus=mode == "fused",
            )
            assert result.epsilon is not None and result.epsilon <= TARGET
            assert result.steps == rdp_plan.steps_per_round
            states[mode] = result.state
        for k in states["hooks"]:  # same clipping and noise, computed three ways
            np.testing.assert_allclose(states["fused"][k], states["hooks"][k], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(states["ghost"][k], states["hooks"][k], rtol=1e-4, atol=1e-5)
        start = get_state(_model(name))
        assert not np.allclose(states["fused"]["0.weight"], start["0.weight"])  # it did train


def test_the_fast_plain_sgd_step_is_the_optimizers_step(data, training, rdp_plan, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedgov.node.training as T

    X, y = data
    privacy = PrivacySpec(target_epsilon=TARGET, delta=DELTA, accountant="rdp")
    states = []
    for fast in (True, False):
        monkeypatch.setattr(T, "_FAST_PLAIN_SGD", fast)
        states.append(train_dp_round(_model("mlp"), X, y, training=training, privacy=privacy, plan=rdp_plan, history=[], seed=9).state)
    for k in states[0]:
        np.testing.assert_allclose(states[0][k], states[1][k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(states[0]["0.weight"], get_state(_model("mlp"))["0.weight"])


def test_auto_is_fused_and_the_same_seed_gives_the_same_round(data, training, rdp_plan) -> None:
    from fedgov.node.training import _grad_sample_mode

    X, y = data
    assert _grad_sample_mode(_model("mlp"), "auto") == "fused"
    assert _grad_sample_mode(_model("logreg"), "auto") == "fused"
    privacy = PrivacySpec(target_epsilon=TARGET, delta=DELTA, accountant="rdp")
    a = train_dp_round(_model("mlp"), X, y, training=training, privacy=privacy, plan=rdp_plan, history=[], seed=5)
    b = train_dp_round(_model("mlp"), X, y, training=training, privacy=privacy, plan=rdp_plan, history=[], seed=5)
    c = train_dp_round(_model("mlp"), X, y, training=training, privacy=privacy, plan=rdp_plan, history=[], seed=6)
    assert all(np.array_equal(a.state[k], b.state[k]) for k in a.state)
    assert not np.array_equal(c.state["0.weight"], a.state["0.weight"])
    assert a.history == [rdp_plan.round_entry()] and a.accounting_seconds > 0


def test_a_model_fused_cannot_take_goes_to_opacus(data, training, rdp_plan) -> None:
    from fedgov.node.training import _grad_sample_mode

    X, y = data
    odd = nn.Sequential(nn.Linear(FEATURES, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    assert _grad_sample_mode(odd, "auto") == "ghost"
    assert _grad_sample_mode(nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, 2)), "auto") == "hooks"
    fused = PrivacySpec(target_epsilon=TARGET, delta=DELTA, accountant="rdp", grad_sample_mode="fused")
    with pytest.raises(ModelError, match="fused"):
        train_dp_round(odd, X, y, training=training, privacy=fused, plan=rdp_plan, history=[], seed=1)
    auto = PrivacySpec(target_epsilon=TARGET, delta=DELTA, accountant="rdp")
    result = train_dp_round(odd, X, y, training=training, privacy=auto, plan=rdp_plan, history=[], seed=1)
    assert np.isfinite(result.train_loss) and result.steps == rdp_plan.steps_per_round


@pytest.mark.statistical
def test_seed_none_draws_fresh_randomness(data, training, rdp_privacy, rdp_plan) -> None:
    X, y = data
    a = train_dp_round(_model(), X, y, training=training, privacy=rdp_privacy, plan=rdp_plan, history=[], seed=None)
    b = train_dp_round(_model(), X, y, training=training, privacy=rdp_privacy, plan=rdp_plan, history=[], seed=None)
    assert not np.array_equal(a.state["0.weight"], b.state["0.weight"])


def test_fedprox_pulls_towards_the_global_model(data, rdp_privacy, rdp_plan) -> None:
    X, y = data
    privacy, plan = rdp_privacy, rdp_plan
    global_state = get_state(_model())

    def distance(state: dict) -> float:
        return float(sum(np.sum((state[k] - global_state[k]) ** 2) for k in state))

    fedavg = TrainingSpec(rounds=ROUNDS, batch_size=BATCH, learning_rate=0.5)
    fedprox = TrainingSpec(rounds=ROUNDS, batch_size=BATCH, learning_rate=0.5, strategy="fedprox", proximal_mu=1.0)
    for train in (
        lambda spec: train_dp_round(
            _model(), X, y, training=spec, privacy=privacy, plan=plan, history=[], seed=3, global_state=global_state
        ),
        lambda spec: train_nonprivate_round(_model(), X, y, training=spec, seed=3, global_state=global_state),
    ):
        plain, prox = train(fedavg), train(fedprox)
        assert np.isfinite(prox.train_loss)
        assert distance(prox.state) < 0.8 * distance(plain.state)


def test_optimizers_adam_and_momentum(data, rdp_privacy, rdp_plan) -> None:
    X, y = data
    privacy, plan = rdp_privacy, rdp_plan
    for spec in (
        TrainingSpec(rounds=ROUNDS, batch_size=BATCH, learning_rate=0.05, optimizer="adam"),
        TrainingSpec(rounds=ROUNDS, batch_size=BATCH, learning_rate=0.2, momentum=0.9),
    ):
        result = train_dp_round(_model(), X, y, training=spec, privacy=privacy, plan=plan, history=[], seed=0)
        assert result.steps == plan.steps_per_round and np.isfinite(result.train_loss)


def test_nonprivate_round(data, training) -> None:
    X, y = data
    model = _model()
    result = train_nonprivate_round(model, X, y, training=training, seed=0)
    assert result.epsilon is None and result.history == []
    assert result.steps == ROWS // BATCH
    assert evaluate(model, X, y).accuracy > 0.9


def test_plan_must_fit_the_round(data, training, privacy, plan) -> None:
    X, y = data
    # plan.rows is the node's released (noisy) row count, not len(X): a true count that differs
    # from it trains with the plan's steps and sample rate (nothing scaled by the true count)
    res = train_dp_round(_model(), X[:1500], y[:1500], training=training, privacy=privacy, plan=plan, history=[], seed=0)
    assert plan.rows == 2000 and res.steps == plan.steps_per_epoch * plan.local_epochs
    assert res.history == [(plan.noise_multiplier, plan.sample_rate, res.steps)]
    with pytest.raises(PrivacyError, match="batch size"):
        other = TrainingSpec(batch_size=50)
        train_dp_round(_model(), X, y, training=other, privacy=privacy, plan=plan, history=[], seed=0)
    with pytest.raises(PrivacyError, match="enabled is false"):
        off = PrivacySpec(enabled=False, target_epsilon=TARGET, delta=DELTA)
        train_dp_round(_model(), X, y, training=training, privacy=off, plan=plan, history=[], seed=0)


def test_model_opacus_rejects_is_refused(data, training, privacy, plan) -> None:
    X, y = data
    model = nn.Sequential(nn.Linear(FEATURES, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ModelError, match="make_dp_compatible"):
        train_dp_round(model, X, y, training=training, privacy=privacy, plan=plan, history=[], seed=0)


def test_plan_matches_opacus_where_one_over_one_over_n_rounds_down() -> None:
    """93 loader batches: Opacus samples at 1/93 but takes 92 steps and records q = 1/92."""
    rows, batch = 9300, 100
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, 3)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    batches, q, steps = poisson_batches(rows=rows, batch_size=batch)
    assert (batches, q, steps) == (93, 1 / 92, 92)
    plan = DPPlan(  # by hand, skipping the calibration: only the sampling matters here
        rows=rows,
        batch_size=batch,
        local_epochs=1,
        rounds=2,
        target_epsilon=5.0,
        delta=DELTA,
        accountant="rdp",
        margin=0.98,
        loader_batches=batches,
        sample_rate=q,
        steps_per_epoch=steps,
        steps_per_round=steps,
        total_steps=2 * steps,
        noise_multiplier=1.0,
        planned_epsilon=0.0,
    )
    model = build_model(ModelSpec(name="logreg"), n_features=3, n_classes=2, seed=0)
    result = train_dp_round(
        model,
        X,
        y,
        training=TrainingSpec(batch_size=batch),
        privacy=PrivacySpec(target_epsilon=5.0, delta=DELTA, accountant="rdp"),
        plan=plan,
        history=[],
        seed=0,
    )
    assert result.steps == 92
    assert result.history == [(plan.noise_multiplier, 1 / 92, 92)]


def test_evaluate_metrics() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 2)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[:] = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
        model.bias.zero_()
    model.train()
    m = evaluate(model, X, y, batch_size=64)
    assert model.training  # mode restored
    assert m.n == 300 and m.accuracy == pytest.approx(1.0)
    with torch.no_grad():
        proba = torch.softmax(model(torch.as_tensor(X)), 1)[:, 1].numpy()
        loss = nn.functional.cross_entropy(model(torch.as_tensor(X)), torch.as_tensor(y)).item()
    assert m.auc == pytest.approx(roc_auc_score(y, proba))
    assert m.loss == pytest.approx(loss, rel=1e-5)
    one_class = evaluate(model, X[y == 1], y[y == 1])
    assert one_class.auc is None and "auc" not in one_class.to_metrics()
    # multiclass: macro one-vs-rest over the classes present
    multi = nn.Linear(2, 3)
    y3 = np.digitize(X[:, 0], [-0.5, 0.5]).astype(np.int64)
    m3 = evaluate(multi, X, y3)
    with torch.no_grad():
        p3 = torch.softmax(multi(torch.as_tensor(X)), 1).numpy().astype(np.float64)
    assert m3.auc == pytest.approx(roc_auc_score(y3, p3, multi_class="ovr", average="macro"))
    with pytest.raises(ModelError, match="labels"):
        evaluate(model, X, y3)
