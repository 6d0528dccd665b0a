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


def test_each_nodes_epsilon_says_what_it_means_per_citizen() -> None:
    """A node's report line names the unit of its epsilon from public facts only: per
    municipality (and so per citizen) under distributed DP; per record under DP-SGD, which is
    per citizen when the contract names no person identifier and k times that for a citizen
    with k records when it does; nothing for a node that took no part."""
    from pathlib import Path

    from fedgov.config import load_contract, load_task
    from fedgov.coordinator.run import per_citizen

    root = Path(__file__).resolve().parents[2]
    task, contract = load_task(root / "configs" / "tasks" / "adult-income.toml")
    distributed, _ = load_task(root / "configs" / "tasks" / "nl-342-distributed.toml")
    wmo = load_contract(root / "configs" / "contracts" / "iwmo-wmo.toml")
    assert contract.person_id is None and wmo.person_id is not None
    text = per_citizen(distributed, contract, 1.0, 1e-5)
    assert "epsilon 1.00 (delta 1e-05)" in text and "municipality's whole data set" in text and "every citizen" in text
    text = per_citizen(task, contract, 1.95, 1e-5)
    assert "epsilon 1.95 (delta 1e-05) per record" in text and "no person identifier" in text
    text = per_citizen(task, wmo, 0.5, None)
    assert "epsilon 0.50 per record" in text and f"k records ({wmo.person_id})" in text and "k times" in text
    off = task.model_copy(update={"privacy": task.privacy.model_copy(update={"enabled": False})})
    assert per_citizen(off, contract, None, None).startswith("no differential privacy")
    assert per_citizen(task, contract, None, None) == ""
