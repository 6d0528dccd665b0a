"""The coordinator's seam to the network: Flower's ``Grid``, bounded waits and the task's queries.

Everything the coordinator says to the nodes goes through a ``flwr.serverapp.Grid``: Flower's
gRPC grid in a deployment, its simulation grid under ``fedgov run``, and
:class:`fedgov.testing.InProcessGrid` in tests. This module holds what fedgov adds on top:

* :func:`wait_for_nodes`: a bounded wait for the expected nodes (Flower's own waits forever);
* :func:`hello`: the admission round, each node's answer (:class:`fedgov.protocol.NodeHello`);
* :func:`end_task`: the best-effort notice that a task ended (nodes release what they did not spend);
* :class:`PollingGrid`: Flower's grid with a short wait for replies (Flower's deployed grid
  looks for replies every 3 s; this one after 5 ms, doubling to at most 25 ms);
* :class:`AdmittedGrid`: the view the strategy gets, with only the admitted nodes, a bounded
  wait for missing ones, and a count of the bytes that crossed it (:func:`message_bytes`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedgov import protocol as P
from fedgov.config import Contract, Task
from fedgov.errors import FederationError

__all__ = [
    "AdmittedGrid",
    "PollingGrid",
    "poll_replies",
    "end_task",
    "hello",
    "message_bytes",
    "query_messages",
    "task_config",
    "wait_for_nodes",
]

log = logging.getLogger(__name__)


def poll_replies(
    grid: Grid, messages: Iterable[Message], *, timeout: float | None = None, first: float = 0.005, longest: float = 0.025
) -> list[Message]:
    """Push ``messages`` and pull their replies until all came or ``timeout`` s passed.

    What Flower's ``Grid.send_and_receive`` does, with a wait between pulls that starts at
    ``first`` s and doubles to at most ``longest`` (Flower's deployed grid waits 3 s)."""
    t0 = time.monotonic()
    ids = set(grid.push_messages(messages))
    n = len(ids)
    end = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    wait = first
    while ids:
        got = list(grid.pull_messages(ids))
        replies.extend(got)
        ids.difference_update(m.metadata.reply_to_message_id for m in got)
        if not ids or (end is not None and time.monotonic() >= end):
            break
        time.sleep(wait if end is None else max(0.0, min(wait, end - time.monotonic())))
        wait = min(longest, wait * 2) if not got else first
    log.debug("%d messages, %d replies in %.3f s", n, len(replies), time.monotonic() - t0)
    return replies


class _Wrapping(Grid):
    """A Grid that hands everything to the Grid it wraps (subclasses change what they need)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class PollingGrid(_Wrapping):
    """Flower's grid, but :meth:`send_and_receive` waits for replies in short steps (:func:`poll_replies`)."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return poll_replies(self._grid, messages, timeout=timeout)


class AdmittedGrid(_Wrapping):
    """A view of a Grid that offers only the nodes that accepted the task to the strategy.

    It also bounds Flower's wait for nodes: the strategies' ``sample_nodes`` polls
    ``get_node_ids`` until enough nodes are online and waits forever otherwise. Once fewer
    than ``min_nodes`` admitted nodes have been online for ``patience`` seconds, this view
    raises :class:`~fedgov.errors.FederationError`, and the run stops with that message.
    """

    def __init__(self, grid: Grid, admitted: Iterable[int], *, min_nodes: int = 1, patience: float = 120.0) -> None:
        super().__init__(grid)
        self.admitted = set(admitted)
        self.min_nodes = min_nodes
        self.patience = patience
        self._short_since: float | None = None
        # Serialised size of every message through this view, by direction (see message_bytes).
        self.bytes_sent = 0
        self.bytes_received = 0

    def get_node_ids(self) -> Iterable[int]:
        ids = [n for n in self._grid.get_node_ids() if n in self.admitted]
        if len(ids) >= self.min_nodes:
            self._short_since = None
            return ids
        now = time.monotonic()
        if self._short_since is None:
            self._short_since = now
        elif now - self._short_since > self.patience:
            raise FederationError(
                f"only {len(ids)} of the {len(self.admitted)} admitted nodes are online, the task needs "
                f"{self.min_nodes} (training.min_nodes); waited {self.patience:.0f} s for more"
            )
        return ids

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.bytes_sent += sum(message_bytes(m) for m in messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self.bytes_received += sum(message_bytes(m) for m in replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.bytes_sent += sum(message_bytes(m) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.bytes_received += sum(message_bytes(m) for m in replies)
        return replies


def message_bytes(msg: Message) -> int:
    """A message's size on the wire: its protobuf serialisation (content and metadata), as
    Flower sends it over gRPC (without gRPC's and TLS's own framing, a few dozen bytes)."""
    from flwr.common.serde import message_to_proto

    return int(message_to_proto(msg).ByteSize())


def task_config(task: Task, contract: Contract) -> dict[str, str]:
    """What every message to a node carries: the task and its contract, as JSON."""
    return {P.TASK_JSON: task.model_dump_json(), P.CONTRACT_JSON: contract.model_dump_json()}


def query_messages(
    node_ids: Iterable[int], kind: str, config: Mapping[str, str], arrays: ArrayRecord | None = None
) -> list[Message]:
    """One Flower *query* message of ``kind`` per node, each carrying ``config`` (and ``arrays``,
    the final global model, from which a node keeps its personal model)."""
    content = ConfigRecord({P.KIND: kind, **config})
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {P.CONFIG: content}
    if arrays is not None:
        records[P.ARRAYS] = arrays
    return [
        Message(content=RecordDict(records), message_type=MessageType.QUERY, dst_node_id=nid)
        for nid in node_ids
    ]


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Node ids once ``expected`` are connected, or what is there after ``timeout`` s.

    Flower's own sampling waits forever for missing nodes; fedgov never does.
    """
    deadline = time.monotonic() + timeout
    while True:
        ids = list(grid.get_node_ids())
        if len(ids) >= expected or time.monotonic() >= deadline:
            return ids
        time.sleep(0.5)


def hello(grid: Grid, node_ids: list[int], config: Mapping[str, str], timeout: float) -> dict[int, P.NodeHello]:
    """Ask every node whether it accepts the task in ``config``; its answer, or why there is none.

    An error reply, a malformed answer and silence are refusals (code ``internal``), except a
    node that refused the app bundle before running any of it (``app-not-trusted``,
    :mod:`fedgov.deploy.clientapp`), whose code is kept.
    """
    answers: dict[int, P.NodeHello] = {}
    for reply in grid.send_and_receive(query_messages(node_ids, P.HELLO, config), timeout=timeout):
        nid = reply.metadata.src_node_id
        answers[nid] = _hello_answer(nid, reply)
    for nid in node_ids:
        answers.setdefault(
            nid,
            P.NodeHello(node=f"node-{nid}", accepted=False, code=P.RefusalCode.INTERNAL, reason=f"no answer within {timeout:.0f} s"),
        )
    return answers


def _hello_answer(nid: int, reply: Message) -> P.NodeHello:
    if reply.has_error():
        reason = reply.error.reason or "no reason given"
        code = P.RefusalCode.INTERNAL
        untrusted = P.RefusalCode.APP_NOT_TRUSTED.value
        if untrusted in reason:
            # The node refused the bundle before running any of it (fedgov.deploy.clientapp).
            code = P.RefusalCode.APP_NOT_TRUSTED
            reason = reason[reason.index(untrusted):].rstrip("'>").removeprefix(f"{untrusted}: ")
        return P.NodeHello(node=f"node-{nid}", accepted=False, code=code, reason=reason[:500])
    try:
        return P.NodeHello.model_validate_json(str(reply.content[P.HELLO][P.NODE_JSON]))
    except Exception as exc:  # noqa: BLE001 - a malformed answer is a refusal
        return P.NodeHello(
            node=f"node-{nid}", accepted=False, code=P.RefusalCode.INTERNAL, reason=f"malformed hello reply: {exc}"[:500]
        )


def end_task(
    grid: Grid, node_ids: list[int], config: Mapping[str, str], timeout: float = 60.0, arrays: ArrayRecord | None = None
) -> None:
    """Tell the nodes the task has ended, so that they release what they reserved and did not
    spend (with ``arrays``, the final model: each node keeps its personal model from it). Best
    effort: a node that does not hear it keeps the reservation (never hands back)."""
    try:
        list(grid.send_and_receive(query_messages(node_ids, P.END, config, arrays), timeout=timeout))
    except Exception:  # noqa: BLE001
        log.warning("could not tell every node that the task ended", exc_info=True)
