"""The coordinator's SuperLink process: Flower's in-memory state, with the admitted nodes on disk.

``fedgov coordinator start`` (and ``local-federation up``) runs ``python -P -m
fedgov.deploy.linkrun --fedgov-nodes <coordinator-dir>/nodes.json <flower-superlink arguments>``.

Why: Flower 1.42's SuperLink keeps its state either in SQLite, through SQLAlchemy's ORM
(``--database FILE``), or in Python dictionaries (``--database :flwr-in-memory:``). Every
Fleet API call of a SuperNode (each pull of a message and each of its objects, each push,
each heartbeat) goes through that state. Measured with ``benchmarks/bench_deploy.py
--with-database`` (the demo task, 3 nodes, warm runtime, both in one invocation): 1.15 s per
round with the SQLite file and 0.65 s in memory, the SuperLink's own CPU time for the run 7.3 s
and 2.8 s. ``py-spy`` showed the time in SQLAlchemy (a bulk clean-up of expired task tokens on
every call, the run-status check, the object store's rows).

What a coordinator must keep across a restart is which nodes it admitted, under which node
ids: a node that comes back after a restart must be the same node, and an operator must not
admit 342 municipalities again. Flower's in-memory state keeps nothing. So this module runs
Flower's SuperLink with :class:`DurableNodesLinkState`, Flower's in-memory state plus a file
of the node registrations (``nodes.json``: node id, public key, name, owner; written
atomically with mode 0600 on every registration and unregistration, read at start). The
runs and their messages live in memory: a coordinator restart ends the runs in flight (as
it did before: their ServerApps are the SuperLink's children) and Flower forgets the list of
finished runs; fedgov's own run directories (checkpoint, events, report) are where runs are
kept, and ``fedgov task resume`` continues a run from them.

A coordinator whose ``coordinator.toml`` says ``superlink_state = "database"`` keeps
Flower's SQLite state (``state.db``) instead. The first start in memory of a coordinator
that used ``state.db`` takes its node registrations over from it (same node ids) and renames
it ``state.db.migrated``, so that it is never taken over twice; a ``state.db`` that cannot be
read stops the start. The two states do not share registrations: switching back to
``"database"`` starts with no admitted nodes.

If Flower's in-memory state is not the one this was written for (Flower 1.42), the process
stops with a message saying so rather than run without the admitted nodes.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "ARG",
    "IN_MEMORY",
    "MIGRATE_ARG",
    "NODES_FILE",
    "NodeRegistry",
    "RegisteredNode",
    "durable_state",
    "load_registry",
    "main",
    "migrate_registry",
    "save_registry",
    "take_over",
]

log = logging.getLogger("fedgov.coordinator")

NODES_FILE = "nodes.json"
"""The admitted nodes, in the coordinator directory."""
ARG = "--fedgov-nodes"
"""This module's own argument: the registry file; every other argument is Flower's but
:data:`MIGRATE_ARG`."""
MIGRATE_ARG = "--fedgov-migrate-from"
"""A SuperLink SQLite state to take the node registrations over from, when there is no registry yet."""
IN_MEMORY = ":flwr-in-memory:"
"""Flower's name for its in-memory state (``--database``)."""
_U64 = 2**64


class RegisteredNode(BaseModel):
    """One node registration: what Flower's ``flwr supernode register`` stored."""

    model_config = ConfigDict(extra="forbid")

    node_id: int = Field(ge=1, lt=_U64)
    public_key: str = Field(pattern=r"^[0-9a-f]+$", description="the node's public key as Flower stores it, hex")
    owner_aid: str
    owner_name: str
    heartbeat_interval: float = Field(gt=0)
    registered_at: str
    name: str | None = None
    location: str | None = None
    unregistered_at: str | None = Field(default=None, description="set once the node was unregistered")


