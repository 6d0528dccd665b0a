"""The Flower ClientApp of a fedgov node (Message API): thin glue over :mod:`fedgov.node`.

Each handler parses the message (:mod:`fedgov.node.context`), calls one function of
:mod:`fedgov.node` and builds the reply. The mods in :mod:`clients.mods` run around every
handler, in this order (outermost first):

1. ``audit_mod``: every message received and every reply sent goes into the node's
   hash-chained audit log (kinds, sizes, array shapes, metric names and values; no rows);
2. ``gate_mod``: the release gate; every reply is checked against the declaration of what may
   leave the node (:mod:`fedgov.node.gate`), and one with anything else is not sent;
3. ``pause_mod``: a paused node refuses at the next message, without a restart;
4. ``contract_mod``: a message's contract must be the one this node holds and pins;
5. ``admission_mod``: ``hello`` is checked against the policy before the data is touched,
   then (after the handler read the data and planned DP-SGD) approval and the ledger
   reservation; ``train`` and ``evaluate`` run only for an admitted task;
6. ``secagg_mod``: for a task under secure aggregation, the protocol's stages, and the train
   reply masked so that the coordinator learns only the round's sum (:mod:`fedgov.node.secure`);
7. ``budget_mod``: a ``train`` reply leaves only after its spend is in the ledger; an
   evaluation is charged before it is computed; ``end`` releases what the task reserved but
   did not use (:mod:`fedgov.node.spend`).
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import fedgov.node as N
from clients.mods import (
    ERROR_REFUSED,
    FlowerState,
    admission_mod,
    audit_mod,
    budget_mod,
    contract_mod,
    gate_mod,
    pause_mod,
    secagg_keep,
    secagg_mod,
    secagg_receive,
    stash,
    state_key,
)
from fedgov import protocol as P
from fedgov.config import Contract, Task
from fedgov.config.datasource import DataSource
from fedgov.errors import SecAggError
from fedgov.node.admission import node_display_name
from fedgov.node.context import config_int, data_of, node_of, query_of, task_id, task_of
from fedgov.node.contracts import append_private
from fedgov.node.personal import PersonalRecord, ensure_personal, personal_test_accuracy
from fedgov.node.policy import min_rows_for
from fedgov.node.refusals import Refusal, error_reason
from fedgov.transport import UPDATE, encode_update

__all__ = ["app"]

app = ClientApp(mods=[audit_mod, gate_mod, pause_mod, contract_mod, admission_mod, secagg_mod, budget_mod])
log = logging.getLogger("fedgov.node")


def _safe(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """The full error (it may quote data values) goes only to the node-local report
    ``reports/errors.log`` (mode 0600); the log gets its type and where; the coordinator gets
    the fixed ``internal-error`` text."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)
            where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno} in {tb[-1].name}" if tb else "?"
            report = None
            try:
                _, home, _ = node_of(context)
                stamp = datetime.now(UTC).isoformat(timespec="seconds")
                report = append_private(
                    home.path, "errors.log",
                    f"--- {stamp} handler {handler.__name__}\n{''.join(traceback.format_exception(exc))}\n",
                )
            except Exception:  # noqa: BLE001 - no node directory to write into: the type is logged
                pass
            log.error(
                "node handler %s failed: %s at %s; details in %s", handler.__name__, type(exc).__name__, where,
                report or "no node-local report",
            )
            return Message(Error(code=500, reason=error_reason("internal-error")), reply_to=msg)

    return wrapped


def _dp(context: Context, key: str) -> N.DPState:
    """The node's accountant for the task, as the hello handler fixed it."""
    return N.DPState.from_json(FlowerState(context).get(key))


def _server_round(msg: Message) -> int:
    return config_int(msg.content.config_records[P.CONFIG], "server-round")


@app.query()
@_safe
def query(msg: Message, context: Context) -> Message:
    """``hello`` (may this node take part?), ``baseline`` (local-only model), ``end``, and
    ``stats`` (a statistics query: :func:`fedgov.node.statistics.answer_query`)."""
    kind = str(msg.content.config_records[P.CONFIG].get(P.KIND, P.HELLO))
    if kind == P.STATS:
        return _stats(msg, context)
    task, contract = task_of(msg)
    node, home, simulated = node_of(context)
    key = state_key(msg)
    if kind == P.END:
        if FlowerState(context).get(key) is not None:  # a task this node accepted: keep its personal model
            _keep_personal(msg, context, task, contract)
        return Message(RecordDict({P.METRICS: MetricRecord({"ok": 1})}), reply_to=msg)
    train_path, test_path = data_of(home, contract)
    if kind == P.BASELINE:
        base = N.baseline(task, contract, train_path, test_path, node=node, simulated=simulated, dp=_dp(context, key))
        if isinstance(base, Refusal):
            return Message(Error(code=ERROR_REFUSED, reason=base.reason()), reply_to=msg)
        metrics: dict[str, int | float | list[int] | list[float]] = {"accuracy": base.accuracy, "epsilon": base.epsilon}
        # a simulation only (N.baseline refused above otherwise): the personal model's exact
        # figures, apart from the budget like the local-only ones (fedgov.node.personal)
        if _keep_personal(msg, context, task, contract) is not None:
            figures = personal_test_accuracy(home, task, contract, task_id=task_id(msg), train_path=train_path, test_path=test_path)
            if figures is not None:
                metrics |= {"personal-accuracy": figures[0], "personal-fine-tuned": figures[1], "test-rows": float(figures[2])}
        return Message(RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)
    min_rows, setting = min_rows_for(home.policy(), task) if home.exists() else (0, "limits.min_rows")
    answer, dp = N.hello(
        task, contract, node=node, node_name=node_display_name(home, node), train_path=train_path, test_path=test_path, workdir=home.path,
        release_rows=lambda n: N.released_row_count(home, contract, train_path, n),
        min_rows=min_rows, min_rows_setting=setting,
    )
    if answer.accepted:
        FlowerState(context).put(key, dp.to_json())
    return Message(RecordDict({P.HELLO: ConfigRecord({P.NODE_JSON: answer.model_dump_json()})}), reply_to=msg)


