"""The node's Flower mods (one signature: ``mod(msg, context, call_next) -> Message``).

Thin glue: a mod parses the message (:mod:`fedgov.node.context`), calls the function of
:mod:`fedgov.node` that decides (:mod:`~fedgov.node.admission`, :mod:`~fedgov.node.spend`,
:mod:`~fedgov.node.secure`, :mod:`~fedgov.node.gate`, :mod:`~fedgov.node.contracts`) and builds
the reply or the refusal. Their order is documented in ``clients/app.py``. A mod that refuses
answers itself and never calls the handler.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedgov import protocol as P
from fedgov.config import Task
from fedgov.errors import FedgovError, PrivacyError, SecAggError
from fedgov.node import admission, secure, spend
from fedgov.node.audit import as_finite
from fedgov.node.context import config_float, config_int, kind_of, node_of, query_of, task_id, task_of
from fedgov.node.gate import GateContext
from fedgov.node.refusals import Refusal, error_reason, refusal_text
from fedgov.node.rounds import DPState, model_digest
from fedgov.node.secure import NoRoster, StageRequest
from fedgov.node.statistics import query_fingerprint, query_id_of
from fedgov.privacy.secagg import NodeSecAgg, SecAggParams
from fedgov.transport import local_model, pack, unpack

__all__ = [
    "ERROR_REFUSED",
    "INTERNAL",
    "FlowerState",
    "admission_mod",
    "audit_mod",
    "budget_mod",
    "contract_mod",
    "gate_kind",
    "gate_mod",
    "internal",
    "pause_mod",
    "secagg_keep",
    "secagg_mod",
    "secagg_receive",
    "stash",
    "state_key",
]

log = logging.getLogger("fedgov.node")

ERROR_REFUSED = 403  # the code of a node's error reply that is a refusal, not a failure


class FlowerState:
    """The node's Flower state (``context.state``) as :class:`fedgov.node.secure.RunState`: a
    text per key, each in a :class:`ConfigRecord` of its own."""

    def __init__(self, context: Context) -> None:
        self._state = context.state

    def get(self, key: str) -> str | None:
        return str(self._state.config_records[key]["json"]) if key in self._state else None

    def put(self, key: str, text: str) -> None:
        self._state[key] = ConfigRecord({"json": text})


# --- parsing -----------------------------------------------------------------------------------


def state_key(msg: Message) -> str:
    """Where the node keeps its accountant for this task in its Flower state."""
    return "fedgov-dp-" + hashlib.sha256(task_id(msg).encode()).hexdigest()  # all 256 bits: no collisions to search


def _has_task(msg: Message) -> bool:
    return P.CONFIG in msg.content and P.TASK_JSON in msg.content.config_records[P.CONFIG]


def _has_query(msg: Message) -> bool:
    return P.CONFIG in msg.content and P.QUERY_JSON in msg.content.config_records[P.CONFIG]


def _query_id(msg: Message) -> str | None:
    """The ledger key of a statistics query message, or None for any other message."""
    if kind_of(msg) != P.STATS:
        return None
    q, contract = query_of(msg)
    return query_id_of(q, contract, msg.metadata.run_id)


def _round_key(msg: Message) -> str:
    """The key of the task or query of ``msg`` that every signature and record of secure
    aggregation is bound to (its ledger key)."""
    if _has_query(msg):
        q, contract = query_of(msg)
        return query_id_of(q, contract, msg.metadata.run_id)
    return task_id(msg)


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    """The global model a train or evaluate message carries."""
    return {k: v.numpy() for k, v in msg.content.array_records[P.ARRAYS].items()}


def _items(rec: ConfigRecord, key: str) -> list[Any]:
    v = rec[key]
    return list(v) if isinstance(v, list) else [v]


# --- replies -----------------------------------------------------------------------------------


def _hello_reply(msg: Message, hello: P.NodeHello, home: Any) -> Message:
    """A hello reply, naming the node by its own policy's name (:func:`~fedgov.node.admission.node_display_name`)."""
    hello = hello.model_copy(update={"node_name": admission.node_display_name(home, hello.node)})
    return Message(RecordDict({P.HELLO: ConfigRecord({P.NODE_JSON: hello.model_dump_json()})}), reply_to=msg)


