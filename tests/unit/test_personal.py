"""A node's personal model (fedgov.node.personal): the validation split, the choice between the
global and the fine-tuned model, and the store in the node directory."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgov.config import Contract, ModelSpec, Task
from fedgov.errors import FedgovError
from fedgov.models import build_model, evaluate, get_state, set_state
from fedgov.node.personal import MIN_VALIDATION_ROWS, PersonalModels, personalise, validation_split
from fedgov.node.training import fine_tune


@given(n=st.integers(0, 400), seed=st.integers(0, 2**31), node=st.sampled_from(["GM0363", "GM0599", "GM0014"]))
@settings(max_examples=60, deadline=None)
def test_the_validation_split_is_a_deterministic_partition_per_node(n: int, seed: int, node: str) -> None:
    fit, val = validation_split(n, node=node, seed=seed, fraction=0.2)
    assert sorted([*fit.tolist(), *val.tolist()]) == list(range(n))
    assert len(val) == round(0.2 * n)
    again = validation_split(n, node=node, seed=seed, fraction=0.2)
    assert fit.tolist() == again[0].tolist() and val.tolist() == again[1].tolist()


def test_the_split_differs_between_nodes() -> None:
    a = validation_split(500, node="GM0363", seed=7, fraction=0.2)[1]
    b = validation_split(500, node="GM0599", seed=7, fraction=0.2)[1]
    assert a.tolist() != b.tolist()


def _shifted(n: int, bias: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a logistic model whose intercept is ``bias``: a node whose base rate differs."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    y = (X @ np.array([1.5, -1.0, 0.5, 0.0]) + bias + rng.logistic(size=n) > 0).astype(np.int64)
    return X, y


def _task(**personal: object) -> Task:
    return Task.model_validate({"name": "t", "contract": "c.toml", "training": {"seed": 3}, "personal": personal})


def _global_state(seed: int = 0) -> dict[str, np.ndarray]:
    model = build_model(ModelSpec(name="logreg"), n_features=4, n_classes=2, seed=0)
    X, y = _shifted(2000, 0.0, seed)  # the federation's model: trained where the base rate is even
    Xv, yv = _shifted(200, 0.0, seed + 1)
    return fine_tune(model, X, y, Xv, yv, epochs=5, learning_rate=0.5, batch_size=64, seed=1).state


def test_fine_tuning_is_never_worse_than_its_start_on_the_validation_rows() -> None:
    g = _global_state()
    for bias, seed in ((0.0, 5), (-3.0, 6), (2.0, 7)):
        X, y = _shifted(300, bias, seed)
        model = build_model(ModelSpec(name="logreg"), n_features=4, n_classes=2, seed=0)
        set_state(model, g)
        res = fine_tune(model, X[:240], y[:240], X[240:], y[240:], epochs=8, learning_rate=0.3, batch_size=32, seed=seed)
        assert (res.val_accuracy, -res.val_loss) >= (res.start_accuracy, -res.start_loss)
        if res.epoch == 0:
            assert all(np.array_equal(res.state[k], g[k]) for k in g)


def test_a_node_whose_base_rate_differs_gets_a_fine_tuned_model_that_is_better_on_its_test_rows() -> None:
    g = _global_state()
    X, y = _shifted(1500, -3.0, 11)  # far fewer positives than the federation's
    Xt, yt = _shifted(2000, -3.0, 12)
    personal = personalise(_task(), g, X, y, node="GM0599", n_features=4, n_classes=2)
    assert personal.variant == "fine-tuned" and personal.epochs >= 1
    assert personal.val_accuracy is not None and personal.val_accuracy_global is not None
    assert personal.val_accuracy > personal.val_accuracy_global
    assert personal.val_rows == 450 and personal.fit_rows == 1050
    model = build_model(ModelSpec(name="logreg"), n_features=4, n_classes=2, seed=0)
    set_state(model, g)
    before = evaluate(model, Xt, yt).accuracy
    set_state(model, personal.state)
    # measured: 0.70 -> 0.89 (the seeds fix it); the bound is far from both
    assert evaluate(model, Xt, yt).accuracy > before + 0.05


def test_too_few_rows_keep_the_global_model() -> None:
    g = _global_state()
    X, y = _shifted(3 * MIN_VALIDATION_ROWS - 2, 0.0, 3)  # 4 validation rows at 0.3
    personal = personalise(_task(), g, X, y, node="GM0589", n_features=4, n_classes=2)
    assert personal.variant == "global" and "too few" in personal.reason
    assert all(np.array_equal(personal.state[k], g[k]) for k in g)


def _save(home: Path, task_id: str = "t-abc-7", variant: str = "fine-tuned") -> PersonalModels:
    from fedgov.node.personal import PersonalModel

    g = _global_state()
    store = PersonalModels(home)
    contract = Contract.model_validate({"name": "adult-income", "version": "1.0", "columns": [{"name": "x", "type": "float", "min": 0, "max": 1}]})
    store.save(
        task=_task(), contract=contract, task_id=task_id, dataset="adult", data_sha256="d" * 64, global_sha256="g" * 64,
        personal=PersonalModel(g, variant, 3 if variant == "fine-tuned" else 0, 40, 160, 0.8, 0.85, "why"),  # type: ignore[arg-type]
    )
    return store


def test_the_store_keeps_weights_and_provenance_readable_only_by_the_node(tmp_path: Path) -> None:
    store = _save(tmp_path)
    (rec,) = store.records()
    assert rec.task == "t" and rec.task_id == "t-abc-7" and rec.run == "7" and rec.variant == "fine-tuned"
    assert rec.contract == "adult-income@1.0" and rec.dataset == "adult" and rec.global_sha256 == "g" * 64
    weights = store.weights(rec)
    assert set(weights) == set(_global_state())
    for p in (Path(rec.path), Path(rec.path).with_suffix(".json")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert store.find("t").key == rec.key == store.find(rec.key[:6]).key == store.find("t-abc-7").key
    with pytest.raises(FedgovError, match="no personal model 'nope'.*kept: .*\\(t\\)"):
        store.find("nope")
    assert get_state(build_model(ModelSpec(name="logreg"), n_features=4, n_classes=2, seed=0)).keys() == weights.keys()