def _stats(msg: Message, context: Context) -> Message:
    """A statistics query; under secure aggregation the release leaves masked, with only its
    layout (parts, cells, noise) in plaintext (:func:`fedgov.node.secure.mask_release`)."""
    q, contract = query_of(msg)
    node, home, _ = node_of(context)
    secure = None
    if q.secure_aggregation:
        try:  # before any data is read or budget spent: no shares, no answer
            cfg = msg.content.config_records[P.CONFIG]
            secure = secagg_receive(msg, context, config_int(cfg, "server-round") if "server-round" in cfg else 1)
        except (SecAggError, KeyError, ValueError, TypeError) as exc:
            log.warning("node: secure aggregation stopped: %s", type(exc).__name__)
            return Message(Error(code=ERROR_REFUSED, reason=error_reason("secure-aggregation")), reply_to=msg)
    answer = N.answer_query(home, node, q, contract, query_id=N.query_id_of(q, contract, msg.metadata.run_id))
    # the detailed reason of a refusal stays at the node (its audit log); a fixed text leaves
    answer = N.public_answer(answer, q, contract, home).model_copy(update={"node_name": node_display_name(home, node)})
    if secure is None or not answer.accepted or not answer.release_json:
        return Message(RecordDict({P.STATS: ConfigRecord({P.ANSWER_JSON: answer.model_dump_json()})}), reply_to=msg)
    st, survivors = secure
    answer, masked = N.mask_release(st, answer, q, survivors)
    secagg_keep(msg, context, st)
    return Message(
        RecordDict({P.STATS: ConfigRecord({P.ANSWER_JSON: answer.model_dump_json()}), P.ARRAYS: ArrayRecord({P.MASKED: Array(masked.astype(np.uint32))})}),
        reply_to=msg,
    )


def _incoming(msg: Message, context: Context) -> tuple[Task, Contract, str, DataSource, DataSource | None, dict[str, np.ndarray]]:
    """Task, contract, node name, data files (or SQL queries) and the global model of a train/evaluate message."""
    task, contract = task_of(msg)
    node, home, _ = node_of(context)
    train_path, test_path = data_of(home, contract)
    return task, contract, node, train_path, test_path, {k: v.numpy() for k, v in msg.content.array_records[P.ARRAYS].items()}


@app.train()
@_safe
def train(msg: Message, context: Context) -> Message:
    task, contract, node, train_path, test_path, state = _incoming(msg, context)
    key = state_key(msg)
    new_state, metrics, dp = N.train(
        task, contract, node=node, train_path=train_path, test_path=test_path,
        state=state, server_round=_server_round(msg), dp=_dp(context, key),
    )
    FlowerState(context).put(key, dp.to_json())
    # Rows, loss, epsilon and the round's DP-SGD steps stay at the node: the mods record the
    # spend from them (budget_mod) and weigh a masked update (secagg_mod); only the update leaves.
    stash(context, metrics)
    update = encode_update(new_state, state, encoding=task.training.update_encoding)
    # the FedAvg weight is the node's released (noisy) row count, fixed at hello
    reply = RecordDict({P.ARRAYS: ArrayRecord({UPDATE: update}), P.METRICS: MetricRecord({"num-examples": float(metrics["num-examples"])})})
    return Message(reply, reply_to=msg)


@app.evaluate()
@_safe
def evaluate(msg: Message, context: Context) -> Message:
    """Noisy correct and total counts of the global model on the node's test split; the spend
    is already in the ledger (``budget_mod``), which refuses a second evaluation of a round."""
    task, contract, _, train_path, test_path, state = _incoming(msg, context)
    z = _dp(context, state_key(msg)).fixed_plan(task).evaluation_noise if task.privacy.enabled else None
    metrics = N.evaluate_global(task, contract, train_path=train_path, test_path=test_path, state=state, evaluation_noise=z)
    if _server_round(msg) == task.training.rounds:  # the final global model: the node keeps its personal model
        _keep_personal(msg, context, task, contract)
    return Message(RecordDict({P.METRICS: MetricRecord(dict(metrics))}), reply_to=msg)


def _keep_personal(msg: Message, context: Context, task: Task, contract: Contract) -> PersonalRecord | None:
    """The node's personal model for this task, made once from the final global model that
    ``msg`` carries (the final evaluation, the simulation's baseline, ``end``); nothing of it is
    sent (:mod:`fedgov.node.personal`). None when the message carries no model, the task asks
    for none, or it cannot be made (the reason goes to the node-local error report)."""
    if P.ARRAYS not in msg.content.array_records or not task.personal.enabled:
        return None
    node, home, _ = node_of(context)
    try:
        train_path, test_path = data_of(home, contract)
        state = {k: v.numpy() for k, v in msg.content.array_records[P.ARRAYS].items()}
        return ensure_personal(
            home, task, contract, node=node, task_id=task_id(msg), train_path=train_path, test_path=test_path, global_state=state,
        )
    except Exception as exc:  # noqa: BLE001 - the task's replies go on; the details stay at the node
        log.error("node %s: no personal model for task %s: %s", node, task.name, type(exc).__name__)
        try:
            append_private(home.path, "errors.log", f"--- personal model of task {task.name}\n{''.join(traceback.format_exception(exc))}\n")
        except OSError:
            pass
        return None