def _refused(msg: Message, code: str, **params: Any) -> Message:
    """A refusal as an error reply: ``code`` and its fixed text (:mod:`fedgov.node.refusals`)."""
    return Message(Error(code=ERROR_REFUSED, reason=error_reason(code, **params)), reply_to=msg)


def _refusal(msg: Message, refusal: Refusal) -> Message:
    return Message(Error(code=ERROR_REFUSED, reason=refusal.reason()), reply_to=msg)


INTERNAL = "fedgov-internal"
"""Where a handler leaves, in the node's Flower state, what the mods need of its work but what
must not leave the node (rows, loss, the round's DP-SGD steps): the reply carries none of it."""


def stash(context: Context, values: dict[str, float]) -> None:
    context.state[INTERNAL] = MetricRecord({k: float(v) for k, v in values.items()})


def internal(context: Context) -> dict[str, float]:
    """What the last train handler left for the mods (:func:`stash`)."""
    if INTERNAL not in context.state:
        raise KeyError("the handler left no internal record")
    out: dict[str, float] = {}
    for k, v in context.state.metric_records[INTERNAL].items():
        if isinstance(v, list):
            raise TypeError(f"the internal record holds a list under {k}")
        out[k] = float(v)
    return out


def _describe(msg: Message) -> dict[str, Any]:
    """What a message carries, for the audit log: kinds, sizes, shapes, metric values. No rows."""
    out: dict[str, Any] = {"message_type": msg.metadata.message_type}
    if msg.has_error():
        out["error"] = {"code": msg.error.code, "reason": (msg.error.reason or "")[:500]}
        return out
    content = msg.content
    arrays = {}
    nbytes = 0
    for rec in content.array_records.values():
        for k, a in rec.items():
            arrays[k] = list(a.shape)
            nbytes += len(a.data)
    if arrays:
        out["arrays"] = arrays
        out["array_bytes"] = nbytes
    metrics = {k: as_finite(v) for mrec in content.metric_records.values() for k, v in mrec.items()}
    if metrics:
        out["metrics"] = metrics
    configs: dict[str, Any] = {}
    for crec in content.config_records.values():
        for k, v in crec.items():
            if k in (P.TASK_JSON, P.CONTRACT_JSON, P.QUERY_JSON):
                configs[k] = f"{len(str(v))} chars"
            elif k == P.NODE_JSON:
                configs[k] = str(v)[:2000]
            elif k == P.ANSWER_JSON:
                # A statistics answer: its noisy figures are what left the node; kept whole.
                configs[k] = str(v)
            elif isinstance(v, bytes):
                configs[k] = f"{len(v)} bytes"  # keys and encrypted shares of secure aggregation: their size
            elif isinstance(v, list) and v and isinstance(v[0], bytes):
                configs[k] = f"{len(v)} items, {sum(len(x) for x in v if isinstance(x, bytes))} bytes"
            else:
                configs[k] = v if isinstance(v, (int, float, str, bool)) else str(v)[:200]
    if configs:
        out["config"] = configs
    return out


# --- the mods, outermost first ----------------------------------------------------------------


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """1. Every message in and every reply out goes into the node's audit log."""
    try:
        _, home, _ = node_of(context)
        if not home.path.is_dir():
            return call_next(msg, context)
        tid = task_id(msg) if _has_task(msg) else _query_id(msg)
    except Exception:  # noqa: BLE001 - no node directory: nothing to audit into
        return call_next(msg, context)
    home.audit.append("received", task_id=tid, payload={"kind": kind_of(msg), **_describe(msg)})
    try:
        reply = call_next(msg, context)
    except Exception as exc:
        home.audit.append("failed", task_id=tid, payload={"kind": kind_of(msg), "error": type(exc).__name__})
        raise
    home.audit.append("sent", task_id=tid, payload={"kind": kind_of(msg), **_describe(reply)})
    return reply


def gate_kind(msg: Message) -> str:
    """The release gate's name for the kind of ``msg`` (:data:`fedgov.node.gate.DECLARATION`)."""
    kind = kind_of(msg)
    if kind == P.SECAGG:
        return "secagg-" + str(msg.content.config_records[P.CONFIG].get(P.SECAGG_STAGE, "?"))
    return kind


def _gate_context(msg: Message, context: Context, kind: str) -> GateContext:
    """What the gate checks a reply against; a hello or answer must name this node as it names itself."""
    from dataclasses import replace

    node, home, _ = node_of(context)
    ctx = _gate_context_of(msg, context, kind)
    return replace(ctx, identity=(node, admission.node_display_name(home, node))) if kind in (P.HELLO, P.STATS) else ctx


