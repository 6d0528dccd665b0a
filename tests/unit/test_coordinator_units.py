"""Pieces of the coordinator that need no running federation."""

from __future__ import annotations

import math
from typing import Any

from flwr.app import MetricRecord, RecordDict

import pytest

from fedgov.coordinator.aggregation import aggregate_metrics
from fedgov.coordinator.grid import AdmittedGrid, wait_for_nodes
from fedgov.errors import FederationError


class FakeGrid:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return list(self.ids)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        return list(messages)


def test_admitted_grid_offers_only_admitted_nodes() -> None:
    g = AdmittedGrid(FakeGrid([1, 2, 3, 4]), admitted=[2, 4, 9])  # type: ignore[arg-type]
    assert sorted(g.get_node_ids()) == [2, 4]


def test_wait_for_nodes_is_bounded() -> None:
    fake = FakeGrid([1])
    assert wait_for_nodes(fake, expected=3, timeout=1.0) == [1]  # type: ignore[arg-type]
    assert fake.calls >= 2
    assert wait_for_nodes(FakeGrid([1, 2, 3]), expected=3, timeout=100.0) == [1, 2, 3]  # type: ignore[arg-type]


def test_metric_aggregation_skips_nan_and_weights_by_examples() -> None:
    recs = [
        RecordDict({"m": MetricRecord({"num-examples": 100, "accuracy": 0.9, "auc": 0.8})}),
        RecordDict({"m": MetricRecord({"num-examples": 300, "accuracy": 0.5, "auc": float("nan")})}),
    ]
    out = aggregate_metrics(recs, "num-examples")
    assert math.isclose(float(out["accuracy"]), 0.6)
    assert math.isclose(float(out["auc"]), 0.8)
    assert "num-examples" not in out


def test_admitted_grid_stops_waiting_for_missing_nodes() -> None:
    fake = FakeGrid([1, 2, 3])
    g = AdmittedGrid(fake, admitted=[1, 2, 3], min_nodes=2, patience=0.3)  # type: ignore[arg-type]
    assert sorted(g.get_node_ids()) == [1, 2, 3]
    fake.ids = [1]  # two nodes died
    assert list(g.get_node_ids()) == [1]  # within patience: Flower may keep polling
    fake.ids = [1, 3]  # one came back: the clock restarts
    assert sorted(g.get_node_ids()) == [1, 3]
    fake.ids = [1]
    g.get_node_ids()
    import time

    time.sleep(0.4)
    with pytest.raises(FederationError, match="only 1 of the 3 admitted nodes are online"):
        g.get_node_ids()
