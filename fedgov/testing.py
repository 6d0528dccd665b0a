"""An in-process federation for tests: fedgov's real coordinator logic (``run_training``,
``run_query``) against fedgov's real ClientApp (with all its mods), without Flower's runtime.

The grid calls a ClientApp (by default fedgov's own, ``clients.app.app``) directly, one node
after the other, with a Flower ``Context`` per node that lives as long as the grid (as a
SuperNode's does). It saves the 20 s of Ray start-up per run that Flower's simulation costs, so
that tests can run a federation several times (clean, attacked, crashed and resumed). What it
does not test, Flower's transport, the real-process tests cover (``tests/e2e``).

Faults are injected per node with ``faults``: a callable ``(message) -> action`` where the
action is ``None`` (answer), ``"drop"`` (no reply: a node that went away or a straggler past
the wait), or a callable that tampers with the node's reply (a poisoned update).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.app.message import make_message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedgov.transport import local_model

__all__ = ["CoordinatorCrash", "Fault", "InProcessGrid", "prepare", "tamper_update"]

Fault = Callable[[Message], Any]


class CoordinatorCrash(BaseException):
    """The coordinator's process died: nothing after it (no report, no ``end``) reaches anyone."""


class InProcessGrid(Grid):
    """A Flower Grid whose nodes are a ClientApp called in this process (``app``: fedgov's own
    by default)."""

    def __init__(
        self,
        manifest: Path,
        n_nodes: int,
        *,
        run_id: int = 1,
        faults: dict[int, Fault] | None = None,
        app: ClientApp | None = None,
    ) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        if app is None:
            # The one import of the Flower glue in the library, on purpose: these tests drive
            # the real ClientApp, with all its mods. Imported here, so that importing
            # fedgov.testing does not import the glue.
            from clients.app import app as fedgov_app

            app = fedgov_app
        # What Flower's ServerApp process sets for the messages it creates.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0
        self.app: ClientApp = app
        self.run_id = run_id
        self.faults = faults or {}
        self.offline: set[int] = set()
        self.contexts: dict[int, Context] = {}
        self.sent: list[Message] = []
        self.received: list[Message] = []  # every reply that reached the coordinator
        self._replies: dict[str, Message] = {}
        self.crash_after_train_round: int | None = None
        self.dead = False
        for i in range(n_nodes):
            nid = 1000 + i
            self.contexts[nid] = Context(
                run_id=run_id, node_id=nid,
                node_config={"partition-id": i, "num-partitions": n_nodes},
                state=RecordDict(), run_config={"manifest-path": str(manifest)},
            )

    # Grid's abstract interface
    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return getattr(self, "_run", None)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node now; its reply waits for :meth:`pull_messages`."""
        if self.dead:
            raise CoordinatorCrash()
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_run_id"] = self.run_id
            self.sent.append(msg)
            ids.append(msg.metadata.message_id)
            reply = self._deliver(msg)
            if reply is not None:
                self._replies[msg.metadata.message_id] = reply
                self.received.append(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def _deliver(self, msg: Message) -> Message | None:
        """The node's reply to ``msg``, or None when it does not answer."""
        nid = msg.metadata.dst_node_id
        if nid in self.offline or nid not in self.contexts:
            return None
        action = self.faults[nid - 1000](msg) if nid - 1000 in self.faults else None
        if action == "drop":
            return None
        # A real node receives a copy, never the coordinator's own objects.
        incoming = make_message(copy.deepcopy(msg.metadata), copy.deepcopy(msg.content))
        try:
            reply = self.app(incoming, self.contexts[nid])
        except Exception as exc:  # noqa: BLE001 - what Flower's runtime turns into an error reply
            reply = Message(Error(code=500, reason=f"{type(exc).__name__}: {exc}"), reply_to=incoming)
        if callable(action):
            reply = action(msg, reply)
        return reply

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.pull_messages(self.push_messages(messages)))
        crash = self.crash_after_train_round
        if crash is not None and any(_trains_in_round(m, crash) for m in messages):
            # The nodes trained (and spent) this round; the coordinator dies before it saves it.
            self.dead = True
            raise CoordinatorCrash()
        return replies


def _trains_in_round(msg: Message, server_round: int) -> bool:
    """Whether ``msg`` asks its node to train in ``server_round`` (Flower's strategies send the
    round as an int in the ``config`` record)."""
    if not msg.metadata.message_type.startswith("train"):
        return False
    return msg.content.config_records["config"]["server-round"] == server_round


def tamper_update(transform: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Fault:
    """A fault for training messages: the node's update is replaced by ``transform(local, global)``."""

    def fault(msg: Message) -> Any:
        if not msg.metadata.message_type.startswith("train"):
            return None

        def tamper(ins: Message, reply: Message) -> Message:
            if reply.has_error():
                return reply
            glob = {k: v.numpy() for rec in ins.content.array_records.values() for k, v in rec.items()}
            content = reply.content
            for name, rec in list(content.array_records.items()):
                local = local_model(rec, glob)  # a malicious node sends whole float32 models
                content[name] = ArrayRecord({k: Array(np.asarray(transform(v, glob[k]), dtype=v.dtype)) for k, v in local.items()})
            return reply

        return tamper

    return fault


def prepare(tmp: Path, federation_path: Path, task_path: Path, **options: Any) -> tuple[Any, Any, list[Any], Path]:
    """Node directories and manifest for a federation, as ``fedgov run`` makes them."""
    from fedgov.config import load_federation, load_task
    from fedgov.launch.simulation import SimulationOptions, prepare_nodes

    task, contract = load_task(task_path)
    federation = load_federation(federation_path)
    nodes, manifest = prepare_nodes(
        tmp, federation, contract, SimulationOptions(runs_dir=tmp, **options), lambda e: None,
        max_epsilon=task.privacy.target_epsilon,
    )
    return task, contract, nodes, manifest