def _gate_context_of(msg: Message, context: Context, kind: str) -> GateContext:
    _, home, simulated = node_of(context)
    cfg = msg.content.config_records[P.CONFIG] if P.CONFIG in msg.content else None
    server_round = config_int(cfg, "server-round") if cfg is not None and "server-round" in cfg else None
    if _has_task(msg):
        task, contract = task_of(msg)
        return admission.task_gate_context(
            home, task, contract, task_id=task_id(msg), kind=kind, server_round=server_round, simulated=simulated
        )
    if _has_query(msg):
        q, contract = query_of(msg)
        return admission.query_gate_context(
            home, contract, query_id=_query_id(msg), secure=q.secure_aggregation, kind=kind, server_round=server_round,
            simulated=simulated,
        )
    return GateContext(kind=kind, server_round=server_round, simulated=simulated)


def gate_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """1b. The release gate (:mod:`fedgov.node.gate`): every reply, of every kind, is checked
    against the declaration of what may leave the node. A reply with anything else is not
    sent: the coordinator gets ``release-blocked``, the audit log names the fields (never
    their values), and the task is stopped at this node (its reservation closed, so every
    later message of it is refused). A handler that fails sends the fixed ``internal-error``."""
    from fedgov.node.gate import check_reply

    kind = gate_kind(msg)
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # noqa: BLE001 - its text may quote data: only the type is logged
        log.error("node: %s message failed: %s", kind, type(exc).__name__)
        reply = Message(Error(code=500, reason=error_reason("internal-error")), reply_to=msg)
    try:
        violations = check_reply(reply, _gate_context(msg, context, kind))
    except Exception as exc:  # noqa: BLE001 - a reply the gate cannot read does not leave
        violations = [f"the gate could not check the reply ({type(exc).__name__})"]
    if not violations:
        return reply
    log.error("node: release gate blocked a %s reply: %s", kind, "; ".join(violations))
    try:
        _, home, _ = node_of(context)
        tid = task_id(msg) if _has_task(msg) else _query_id(msg)
        task, contract = task_of(msg) if _has_task(msg) else (None, None)
        admission.stop_blocked(home, kind=kind, task_id=tid, violations=violations, task=task, contract=contract)
    except Exception:  # noqa: BLE001 - blocked all the same
        log.error("node: could not record the release gate's block")
    return _refused(msg, "release-blocked")


def pause_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """2. A paused node takes part in nothing from the next message on (no restart needed)."""
    kind = kind_of(msg)
    if kind == P.END or not _has_task(msg):
        return call_next(msg, context)
    node, home, _ = node_of(context)
    if home.path.is_dir():
        paused, _ = home.state.paused()
        if paused:
            log.warning("node %s: paused, refusing %s", node, kind)
            if kind == P.HELLO:
                return _hello_reply(msg, admission.hello_refusal(node, P.RefusalCode.PAUSED.value, refusal_text("paused")), home)
            return _refused(msg, "paused")
    return call_next(msg, context)


def contract_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """2b. The contract check, before anything is read: a message's contract must be byte for
    byte the canonical JSON of a contract file this node holds and pins for that name and
    version (:mod:`fedgov.node.contracts`); else ``contract-mismatch``. A contract name the
    node does not serve at all goes on to the policy check (``contract-not-served``)."""
    from fedgov.node.contracts import ContractCheck, check_received, serving

    kind = kind_of(msg)
    if kind == P.END or P.CONFIG not in msg.content or P.CONTRACT_JSON not in msg.content.config_records[P.CONFIG]:
        return call_next(msg, context)
    try:
        node, home, _ = node_of(context)
    except Exception:  # noqa: BLE001 - no node directory: the handlers say so
        return call_next(msg, context)
    if not home.exists():
        return call_next(msg, context)  # no policy: the policy check refuses (no-policy)
    received = str(msg.content.config_records[P.CONFIG][P.CONTRACT_JSON])
    try:
        verdict = check_received(home.policy(), received)
    except FedgovError as exc:  # the policy or a pinned file cannot be used: nothing is served
        log.error("node %s: its policy or pinned contracts cannot be used (%s); refusing %s", node, type(exc).__name__, kind)
        verdict = ContractCheck("mismatch", "unknown", why="policy error")
    if verdict.outcome == "mismatch":
        ref = verdict.ref
        log.warning("node %s: refusing %s: its contract %s is not the one this node holds (%s)", node, kind, ref, verdict.why)
        try:
            tid = task_id(msg) if _has_task(msg) else _query_id(msg)
        except Exception:  # noqa: BLE001 - a contract that does not even parse has no task id
            tid = None
        home.audit.append("refused", task_id=tid, payload={"kind": kind, "code": P.RefusalCode.CONTRACT_MISMATCH.value, "contract": ref})
        if kind == P.HELLO:
            text = refusal_text(P.RefusalCode.CONTRACT_MISMATCH.value, contract=ref)
            return _hello_reply(msg, admission.hello_refusal(node, P.RefusalCode.CONTRACT_MISMATCH.value, text), home)
        return _refused(msg, P.RefusalCode.CONTRACT_MISMATCH.value, contract=ref)
    with serving(home):
        return call_next(msg, context)


