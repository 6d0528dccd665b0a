"""The pure metric aggregation of :mod:`fedgov.coordinator.aggregation` (what Flower's strategies
call as ``train_metrics_aggr_fn`` and ``evaluate_metrics_aggr_fn``)."""

from __future__ import annotations

import math

from flwr.app import MetricRecord, RecordDict
from hypothesis import given
from hypothesis import strategies as st

from fedgov.coordinator.aggregation import aggregate_metrics, metric_values, weighted_nanmean

values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
weights = st.floats(min_value=1e-3, max_value=1e6)


@given(value=values, ws=st.lists(weights, min_size=1, max_size=20))
def test_the_mean_of_one_value_is_that_value(value: float, ws: list[float]) -> None:
    m = weighted_nanmean((value, w) for w in ws)
    assert m is not None and math.isclose(m, value, rel_tol=1e-9, abs_tol=1e-9)


@given(pairs=st.lists(st.tuples(values, weights), min_size=1, max_size=20))
def test_the_mean_lies_between_the_smallest_and_the_largest_value(pairs: list[tuple[float, float]]) -> None:
    m = weighted_nanmean(pairs + [(float("nan"), 5.0), (1e9, 0.0), (-1e9, -1.0)])  # left out
    lo, hi = min(v for v, _ in pairs), max(v for v, _ in pairs)
    assert m is not None and lo - 1e-6 <= m <= hi + 1e-6


def test_nothing_to_average_is_none() -> None:
    assert weighted_nanmean([]) is None
    assert weighted_nanmean([(float("nan"), 1.0), (3.0, 0.0)]) is None


def test_identical_nodes_aggregate_to_their_metrics() -> None:
    rec = {"num-examples": 50, "accuracy": 0.75, "loss": 0.5}
    out = aggregate_metrics([RecordDict({"m": MetricRecord(dict(rec))}) for _ in range(4)], "num-examples")
    assert dict(out) == {"accuracy": 0.75, "loss": 0.5}


def test_a_metric_no_node_could_compute_is_left_out() -> None:
    recs = [RecordDict({"m": MetricRecord({"num-examples": n, "auc": float("nan"), "accuracy": 0.5})}) for n in (10, 20)]
    assert dict(aggregate_metrics(recs, "num-examples")) == {"accuracy": 0.5}


def test_metric_values_are_the_scalars() -> None:
    assert metric_values(MetricRecord({"a": 1, "b": 0.5, "c": [1.0, 2.0]})) == {"a": 1.0, "b": 0.5}
