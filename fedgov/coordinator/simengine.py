"""Flower's simulation engine at national scale: messages found by their node, not by a scan.

Flower 1.42's simulation engine (``flwr.server.superlink.fleet.vce.vce_api``) looks for work
every 0.1 s by asking its link state, for each of the N virtual nodes in turn, for that node's
next message (``InMemoryLinkState.get_message_ins(node_id, limit=1)``); and each such call walks
every message the link state holds, checking each one's expiry on the way. With N nodes and a
message for each, that is N x N checks ten times a second: at 342 municipalities the simulation
process spent most of a core on it, beside the two workers that run the nodes on a two-core
machine (``benchmarks/profile_scale.py``, ``benchmarks/results/scale.json``).

:func:`index_pending_messages` gives the link state of fedgov's own simulation an index of the
messages not yet delivered, by destination node, kept up to date where messages are stored. A
node's lookup then touches only its own messages, and makes the same checks on each as Flower
does (expiry and federation, through Flower's own ``_check_stored_messages``), marks them
delivered the same way, and returns them in the order they were stored.

It is installed by fedgov's ServerApp (``server/app.py``) when its grid is Flower's in-memory
simulation grid; a deployment's SuperLink is another process and is never touched. It checks
that the link state has the attributes it relies on and otherwise leaves Flower as it is.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["index_pending_messages"]

log = logging.getLogger(__name__)

_INDEX = "_fedgov_pending"  # dst node id -> {message id: None}, in the order stored (undelivered when stored)


def _pending(state: Any) -> dict[int, dict[str, None]]:
    """The link state's index (built from its store the first time, under its lock)."""
    index: dict[int, dict[str, None]] | None = state.__dict__.get(_INDEX)
    if index is None:
        index = {}
        for mid, msg in state.message_ins_store.items():
            if msg.metadata.delivered_at == "":
                index.setdefault(msg.metadata.dst_node_id, {})[mid] = None
        state.__dict__[_INDEX] = index
    return index


def index_pending_messages(grid: Any) -> bool:
    """Index the undelivered messages of ``grid``'s link state by destination (see the module's
    text). True when the link state is Flower's in-memory one and is (now) indexed."""
    try:
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
        from flwr.supercore.date import now
    except ImportError:  # another Flower: leave it alone
        return False
    state = getattr(grid, "state", None)
    if not isinstance(state, InMemoryLinkState):
        return False
    cls = type(state)
    if getattr(cls, "_fedgov_indexed", False):
        return True
    needed = ("message_ins_store", "lock", "_check_stored_messages", "store_message_ins", "get_message_ins")
    if not all(hasattr(state, a) for a in needed):
        log.warning("Flower's link state is not the one fedgov knows; messages are looked up by Flower's scan")
        return False
    store_original = cls.store_message_ins

    def store_message_ins(self: Any, message: Any) -> str | None:
        message_id: str | None = store_original(self, message)
        if message_id is not None:
            with self.lock:
                if message_id in self.message_ins_store and self.message_ins_store[message_id].metadata.delivered_at == "":
                    _pending(self).setdefault(message.metadata.dst_node_id, {})[message_id] = None
        return message_id

    def get_message_ins(self: Any, node_id: int, limit: int | None, *, run_id: int | None = None) -> list[Any]:
        """Flower's ``get_message_ins`` over this node's undelivered messages only."""
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        found: list[Any] = []
        with self.lock:
            mine = _pending(self).get(node_id)
            if not mine:
                return found
            for message_id in list(mine):
                self._check_stored_messages({message_id})  # expired or outside the federation: deleted
                msg = self.message_ins_store.get(message_id)
                if msg is None or msg.metadata.delivered_at != "":
                    del mine[message_id]
                    continue
                if run_id is not None and msg.metadata.run_id != run_id:
                    continue
                found.append(msg)
                del mine[message_id]
                if limit and len(found) == limit:
                    break
            delivered_at = now().isoformat()
            for msg in found:
                msg.metadata.delivered_at = delivered_at
        return found

    cls.store_message_ins = store_message_ins  # type: ignore[method-assign]
    cls.get_message_ins = get_message_ins  # type: ignore[method-assign]
    cls._fedgov_indexed = True  # type: ignore[attr-defined]
    with state.lock:
        _pending(state)
    log.info("simulation: messages are looked up by their node (fedgov.coordinator.simengine)")
    return True