def admission_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """3. Policy before data; then approval and the ledger reservation; only admitted tasks run
    (:mod:`fedgov.node.admission`). The hello the handler answers holds the node's row counts
    and DP-SGD plan, for the checks there; what leaves is only its public part."""
    kind = kind_of(msg)
    if not _has_task(msg) or kind == P.END:
        return call_next(msg, context)
    task, contract = task_of(msg)
    node, home, simulated = node_of(context)
    tid = task_id(msg)
    if kind != P.HELLO:
        refusal = admission.check_admitted(home, contract, task, task_id=tid)
        return _refusal(msg, refusal) if refusal is not None else call_next(msg, context)
    early = admission.before_hello(home, task, contract, node=node, task_id=tid, simulated=simulated)
    if early is not None:
        return _hello_reply(msg, early, home)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    hello = P.NodeHello.model_validate_json(str(reply.content.config_records[P.HELLO][P.NODE_JSON]))
    state, key = FlowerState(context), state_key(msg)
    public, resumed = admission.after_hello(home, task, contract, hello, task_id=tid, accountant=state.get(key))
    if resumed is not None:
        state.put(key, resumed)
    return _hello_reply(msg, public, home)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """3b. Secure aggregation (:mod:`fedgov.node.secure`): the protocol's stages (``secagg``
    query messages, for training tasks and statistics queries), and a training task's train
    reply masked so that the coordinator learns only the round's sum (a query's release is
    masked in its handler, ``clients/app.py``).

    A task that asks for secure aggregation never gets a plaintext update from this node: a
    train message without the protocol's shares is refused (no downgrade by the coordinator).
    Under distributed DP the coordinator's parameters are checked against the node's own plan
    before anything is trained (:func:`fedgov.node.secure.check_distributed`).
    """
    kind = kind_of(msg)
    if kind not in (P.SECAGG, "train") or P.CONFIG not in msg.content:
        return call_next(msg, context)
    cfg = msg.content.config_records[P.CONFIG]
    if kind == P.SECAGG and P.QUERY_JSON in cfg:
        q, _ = query_of(msg)
        if not q.secure_aggregation:
            return _refused(msg, "secure-aggregation")
        return _stage(msg, context, SecAggParams())
    if not _has_task(msg):
        return call_next(msg, context)
    task, _ = task_of(msg)
    t = task.training
    if not t.secure_aggregation:
        if kind == P.SECAGG:
            return _refused(msg, "secure-aggregation")
        return call_next(msg, context)
    params = SecAggParams(clip=t.secure_clip)
    server_round = config_int(cfg, "server-round")
    if kind == P.SECAGG:
        return _stage(msg, context, params)
    # a train message: decrypt the routed shares, train, mask the update
    try:
        st, survivors = secagg_receive(msg, context, server_round)
        distributed = None
        if task.privacy.enabled and task.privacy.mode == "distributed":
            distributed = _distributed(msg, context, task, len(survivors))
            st.min_survivors = distributed[1]  # kept: the survivors at unmask are checked against it
    except PrivacyError as exc:
        log.warning("node: distributed DP refused: %s", exc)
        return _refused(msg, "distributed-dp")
    except (SecAggError, KeyError, ValueError, TypeError) as exc:
        return _secagg_stopped(msg, context, exc)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    glob = _arrays(msg)
    local = local_model(reply.content.array_records[P.ARRAYS], glob)
    update = [local[k].astype(float) - glob[k].astype(float) for k in glob]
    try:
        masked = secure.mask_update(
            st, update, survivors=survivors, params=params, distributed=distributed, metrics=internal(context),
            weight_cap=t.secure_weight_cap, coin=_coin,
        )
    except (SecAggError, PrivacyError) as exc:
        return _secagg_stopped(msg, context, exc)
    secagg_keep(msg, context, st)
    # Only the masked vector leaves; the row count is inside it as the weight (or, under
    # distributed DP, every node weighs the same).
    return Message(
        RecordDict({P.ARRAYS: ArrayRecord({P.MASKED: Array(masked.astype(np.uint32))}), P.METRICS: MetricRecord({"num-examples": 1.0})}),
        reply_to=msg,
    )