class NodeRegistry(BaseModel):
    """``nodes.json``: the nodes the coordinator admitted."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    nodes: list[RegisteredNode] = Field(default_factory=list)


def load_registry(path: Path) -> NodeRegistry:
    """The registry at ``path`` (empty when there is none); :class:`~fedgov.errors.ConfigError`
    naming the file and the field when it is unreadable."""
    from fedgov.errors import ConfigError, Problem

    if not path.is_file():
        return NodeRegistry()
    try:
        return NodeRegistry.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        problems = [Problem(str(path), ".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]
        raise ConfigError(f"{path}: the coordinator's registry of admitted nodes is not valid", problems) from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the coordinator's registry of admitted nodes ({exc.strerror})",
                          [Problem(str(path), "", "unreadable")]) from exc


def save_registry(path: Path, registry: NodeRegistry) -> None:
    """Write the registry atomically (a temporary file of mode 0600, fsynced, renamed)."""
    from fedgov.data.io import atomic_write_bytes

    atomic_write_bytes(path, registry.model_dump_json(indent=2).encode())


def migrate_registry(database: Path) -> NodeRegistry:
    """The node registrations in a SuperLink's SQLite state (``state.db``, Flower 1.42's
    ``node`` table), with the same node ids; an empty registry if there is no such file.
    :class:`~fedgov.errors.ConfigError` naming the file when it is there but cannot be read:
    a coordinator must not start without the nodes it admitted."""
    from fedgov.errors import ConfigError, Problem

    if not database.is_file():
        return NodeRegistry()
    try:
        con = sqlite3.connect(database.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT node_id, owner_aid, owner_name, status, registered_at, unregistered_at, heartbeat_interval, "
                "public_key, location, name FROM node"
            ).fetchall()
        finally:
            con.close()
        nodes = [
            RegisteredNode(
                node_id=int(nid) % _U64,  # Flower stores the uint64 id as a signed BIGINT
                public_key=bytes(pk).hex(), owner_aid=str(aid), owner_name=str(oname),
                heartbeat_interval=float(hb or 30.0), registered_at=str(reg_at or ""), name=name, location=loc,
                unregistered_at=(str(unreg_at or "") or "unknown") if status == "unregistered" else None,
            )
            for nid, aid, oname, status, reg_at, unreg_at, hb, pk, loc, name in rows
        ]
    except (sqlite3.Error, ValidationError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{database}: cannot take the admitted nodes over from the SuperLink's database ({exc}); "
            f"repair or remove it, or set superlink_state = \"database\"",
            [Problem(str(database), "node", "unreadable")],
        ) from exc
    return NodeRegistry(nodes=nodes)


MIGRATED_SUFFIX = ".migrated"
"""A ``state.db`` whose registrations went into ``nodes.json`` is renamed with this suffix (with its
``-wal`` and ``-shm`` files), so that it is never taken over a second time: a registry removed by
mistake must not bring back nodes unregistered since."""


def take_over(database: Path, registry_path: Path) -> int:
    """Move the registrations of ``database`` into ``registry_path`` (which must not exist yet)
    and retire the database; how many there were (0: nothing done)."""
    old = migrate_registry(database)
    if not old.nodes:
        return 0
    save_registry(registry_path, old)
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{database}{suffix}")
        if src.exists():
            src.rename(Path(f"{database}{MIGRATED_SUFFIX}{suffix}"))
    return len(old.nodes)


def durable_state(federation_manager: Any, object_store: Any, registry_path: Path) -> Any:
    """Flower's :class:`InMemoryLinkState` with the registrations of ``registry_path`` restored
    (same node ids; every node offline until it connects) and kept there on every change."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    class DurableNodesLinkState(InMemoryLinkState):
        """Flower's in-memory state; node registrations written through to ``nodes.json``."""

        def __init__(self) -> None:
            super().__init__(federation_manager, object_store)
            self._registry_path = registry_path
            self._restore(load_registry(registry_path))

        def _restore(self, registry: NodeRegistry) -> None:
            from flwr.proto.node_pb2 import NodeInfo
            from flwr.supercore.constant import NodeStatus

            with self.lock:
                for n in registry.nodes:
                    key = bytes.fromhex(n.public_key)
                    self.nodes[n.node_id] = NodeInfo(
                        node_id=n.node_id, owner_aid=n.owner_aid, owner_name=n.owner_name,
                        status=NodeStatus.UNREGISTERED if n.unregistered_at else NodeStatus.REGISTERED,
                        registered_at=n.registered_at, unregistered_at=n.unregistered_at or None,
                        heartbeat_interval=n.heartbeat_interval, public_key=key, location=n.location, name=n.name,
                    )
                    self.node_public_key_to_node_id[key] = n.node_id
                    self.owner_to_node_ids.setdefault(n.owner_aid, set()).add(n.node_id)

        def _snapshot(self) -> NodeRegistry:
            from flwr.supercore.constant import NodeStatus

            with self.lock:
                return NodeRegistry(nodes=[
                    RegisteredNode(
                        node_id=int(info.node_id), public_key=bytes(info.public_key).hex(), owner_aid=info.owner_aid,
                        owner_name=info.owner_name, heartbeat_interval=float(info.heartbeat_interval) or 30.0,
                        registered_at=info.registered_at, name=info.name if info.HasField("name") else None,
                        location=info.location if info.HasField("location") else None,
                        unregistered_at=(info.unregistered_at or "unknown") if info.status == NodeStatus.UNREGISTERED else None,
                    )
                    for info in self.nodes.values()
                ])

        def _save(self) -> None:
            save_registry(self._registry_path, self._snapshot())

        # Registrations are rare: each change and its write happen under the state's lock, so
        # no other change (and no other write) comes in between, and a change whose write
        # failed is undone before anyone else sees the state.

        def create_node(self, *args: Any, **kwargs: Any) -> int:
            with self.lock:
                node_id = int(super().create_node(*args, **kwargs))
                if node_id:
                    try:
                        self._save()
                    except BaseException:
                        # not on disk: not admitted (the registration fails, and says so)
                        info = self.nodes.pop(node_id, None)
                        if info is not None:
                            self.node_public_key_to_node_id.pop(bytes(info.public_key), None)
                            self.owner_to_node_ids.get(info.owner_aid, set()).discard(node_id)
                        raise
                return node_id

        def delete_node(self, owner_aid: str, node_id: int) -> None:
            from flwr.proto.node_pb2 import NodeInfo

            with self.lock:
                before = self.nodes.get(node_id)
                kept = NodeInfo()
                if before is not None:
                    kept.CopyFrom(before)
                super().delete_node(owner_aid, node_id)
                try:
                    self._save()
                except BaseException:
                    # not on disk: still registered (the unregistration fails, and can be retried)
                    if before is not None:
                        self.nodes[node_id].CopyFrom(kept)
                    raise

    return DurableNodesLinkState()


