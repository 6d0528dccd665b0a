"""fedgov's index of Flower's simulation messages (fedgov.coordinator.simengine): each virtual
node's lookup answers exactly what Flower's own scan of every message answers, in the same
order, with the same expiry and delivery marks, on Flower's real in-memory link state."""

from __future__ import annotations

import time
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedgov.coordinator.simengine import index_pending_messages


def _grid(run_id: int) -> tuple[InMemoryGrid, list[int]]:
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id)
    run.primary_task_id = 100 + run_id
    run.federation_id = NOOP_FEDERATION_ID
    assert isinstance(state, InMemoryLinkState)
    state.run_ids[run_id] = RunRecord(run=run)  # as Flower's simulation registers its run
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run_id)
    nodes = sorted(_register_nodes(4, factory))
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return grid, nodes


def _push(grid: InMemoryGrid, dst: int, i: int, ttl: float = 3600.0) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    # what Flower's ServerApp process sets for the messages it creates
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = grid.run.run_id, SUPERLINK_NODE_ID, grid.run.primary_task_id
    msg = Message(RecordDict({"c": ConfigRecord({"i": i})}), dst_node_id=dst, message_type="query", ttl=ttl)
    msg.metadata.__dict__["_run_id"] = grid.run.run_id
    assert list(grid.push_messages([msg]))


def _seen(msgs: list[Any]) -> list[tuple[int, int, bool]]:
    return [(m.metadata.dst_node_id, int(m.content["c"]["i"]), m.metadata.delivered_at != "") for m in msgs]


def test_a_node_gets_what_flowers_scan_gives_it(monkeypatch: pytest.MonkeyPatch) -> None:
    original = InMemoryLinkState.get_message_ins
    # the index patches Flower's class: restore it after the test
    monkeypatch.setattr(InMemoryLinkState, "get_message_ins", InMemoryLinkState.get_message_ins)
    monkeypatch.setattr(InMemoryLinkState, "store_message_ins", InMemoryLinkState.store_message_ins)
    monkeypatch.setattr(InMemoryLinkState, "_fedgov_indexed", False, raising=False)
    ours, theirs = _grid(1), _grid(2)
    for grid, nodes in (ours, theirs):
        _push(grid, nodes[0], 1)
        _push(grid, nodes[1], 2)
        _push(grid, nodes[0], 3)
        _push(grid, nodes[2], 4, ttl=0.001)  # expires before anyone asks
    assert index_pending_messages(ours[0]) is True
    assert index_pending_messages(ours[0]) is True  # once
    assert index_pending_messages(object()) is False  # not Flower's in-memory grid: untouched
    time.sleep(0.05)
    for grid, nodes in (ours, theirs):
        _push(grid, nodes[1], 5)  # stored after the index was made
    rounds: dict[str, list[list[tuple[int, int, bool]]]] = {"ours": [], "theirs": []}
    for _ in range(3):
        for name, (grid, nodes), get in (
            ("ours", ours, lambda s, n: s.get_message_ins(node_id=n, limit=1)),
            ("theirs", theirs, lambda s, n: original(s, node_id=n, limit=1)),
        ):
            rounds[name].append([item for n in nodes for item in _seen(get(grid.state, n))])
    # node ids differ between the two link states: compare by position in the node list
    def by_position(grid_nodes: list[int], seen: list[list[tuple[int, int, bool]]]) -> list[list[tuple[int, int, bool]]]:
        return [[(grid_nodes.index(d), i, delivered) for d, i, delivered in r] for r in seen]

    assert by_position(ours[1], rounds["ours"]) == by_position(theirs[1], rounds["theirs"])
    assert by_position(ours[1], rounds["ours"]) == [[(0, 1, True), (1, 2, True)], [(0, 3, True), (1, 5, True)], []]
    # the expired message was deleted by both, as Flower's check does
    for grid, _ in (ours, theirs):
        assert [int(m.content["c"]["i"]) for m in grid.state.message_ins_store.values()] == [1, 2, 3, 5]
    # all of a node's messages at once, without a limit
    _push(ours[0], ours[1][3], 6)
    _push(ours[0], ours[1][3], 7)
    assert [int(m.content["c"]["i"]) for m in ours[0].state.get_message_ins(node_id=ours[1][3], limit=None)] == [6, 7]