def _coin(rate: float) -> bool:
    """The node's secret sampling coin under distributed DP (:func:`fedgov.node.secure.secure_coin`)."""
    return secure.secure_coin(rate)


def _stage(msg: Message, context: Context, params: SecAggParams) -> Message:
    """A ``secagg`` message: parsed, answered by :func:`fedgov.node.secure.run_stage`."""
    try:
        cfg = msg.content.config_records[P.CONFIG]
        server_round = config_int(cfg, "server-round")
        rkey = _round_key(msg)
        stage = str(cfg[P.SECAGG_STAGE])
        _, home, _ = node_of(context)
        me = secure.node_identity(home)
        req = _stage_request(msg, cfg, stage=stage, server_round=server_round, round_key=rkey)
        out = secure.run_stage(req, me, state=FlowerState(context), node_id=int(context.node_id), params=params)
    except NoRoster:
        return _no_roster(msg, context)
    except (SecAggError, KeyError, ValueError, TypeError) as exc:
        return _secagg_stopped(msg, context, exc)
    return Message(RecordDict({P.SECAGG: ConfigRecord(out)}), reply_to=msg)


def _raw(x: Any) -> bytes:
    """A key or signature of a stage message: bytes as sent (``bytes(n)`` of an int would
    allocate n bytes at the coordinator's word)."""
    if not isinstance(x, bytes):
        raise TypeError(f"a key or signature is {type(x).__name__}, not bytes")
    return x


def _stage_request(msg: Message, cfg: ConfigRecord, *, stage: str, server_round: int, round_key: str) -> StageRequest:
    if stage == "keys":
        return StageRequest(stage, server_round, round_key, graph_key=_graph_key(msg, server_round))
    if stage == "shares":
        keys = list(zip(
            [int(str(x)) for x in _items(cfg, "nodes")],
            [_raw(x) for x in _items(cfg, "c-pks")], [_raw(x) for x in _items(cfg, "s-pks")],
            [str(x) for x in _items(cfg, "names")], [_raw(x) for x in _items(cfg, "sigs")],
            strict=True,
        ))
        return StageRequest(stage, server_round, round_key, round_keys=keys)
    if stage in ("consistency", "unmask"):
        survivors = sorted({int(str(x)) for x in _items(cfg, "survivors")})
        if stage == "consistency":
            return StageRequest(stage, server_round, round_key, survivors=survivors)
        signers = [int(str(x)) for x in _items(cfg, "signers")] if "signers" in cfg else []
        sigs = [_raw(x) for x in _items(cfg, "sigs")] if "sigs" in cfg else []
        return StageRequest(stage, server_round, round_key, survivors=survivors, signers=signers, signatures=sigs)
    return StageRequest(stage, server_round, round_key)  # an unknown stage: the node refuses it


def _graph_key(msg: Message, server_round: int) -> str:
    if _has_query(msg):
        q, contract = query_of(msg)
        return secure.secagg_graph_key(kind="query", fingerprint=query_fingerprint(q, contract), server_round=server_round)
    task, contract = task_of(msg)
    return secure.secagg_graph_key(
        kind="task", fingerprint=P.fingerprint(task, contract), server_round=server_round, rounds=task.training.rounds
    )