def _check_flower() -> str | None:
    """Why Flower's in-memory state is not the one this module extends (None: it is)."""
    import inspect

    try:
        from flwr.server.superlink.linkstate import in_memory_linkstate as m
        import flwr.superlink.config_loader as cl
    except ImportError as exc:
        return f"Flower's SuperLink modules moved ({exc})"
    try:
        src = inspect.getsource(m.InMemoryLinkState.__init__)
    except (OSError, TypeError) as exc:
        return f"the source of InMemoryLinkState cannot be read ({exc})"
    for attr in ("self.nodes", "self.node_public_key_to_node_id", "self.owner_to_node_ids", "self.lock"):
        if attr not in src:
            return f"InMemoryLinkState has no {attr}"
    if getattr(cl, "LinkStateFactory", None) is None:
        return "flwr.superlink.config_loader has no LinkStateFactory"
    return None


def _install(registry_path: Path) -> None:
    """Make the SuperLink build its state as :func:`durable_state` (in Flower's config loader)."""
    import flwr.superlink.config_loader as cl
    from flwr.server.superlink.linkstate import LinkStateFactory

    class Factory(LinkStateFactory):
        def state(self) -> Any:
            made: Any = self.state_instance
            if made is not None or self.database != IN_MEMORY:
                return super().state()
            with self._state_lock:
                if self.state_instance is None:
                    self.state_instance = durable_state(self.federation_manager, self.objectstore_factory.store(), registry_path)
                return self.state_instance

    setattr(cl, "LinkStateFactory", Factory)  # noqa: B010 - get_objectstore_linkstate_factories looks it up at call time


def _split_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(this module's options, Flower's arguments)."""
    out: list[str] = []
    own: dict[str, str] = {}
    it = iter(argv)
    for a in it:
        name, eq, value = a.partition("=")
        if name in (ARG, MIGRATE_ARG):
            own[name] = value if eq else next(it, "")
        else:
            out.append(a)
    return own, out


def main() -> None:
    # fedgov's own lines only: a handler on the root logger would also write Flower's DEBUG
    # records (its logger passes them on), request bodies included
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    from fedgov.errors import FedgovError

    own, argv = _split_args(sys.argv[1:])
    if not own.get(ARG):
        sys.exit(f"fedgov.deploy.linkrun: {ARG} PATH is required")
    registry_path = Path(own[ARG]).resolve()
    why = _check_flower()
    if why is not None:
        sys.exit(f"fedgov.deploy.linkrun: Flower's in-memory SuperLink state is not the one fedgov keeps node registrations "
                 f"for (Flower 1.42): {why}. Set superlink_state = \"database\" in coordinator.toml.")
    try:
        if not registry_path.is_file() and own.get(MIGRATE_ARG):
            legacy = Path(own[MIGRATE_ARG])
            moved = take_over(legacy, registry_path)
            if moved:
                log.info("took over %d node registration(s) from %s into %s (the database is now %s%s)", moved, legacy,
                         registry_path, legacy.name, MIGRATED_SUFFIX)
        known = load_registry(registry_path)
    except (FedgovError, OSError) as exc:
        sys.exit(f"fedgov.deploy.linkrun: {exc}")
    log.info("SuperLink state in memory; %d admitted node(s) from %s", len(known.nodes), registry_path)
    _install(registry_path)
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *argv, "--database", IN_MEMORY]
    flower_superlink()


if __name__ == "__main__":
    main()
