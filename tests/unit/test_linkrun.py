"""The coordinator's SuperLink state (fedgov.deploy.linkrun): Flower's in-memory state, with the
admitted nodes kept in nodes.json across restarts, against Flower's own state classes."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.supercore.constant import NodeStatus
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager

from fedgov.deploy import linkrun
from fedgov.deploy.linkrun import (
    ARG,
    IN_MEMORY,
    MIGRATE_ARG,
    NodeRegistry,
    durable_state,
    load_registry,
    migrate_registry,
)
from fedgov.deploy.superlink import CoordinatorConfig, superlink_args
from fedgov.errors import ConfigError


def _state(path: Path):  # type: ignore[no-untyped-def]
    return durable_state(NoOpFederationManager(), ObjectStoreFactory(IN_MEMORY).store(), path)


def _register(state, key: bytes, name: str) -> int:  # type: ignore[no-untyped-def]
    return int(state.create_node("<id:none>", "none", key, 30.0, name=name))


def test_registrations_survive_a_restart_with_the_same_ids(tmp_path: Path) -> None:
    path = tmp_path / "nodes.json"
    first = _state(path)
    ids = {name: _register(first, f"key-{name}".encode(), name) for name in ("GM0363", "GM0599", "GM0344")}
    assert len(set(ids.values())) == 3
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert first.activate_node(ids["GM0363"], 30.0)

    again = _state(path)  # a new SuperLink process: a fresh in-memory state from the file
    for name, nid in ids.items():
        assert again.get_node_id_by_public_key(f"key-{name}".encode()) == nid
    infos = {n.node_id: n for n in again.get_node_info()}
    assert set(infos) == set(ids.values())
    assert {n.status for n in infos.values()} == {NodeStatus.REGISTERED}  # online only once it connects
    assert infos[ids["GM0599"]].name == "GM0599"
    # a node that comes back is activated under its old id, and its heartbeats are taken
    assert again.activate_node(ids["GM0599"], 30.0)
    assert again.acknowledge_node_heartbeat(ids["GM0599"], 30.0)
    assert again.get_node_info(node_ids=[ids["GM0599"]])[0].status == NodeStatus.ONLINE
    # the same key cannot be registered twice, also after a restart
    with pytest.raises(ValueError, match="already in use"):
        _register(again, b"key-GM0363", "GM0363")


def test_an_unregistered_node_stays_unregistered_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "nodes.json"
    first = _state(path)
    nid = _register(first, b"key-a", "a")
    keep = _register(first, b"key-b", "b")
    first.delete_node("<id:none>", nid)
    again = _state(path)
    assert again.get_node_id_by_public_key(b"key-a") is None
    assert not again.activate_node(nid, 30.0)
    assert again.get_node_id_by_public_key(b"key-b") == keep
    assert load_registry(path).nodes[0].unregistered_at


def test_a_registration_that_cannot_be_written_is_not_admitted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _state(tmp_path / "nodes.json")
    kept = _register(state, b"key-kept", "kept")

    def full(path: Path, registry: NodeRegistry) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(linkrun, "save_registry", full)
    with pytest.raises(OSError):
        _register(state, b"key-new", "new")
    assert state.get_node_id_by_public_key(b"key-new") is None
    assert [n.node_id for n in state.get_node_info()] == [kept]
    monkeypatch.undo()
    assert _register(state, b"key-new", "new")  # the key is free again


def test_an_unreadable_registry_names_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "nodes.json"
    path.write_text('{"version": 1, "nodes": [{"node_id": -4}]}', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_registry(path)
    assert str(path) in str(info.value)
    assert any(p.location.startswith("nodes.0") for p in info.value.problems)
    with pytest.raises(ConfigError):
        _state(path)  # the SuperLink does not start without its admitted nodes


def _flower_sqlite(db: Path, ids: list[int], monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """A SuperLink SQLite state written by Flower's own SqlLinkState, its nodes given ``ids``."""
    import flwr.server.superlink.linkstate.sql_linkstate as sl

    queue = list(ids)
    monkeypatch.setattr(sl, "generate_rand_int_from_bytes", lambda *a, **k: queue.pop(0))
    sql = SqlLinkState(str(db), NoOpFederationManager(), ObjectStoreFactory(str(db)).store())
    sql.initialize()
    names = {f"n{i}": int(sql.create_node("<id:none>", "none", f"key-{i}".encode(), 30.0, name=f"n{i}")) for i in range(len(ids))}
    sql.delete_node("<id:none>", names[f"n{len(ids) - 1}"])
    monkeypatch.undo()
    return names