def secagg_receive(msg: Message, context: Context, server_round: int) -> tuple[NodeSecAgg, list[int]]:
    """The node's keys for this round, with the shares the message routed to it decrypted; and
    the round's nodes. :class:`SecAggError` when the message carries no shares (no downgrade)."""
    if P.SECAGG not in msg.content.config_records:
        raise SecAggError("the task requires it but this message carries no shares; nothing is sent")
    rec = msg.content.config_records[P.SECAGG]
    ciphertexts = dict(zip([int(str(x)) for x in _items(rec, "src")], [bytes(c) for c in _items(rec, "ct")], strict=True))
    survivors = [int(str(x)) for x in _items(rec, "nodes")]
    st = secure.receive_shares(
        FlowerState(context), round_key=_round_key(msg), server_round=server_round, node_id=int(context.node_id),
        ciphertexts=ciphertexts, nodes=survivors,
    )
    return st, survivors


def secagg_keep(msg: Message, context: Context, st: NodeSecAgg) -> None:
    secure.keep_keys(FlowerState(context), st, round_key=_round_key(msg))


def _distributed(msg: Message, context: Context, task: Task, survivors: int) -> tuple[Any, int]:
    rec = msg.content.config_records[P.SECAGG]
    text = FlowerState(context).get(state_key(msg))
    return secure.check_distributed(
        DPState.from_json(text) if text is not None else None, task,
        z=config_float(rec, "dd-z"), scale=config_float(rec, "dd-scale"), min_contributors=config_int(rec, "dd-min"),
        survivors=survivors,
    )


def _no_roster(msg: Message, context: Context) -> Message:
    """Secure aggregation refused: this node's policy pins no roster (secure by default)."""
    try:
        _, home, _ = node_of(context)
        if home.path.is_dir():
            tid = task_id(msg) if _has_task(msg) else _query_id(msg)
            home.audit.append("refused", task_id=tid, payload={"kind": kind_of(msg), "code": "secure-aggregation-no-roster"})
    except Exception:  # noqa: BLE001 - no node directory to audit into
        pass
    return _refused(msg, "secure-aggregation-no-roster")


def _secagg_stopped(msg: Message, context: Context, exc: BaseException) -> Message:
    """Secure aggregation stopped at this node: the reason in its audit log, a fixed text out."""
    log.warning("node: secure aggregation stopped: %s", type(exc).__name__)
    try:
        _, home, _ = node_of(context)
        if home.path.is_dir():
            tid = task_id(msg) if _has_task(msg) else _query_id(msg)
            home.audit.append("secagg-stopped", task_id=tid, payload={"error": type(exc).__name__, "reason": str(exc)[:300]})
    except Exception:  # noqa: BLE001 - no node directory to audit into
        pass
    return _refused(msg, "secure-aggregation")


def budget_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """4. A train reply leaves only after its spend is in the ledger (a round already spent is
    resent or refused, never trained twice); an evaluation's spend is recorded before it is
    computed (one per round, only the planned ones); ``end`` releases the rest
    (:mod:`fedgov.node.spend`)."""
    kind = kind_of(msg)
    if not _has_task(msg) or kind not in ("train", "evaluate", P.END):
        return call_next(msg, context)
    task, contract = task_of(msg)
    _, home, _ = node_of(context)
    tid = task_id(msg)
    if kind == P.END:
        spend.end_task(home, contract, task, task_id=tid)
        return call_next(msg, context)
    server_round = config_int(msg.content.config_records[P.CONFIG], "server-round")
    if kind == "evaluate":
        state, key = FlowerState(context), state_key(msg)
        text = state.get(key)
        charged = spend.before_evaluation(
            home, contract, task, task_id=tid, server_round=server_round, dp=DPState.from_json(text) if text is not None else None
        )
        if isinstance(charged, Refusal):
            return _refusal(msg, charged)
        if charged is not None:
            state.put(key, charged.to_json())
        return call_next(msg, context)
    if not task.privacy.enabled:
        return call_next(msg, context)
    digest = model_digest(_arrays(msg))
    before = spend.before_train(home, contract, task, task_id=tid, server_round=server_round, digest=digest)
    if isinstance(before, Refusal):
        return _refusal(msg, before)
    if isinstance(before, spend.Resend):
        stash(context, before.metrics)
        num = float(before.metrics["num-examples"])
        return Message(RecordDict({P.ARRAYS: pack(before.arrays), P.METRICS: MetricRecord({"num-examples": num})}), reply_to=msg)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    refusal = spend.after_train(
        home, contract, task, task_id=tid, server_round=server_round, digest=digest,
        update=unpack(reply.content.array_records[P.ARRAYS]), metrics=internal(context),
    )
    return _refusal(msg, refusal) if refusal is not None else reply
