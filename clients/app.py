"""The Flower ClientApp of a fedgov node (Message API). All logic lives in :mod:`fedgov.node`.

Where a node's data lies:

* deployment: ``--node-config "node-name='GM0363' data-path='/data/train.csv' test-path='...'"``;
* simulation: the run config's ``manifest-path`` lists each virtual node's files, and the
  node's ``partition-id`` picks its entry.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedgov import node as N
from fedgov import protocol as P
from fedgov.config import Contract, Task

app = ClientApp()
log = logging.getLogger("fedgov.node")

DP_STATE = "fedgov-dp"


@lru_cache(maxsize=16)
def _task(task_json: str, contract_json: str) -> tuple[Task, Contract]:
    return Task.model_validate_json(task_json), Contract.model_validate_json(contract_json)


def _task_of(msg: Message) -> tuple[Task, Contract]:
    cfg = msg.content[P.CONFIG]
    return _task(str(cfg[P.TASK_JSON]), str(cfg[P.CONTRACT_JSON]))


@lru_cache(maxsize=8)
def _manifest(path: str) -> list:  # type: ignore[type-arg]
    from fedgov.data import read_manifest

    return read_manifest(Path(path))


def _where(context: Context) -> tuple[str, str, Path, Path | None, Path | None]:
    """(node id, display name, train path, test path, node work dir) for this node."""
    nc = context.node_config
    if "data-path" in nc:
        name = str(nc.get("node-name", "node"))
        test = str(nc.get("test-path", "") or "")
        workdir = str(nc.get("node-dir", "") or "")
        return name, name, Path(str(nc["data-path"])), Path(test) if test else None, Path(workdir) if workdir else None
    manifest = str(context.run_config.get("manifest-path", "") or "")
    if not manifest:
        raise RuntimeError("this node has no data: give node-config data-path (deployment) or a manifest (simulation)")
    entry = _manifest(manifest)[int(nc["partition-id"])]
    return entry.code, entry.name, entry.train_path, entry.test_path, entry.train_path.parent


class NodeError(RuntimeError):
    """What goes back to the coordinator when a handler fails: a text without data values."""


def _safe(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Log the full error at the node; send the coordinator only a short, data-free reason."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            log.exception("node handler %s failed", handler.__name__)
            raise NodeError(N.describe_error(exc)) from None

    return wrapped


def _state_key(task: Task, contract: Contract) -> str:
    digest = hashlib.sha256((task.model_dump_json() + contract.model_dump_json()).encode()).hexdigest()[:16]
    return f"{DP_STATE}-{digest}"


@app.query()
@_safe
def query(msg: Message, context: Context) -> Message:
    """``hello`` (does this node accept the task?) or ``baseline`` (local-only model)."""
    task, contract = _task_of(msg)
    node, name, train_path, test_path, workdir = _where(context)
    key = _state_key(task, contract)
    kind = str(msg.content[P.CONFIG].get(P.KIND, P.HELLO))
    if kind == P.BASELINE:
        dp = N.DPState.from_json(str(context.state[key]["json"]) if key in context.state else None)
        base = N.local_only_baseline(task, contract, train_path, test_path, node=node, plan_json=dp.plan_json)
        metrics = MetricRecord({"accuracy": base.accuracy, "epsilon": base.epsilon})
        return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)
    answer, dp = N.hello(task, contract, node=node, node_name=name, train_path=train_path, test_path=test_path, workdir=workdir)
    if answer.accepted and key not in context.state:
        context.state[key] = ConfigRecord({"json": dp.to_json()})
    return Message(RecordDict({P.HELLO: ConfigRecord({P.NODE_JSON: answer.model_dump_json()})}), reply_to=msg)


@app.train()
@_safe
def train(msg: Message, context: Context) -> Message:
    task, contract = _task_of(msg)
    node, _, train_path, test_path, _ = _where(context)
    key = _state_key(task, contract)
    dp = N.DPState.from_json(str(context.state[key]["json"]) if key in context.state else None)
    arrays = msg.content[P.ARRAYS]
    state = {k: v.numpy() for k, v in arrays.items()}
    new_state, metrics, dp = N.train(
        task, contract, node=node, train_path=train_path, test_path=test_path,
        state=state, server_round=int(msg.content[P.CONFIG]["server-round"]), dp=dp,
    )
    # The accountant is saved before the reply leaves: a spend is never forgotten.
    context.state[key] = ConfigRecord({"json": dp.to_json()})
    reply = RecordDict(
        {P.ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in new_state.items()}), P.METRICS: MetricRecord(metrics)}
    )
    return Message(reply, reply_to=msg)


@app.evaluate()
@_safe
def evaluate(msg: Message, context: Context) -> Message:
    task, contract = _task_of(msg)
    _, _, train_path, test_path, _ = _where(context)
    state = {k: v.numpy() for k, v in msg.content[P.ARRAYS].items()}
    metrics = N.evaluate_global(task, contract, train_path=train_path, test_path=test_path, state=state)
    return Message(RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)