def test_registrations_are_taken_over_from_flowers_sqlite_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "state.db"
    # ids above 2**63 are stored by Flower as negative BIGINTs
    ids = _flower_sqlite(db, [2**64 - 5, 12345, 2**63, 2**63 - 1], monkeypatch)
    assert ids == {"n0": 2**64 - 5, "n1": 12345, "n2": 2**63, "n3": 2**63 - 1}

    registry = migrate_registry(db)
    assert {n.name: n.node_id for n in registry.nodes} == ids
    path = tmp_path / "nodes.json"
    assert linkrun.take_over(db, path) == 4
    assert not db.exists() and (tmp_path / "state.db.migrated").is_file()  # never taken over twice
    state = _state(path)
    for i in range(3):
        assert state.get_node_id_by_public_key(f"key-{i}".encode()) == ids[f"n{i}"]
    assert state.get_node_id_by_public_key(b"key-3") is None  # unregistered before the move: still out
    assert migrate_registry(tmp_path / "missing.db").nodes == []
    assert linkrun.take_over(tmp_path / "missing.db", tmp_path / "other.json") == 0


def test_a_database_that_cannot_be_read_stops_the_take_over(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    db.write_bytes(b"not a database at all, but a file that is there")
    with pytest.raises(ConfigError, match="cannot take the admitted nodes over") as info:
        migrate_registry(db)
    assert str(db) in str(info.value)


def test_an_unregistration_that_cannot_be_written_is_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "nodes.json"
    state = _state(path)
    nid = _register(state, b"key-revoked", "revoked")

    def full(path: Path, registry: NodeRegistry) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(linkrun, "save_registry", full)
    with pytest.raises(OSError):
        state.delete_node("<id:none>", nid)
    # memory and disk agree: still registered, so the operator's retry takes effect
    assert state.get_node_id_by_public_key(b"key-revoked") == nid
    monkeypatch.undo()
    state.delete_node("<id:none>", nid)
    assert state.get_node_id_by_public_key(b"key-revoked") is None
    assert _state(path).get_node_id_by_public_key(b"key-revoked") is None  # and after a restart


def test_the_process_takes_over_once_and_starts_flower_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import flwr.superlink.config_loader as cl

    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the module (its package re-exports the function)

    db = tmp_path / "state.db"
    ids = _flower_sqlite(db, [2**64 - 9, 77], monkeypatch)
    started: list[list[str]] = []
    monkeypatch.setattr(fs, "flower_superlink", lambda: started.append(list(sys.argv)))
    monkeypatch.setattr(cl, "LinkStateFactory", cl.LinkStateFactory)  # undone after the test
    registry = tmp_path / "nodes.json"
    argv = ["linkrun", ARG, str(registry), MIGRATE_ARG, str(db), "--host", "127.0.0.1", "--port", "9093"]
    monkeypatch.setattr(sys, "argv", argv)
    linkrun.main()
    assert started == [["flower-superlink", "--host", "127.0.0.1", "--port", "9093", "--database", IN_MEMORY]]
    assert {n.node_id for n in load_registry(registry).nodes} == set(ids.values())
    assert not db.exists()

    # a registry removed by mistake: the retired database is not taken over again
    registry.unlink()
    monkeypatch.setattr(sys, "argv", argv)
    linkrun.main()
    assert not registry.exists() or load_registry(registry).nodes == []

    # a registry that is not valid stops the start, naming the file
    registry.write_text("{", encoding="utf-8")
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        linkrun.main()
    assert str(registry) in str(info.value.code)
    assert len(started) == 2


def test_the_superlink_command_line_follows_the_configured_state(tmp_path: Path) -> None:
    mem = superlink_args(tmp_path, CoordinatorConfig())
    assert mem[1:4] == ["-P", "-m", "fedgov.deploy.linkrun"]
    assert mem[mem.index(ARG) + 1] == str(tmp_path / "nodes.json")
    assert mem[mem.index(MIGRATE_ARG) + 1] == str(tmp_path / "state.db")
    assert "--database" not in mem and "--enable-supernode-auth" in mem
    assert mem[mem.index("--host") + 1] == "127.0.0.1"
    db = superlink_args(tmp_path, CoordinatorConfig(superlink_state="database"))
    assert db[0].endswith("flower-superlink") and db[db.index("--database") + 1] == str(tmp_path / "state.db")
    assert ARG not in db
    own, flower = linkrun._split_args([ARG, "a.json", "--port", "1", f"{MIGRATE_ARG}=b.db", "--host", "h"])
    assert own == {ARG: "a.json", MIGRATE_ARG: "b.db"} and flower == ["--port", "1", "--host", "h"]


def test_the_superlink_builds_the_durable_state_when_installed(tmp_path: Path) -> None:
    import flwr.superlink.config_loader as cl

    assert linkrun._check_flower() is None  # Flower 1.42's in-memory state, as extended
    original = cl.LinkStateFactory
    try:
        linkrun._install(tmp_path / "nodes.json")
        _, factory = cl.get_objectstore_linkstate_factories(IN_MEMORY, NoOpFederationManager())
        state = factory.state()
        assert type(state).__name__ == "DurableNodesLinkState"
        _register(state, b"k", "x")
        assert load_registry(tmp_path / "nodes.json").nodes[0].name == "x"
        _, other = cl.get_objectstore_linkstate_factories(str(tmp_path / "s.db"), NoOpFederationManager())
        assert type(other.state()).__name__ == "SqlLinkState"  # a database file stays Flower's
    finally:
        cl.LinkStateFactory = original
