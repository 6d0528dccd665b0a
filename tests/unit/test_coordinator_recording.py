"""The recording wrapper: it delegates every call to the strategy it holds, with the run's round
numbers, and records and screens what passes (on real Flower messages, no processes)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.task_identity import TaskIdentity

from fedgov.coordinator.events import EventWriter
from fedgov.coordinator.recording import Recorder, Recording

GLOBAL = {"w": np.zeros((2, 3), dtype=np.float32)}


pytestmark = pytest.mark.usefixtures("task_identity")  # Flower stamps the messages these tests build


def _reply(node_id: int, arrays: dict[str, np.ndarray] | None = None, *, error: str | None = None, kind: str = MessageType.TRAIN) -> Message:
    TaskIdentity.node_id = 0
    ins = Message(RecordDict({}), dst_node_id=node_id, message_type=kind)
    TaskIdentity.node_id = node_id
    if error is not None:
        return Message(Error(code=500, reason=error), reply_to=ins)
    content = RecordDict({"metrics": MetricRecord({"num-examples": 10, "correct": 8.0, "total": 10.0})})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return Message(content, reply_to=ins)


class Inner(Strategy):
    """A strategy that only notes what it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, list[int]]] = []
        self.summarised = False

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.calls.append(("configure_train", server_round, []))
        return [Message(RecordDict({}), dst_node_id=n, message_type=MessageType.TRAIN) for n in grid.get_node_ids()]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.calls.append(("aggregate_train", server_round, [m.metadata.src_node_id for m in replies]))
        return None, None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.calls.append(("configure_evaluate", server_round, []))
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        self.calls.append(("aggregate_evaluate", server_round, [m.metadata.src_node_id for m in replies]))
        return MetricRecord({"accuracy": 1.0})

    def summary(self) -> None:
        self.summarised = True


class FakeGrid:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


def _grid(ids: list[int]) -> Grid:
    """A grid that only lists its nodes (all the wrapper and ``Inner`` ask of it)."""
    return cast(Grid, FakeGrid(ids))


def _recording(tmp: Path, **kw: Any) -> tuple[Recording, Inner, Recorder]:
    inner = Inner()
    recorder = Recorder({1: "GM0363", 2: "GM0344", 3: "GM0150"}, EventWriter(tmp / "events.jsonl"))
    return Recording(inner, recorder, **kw), inner, recorder


def test_every_call_reaches_the_strategy_with_the_runs_round_number(tmp_path: Path) -> None:
    rec, inner, recorder = _recording(tmp_path, round_offset=2, evaluate_rounds=None)
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    msgs = list(rec.configure_train(1, arrays, ConfigRecord(), _grid([1, 2])))
    assert [m.metadata.dst_node_id for m in msgs] == [1, 2]
    rec.aggregate_train(1, [_reply(1, GLOBAL), _reply(2, GLOBAL)])
    rec.configure_evaluate(1, arrays, ConfigRecord(), _grid([1, 2]))
    assert rec.aggregate_evaluate(1, [_reply(1, kind=MessageType.EVALUATE)]) == MetricRecord({"accuracy": 1.0})
    rec.summary()
    assert [(c, r) for c, r, _ in inner.calls] == [
        ("configure_train", 3), ("aggregate_train", 3), ("configure_evaluate", 3), ("aggregate_evaluate", 3),
    ]
    assert inner.summarised
    r3 = recorder.rounds[3]
    assert r3.nodes_asked == ["GM0344", "GM0363"] and r3.nodes_trained == ["GM0363", "GM0344"]
    assert r3.nodes_evaluated == ["GM0363"] and r3.federated_accuracy == pytest.approx(0.8)


def test_updates_are_screened_before_the_strategy_sees_them(tmp_path: Path) -> None:
    rec, inner, recorder = _recording(tmp_path, max_update_norm=1.0)
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    rec.configure_train(1, arrays, ConfigRecord(), _grid([1, 2, 3]))
    ok = _reply(1, {"w": GLOBAL["w"] + 0.1})
    nan = _reply(2, {"w": np.full((2, 3), np.nan, dtype=np.float32)})
    far = _reply(3, {"w": GLOBAL["w"] + 10.0})
    rec.aggregate_train(1, [ok, nan, far])
    assert inner.calls[-1] == ("aggregate_train", 1, [1])
    rm = recorder.rounds[1]
    assert set(rm.nodes_rejected) == {"GM0344", "GM0150"}
    assert "NaN" in rm.nodes_rejected["GM0344"] and "training.max_update_norm" in rm.nodes_rejected["GM0150"]


def test_a_silent_node_and_an_error_are_failures_of_the_round(tmp_path: Path) -> None:
    rec, inner, recorder = _recording(tmp_path, reply_timeout=7.0)
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    rec.configure_train(1, arrays, ConfigRecord(), _grid([1, 2, 3]))
    rec.aggregate_train(1, [_reply(1, GLOBAL), _reply(2, error="refused: budget")])
    rm = recorder.rounds[1]
    assert rm.nodes_failed == {"GM0344": "refused: budget", "GM0150": "no reply within 7 s (training.reply_timeout)"}
    assert rm.nodes_trained == ["GM0363"]


def test_nodes_evaluate_only_in_the_planned_rounds(tmp_path: Path) -> None:
    rec, inner, _ = _recording(tmp_path, evaluate_rounds={3})
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    assert list(rec.configure_evaluate(2, arrays, ConfigRecord(), _grid([1]))) == []
    assert inner.calls == []
    rec.configure_evaluate(3, arrays, ConfigRecord(), _grid([1]))
    assert inner.calls == [("configure_evaluate", 3, [])]
    # only errors: nothing to aggregate, the strategy is not asked
    assert rec.aggregate_evaluate(3, [_reply(1, error="down")]) is None
    assert inner.calls == [("configure_evaluate", 3, [])]
