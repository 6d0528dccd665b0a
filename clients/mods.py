"""The node's Flower mods (one signature: ``mod(msg, context, call_next) -> Message``).

Thin glue over :mod:`fedgov.admission` and :mod:`fedgov.audit`; their order is documented in
``clients/app.py``. A mod that refuses answers itself and never calls the handler.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from clients.context import kind_of, node_of, task_id, task_of
from fedgov import admission
from fedgov import protocol as P
from fedgov.errors import PrivacyError
from fedgov.node import DPState, SentUpdates, model_digest
from fedgov.secagg import NodeSecAgg, SecAggError, SecAggParams, encode_update
from fedgov.transport import local_model, pack, unpack

log = logging.getLogger("fedgov.node")

ERROR_REFUSED = 403  # the code of a node's error reply that is a refusal, not a failure


def state_key(msg: Message) -> str:
    """Where the node keeps its accountant for this task in its Flower state."""
    return "fedgov-dp-" + hashlib.sha256(task_id(msg).encode()).hexdigest()[:16]


def _has_task(msg: Message) -> bool:
    return P.CONFIG in msg.content and P.TASK_JSON in msg.content[P.CONFIG]


def _query_id(msg: Message) -> str | None:
    """The ledger key of a statistics query message, or None for any other message."""
    if kind_of(msg) != P.STATS:
        return None
    from clients.context import query_of
    from fedgov.stats import query_id_of

    q, contract = query_of(msg)
    return query_id_of(q, contract, msg.metadata.run_id)


def _hello_reply(msg: Message, hello: P.NodeHello) -> Message:
    return Message(RecordDict({P.HELLO: ConfigRecord({P.NODE_JSON: hello.model_dump_json()})}), reply_to=msg)


def _refused(msg: Message, reason: str) -> Message:
    return Message(Error(code=ERROR_REFUSED, reason=reason), reply_to=msg)


def _finite(v: Any) -> Any:
    """Canonical JSON has no NaN or infinity: such a metric is logged as text."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


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
    metrics = {k: _finite(v) for rec in content.metric_records.values() for k, v in rec.items()}
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
            elif isinstance(v, bytes) or (isinstance(v, list) and v and isinstance(v[0], bytes)):
                # keys and encrypted shares of secure aggregation: their size, not their bytes
                configs[k] = f"{len(v)} bytes" if isinstance(v, bytes) else f"{len(v)} items, {sum(len(x) for x in v)} bytes"
            else:
                configs[k] = v if isinstance(v, (int, float, str, bool)) else str(v)[:200]
    if configs:
        out["config"] = configs
    return out


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


def pause_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """2. A paused node takes part in nothing from the next message on (no restart needed)."""
    kind = kind_of(msg)
    if kind == P.END or not _has_task(msg):
        return call_next(msg, context)
    node, home, _ = node_of(context)
    if home.path.is_dir():
        paused, why = home.state.paused()
        if paused:
            reason = f"the node is paused by its operator{': ' + why if why else ''}"
            log.warning("node %s: paused, refusing %s", node, kind)
            if kind == P.HELLO:
                return _hello_reply(msg, admission._refusal(node, P.RefusalCode.PAUSED.value, reason))
            return _refused(msg, f"{P.RefusalCode.PAUSED.value}: {reason}")
    return call_next(msg, context)


def admission_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """3. Policy before data; then approval and the ledger reservation; only admitted tasks run."""
    kind = kind_of(msg)
    if not _has_task(msg) or kind == P.END:
        return call_next(msg, context)
    task, contract = task_of(msg)
    node, home, _ = node_of(context)
    tid = task_id(msg)
    if kind == P.HELLO:
        early = admission.precheck(home, task, contract, node=node)
        if early is not None:
            _audit_decision(home, tid, early)
            return _hello_reply(msg, early)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        hello = P.NodeHello.model_validate_json(str(reply.content[P.HELLO][P.NODE_JSON]))
        key = state_key(msg)
        history: list[tuple[float, float, int]] = []
        if hello.accepted and task.privacy.enabled:
            dp = DPState.from_json(str(context.state[key]["json"]))
            plan = dp.plan(task, hello.train_rows)
            history = plan.history_after(task.training.rounds)
        final = admission.admit(home, task, contract, hello, task_id=tid, history=history)
        if final.accepted and task.privacy.enabled:
            done = admission.spent(home, contract, task, task_id=tid)
            if done:
                # A resumed task: the accountant continues from this node's own ledger.
                dp = DPState.from_json(str(context.state[key]["json"]))
                dp.history = [e for r in sorted(done) for e in done[r]]
                context.state[key] = ConfigRecord({"json": dp.to_json()})
                home.audit.append("resume", task_id=tid, payload={"rounds_spent": sorted(done)})
        _audit_decision(home, tid, final, history)
        return reply if final is hello else _hello_reply(msg, final)
    if not admission.is_admitted(home, contract, tid, task):
        return _refused(msg, f"{P.RefusalCode.NOT_ADMITTED.value}: this node did not admit task {tid}, or it has ended")
    return call_next(msg, context)


def _audit_decision(home: Any, tid: str, hello: P.NodeHello, history: list[tuple[float, float, int]] | None = None) -> None:
    if not home.path.is_dir():
        return
    payload: dict[str, Any] = {"accepted": hello.accepted, "code": hello.code, "reason": hello.reason}
    if hello.accepted:
        payload.update(rows=hello.train_rows, delta=hello.delta, noise_multiplier=hello.noise_multiplier,
                       epsilon_reserved=hello.planned_epsilon, mechanism=[list(h) for h in history or []])
    home.audit.append("decision", task_id=tid, payload=payload)


def budget_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """4. A train reply leaves only after its spend is in the ledger; ``end`` releases the rest."""
    kind = kind_of(msg)
    if not _has_task(msg) or kind not in ("train", P.END):
        return call_next(msg, context)
    task, contract = task_of(msg)
    _, home, _ = node_of(context)
    tid = task_id(msg)
    sent = SentUpdates(home.path / "sent")
    if kind == P.END:
        admission.release(home, contract, task, task_id=tid, note="task ended")
        sent.drop(tid)
        home.audit.append("release", task_id=tid, payload={"ledger": "released what was reserved and not spent"})
        return call_next(msg, context)
    if not task.privacy.enabled:
        return call_next(msg, context)
    server_round = int(msg.content[P.CONFIG]["server-round"])  # type: ignore[arg-type]
    digest = model_digest({k: v.numpy() for k, v in msg.content.array_records[P.ARRAYS].items()})
    if server_round in admission.spent(home, contract, task, task_id=tid):
        # This round was trained and spent before (the coordinator restarted in the middle of it).
        if task.privacy.mode == "distributed":
            # The noise share is drawn when the update is masked: a second one would be a second
            # release of the same update. The round goes on without this node.
            return _refused(
                msg, f"round {server_round} of task {tid} was already spent at this node; under distributed DP its "
                "noisy share is not sent twice",
            )
        again = sent.load(tid, server_round, digest)
        if again is None:
            return _refused(
                msg, f"round {server_round} of task {tid} was already trained and spent at this node from another "
                "global model; a second update would be a second release",
            )
        arrays, metrics = again
        home.audit.append("resent", task_id=tid, payload={"round": server_round, "ledger": "no new spend"})
        content = RecordDict({P.ARRAYS: pack(arrays), P.METRICS: MetricRecord(dict(metrics))})  # type: ignore[arg-type]
        return Message(content, reply_to=msg)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    m = next(iter(reply.content.metric_records.values()))
    entry = (float(m["noise-multiplier"]), float(m["sample-rate"]), int(m["steps"]))  # type: ignore[arg-type]
    try:
        admission.record_spend(home, contract, task, task_id=tid, entries=[entry], server_round=server_round)
    except Exception as exc:  # the spend could not be recorded: the update must not leave
        log.exception("node: recording the spend failed; withholding the update")
        return _refused(msg, f"the node could not record this round's privacy spend ({type(exc).__name__})")
    home.audit.append("spend", task_id=tid, payload={"round": server_round, "mechanism": list(entry), "epsilon_task": _finite(m["epsilon"])})
    try:
        sent.save(
            tid, server_round, digest, unpack(reply.content.array_records[P.ARRAYS]),
            {k: float(v) for k, v in m.items() if isinstance(v, (int, float))},
        )
    except OSError:  # without the copy, a resumed round is refused rather than charged twice
        log.warning("node: could not keep a copy of the sent update", exc_info=True)
    return reply


def _secagg_key(msg: Message) -> str:
    """Where a node keeps its secure-aggregation keys for the task or query of ``msg``."""
    if P.QUERY_JSON in msg.content[P.CONFIG]:
        from clients.context import query_of
        from fedgov.stats import query_id_of

        q, contract = query_of(msg)
        return "fedgov-secagg-" + hashlib.sha256(query_id_of(q, contract, msg.metadata.run_id).encode()).hexdigest()[:16]
    return "fedgov-secagg-" + hashlib.sha256(task_id(msg).encode()).hexdigest()[:16]


def _items(rec: ConfigRecord, key: str) -> list[Any]:
    v = rec[key]
    return list(v) if isinstance(v, list) else [v]


def secagg_state(context: Context, key: str, server_round: int) -> NodeSecAgg:
    if key not in context.state:
        raise SecAggError("no secure-aggregation keys for this task: the keys stage did not reach this node")
    st = NodeSecAgg.from_json(str(context.state[key]["json"]))
    if st.round != server_round:
        raise SecAggError(f"the keys are of round {st.round}, the message is of round {server_round}")
    return st


def secagg_receive(msg: Message, context: Context, server_round: int) -> tuple[NodeSecAgg, list[int]]:
    """The node's keys for this round, with the shares the message routed to it decrypted; and
    the round's nodes. :class:`SecAggError` when the message carries no shares (no downgrade)."""
    if P.SECAGG not in msg.content.config_records:
        raise SecAggError("the task requires it but this message carries no shares; nothing is sent")
    rec = msg.content.config_records[P.SECAGG]
    st = secagg_state(context, _secagg_key(msg), server_round)
    st.receive(dict(zip([int(str(x)) for x in _items(rec, "src")], [bytes(c) for c in _items(rec, "ct")], strict=True)))
    survivors = [int(str(x)) for x in _items(rec, "nodes")]
    if int(context.node_id) not in survivors:
        raise SecAggError("this node is not among the round's nodes")
    return st, survivors


def secagg_keep(msg: Message, context: Context, st: NodeSecAgg) -> None:
    context.state[_secagg_key(msg)] = ConfigRecord({"json": st.to_json()})


def _secagg_stage(msg: Message, context: Context, params: SecAggParams) -> Message:
    cfg = msg.content[P.CONFIG]
    server_round = int(cfg["server-round"])  # type: ignore[arg-type]
    key = _secagg_key(msg)
    stage = str(cfg[P.SECAGG_STAGE])
    out: dict[str, Any] = {}
    if stage == "keys":
        st, c_pk, s_pk = NodeSecAgg.keys(int(context.node_id), server_round)
        out = {"c-pk": c_pk, "s-pk": s_pk}
    elif stage == "shares":
        st = secagg_state(context, key, server_round)
        ids = [int(str(x)) for x in cfg["nodes"]]  # type: ignore[union-attr]
        pks = dict(zip(ids, zip(cfg["c-pks"], cfg["s-pks"], strict=True), strict=True))  # type: ignore[arg-type]
        cts = st.shares(pks, params)  # type: ignore[arg-type]
        out = {"dst": [str(d) for d in cts], "ct": list(cts.values())}
    elif stage == "unmask":
        st = secagg_state(context, key, server_round)
        revealed = st.reveal([int(str(x)) for x in cfg["survivors"]], [int(str(x)) for x in cfg.get("dropped", [])])  # type: ignore[union-attr]
        out = {"owner": [str(o) for o in revealed], "share": list(revealed.values())}
    else:
        raise SecAggError(f"unknown stage {stage!r}")
    context.state[key] = ConfigRecord({"json": st.to_json()})
    return Message(RecordDict({P.SECAGG: ConfigRecord(out)}), reply_to=msg)


def _distributed_check(msg: Message, context: Context, task: Any, survivors: list[int]) -> tuple[Any, int]:
    """Distributed DP (:mod:`fedgov.privacy.distributed`), before any training: this node's own
    plan (fixed at hello) and the contributors the coordinator sizes the noise shares for. The
    coordinator's copy of the public parameters must agree, and it cannot claim more
    contributors than the round has nodes: else nothing is trained, spent or sent."""
    from fedgov.privacy.distributed import tau, TAU_LIMIT

    rec = msg.content.config_records[P.SECAGG]
    key = state_key(msg)
    dp = DPState.from_json(str(context.state[key]["json"])) if key in context.state else None
    if dp is None or not dp.plan_json:
        raise PrivacyError("no distributed-DP plan at this node for this task")
    plan = dp.plan(task, 0)
    z, scale = float(rec["dd-z"]), float(rec["dd-scale"])  # type: ignore[arg-type]
    if not (math.isclose(z, plan.noise_multiplier, rel_tol=1e-9) and math.isclose(scale, plan.scale, rel_tol=1e-9)):
        raise PrivacyError(
            f"the coordinator's distributed-DP parameters (z {z:.6g}, scale {scale:.6g}) are not this node's "
            f"(z {plan.noise_multiplier:.6g}, scale {plan.scale:.6g})"
        )
    min_contributors = int(rec["dd-min"])  # type: ignore[arg-type]
    if not 1 <= min_contributors <= len(survivors):
        raise PrivacyError(f"min_contributors {min_contributors} must be between 1 and the round's {len(survivors)} nodes")
    if tau(plan.node_variance(min_contributors), len(survivors)) * plan.dimension > TAU_LIMIT:
        raise PrivacyError("each node's noise share is too small for the distributed discrete Gaussian analysis")
    return plan, min_contributors


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """3b. Secure aggregation (:mod:`fedgov.secagg`): the protocol's stages (``secagg`` query
    messages, for training tasks and statistics queries), and a training task's train reply
    masked so that the coordinator learns only the round's sum (a query's release is masked in
    its handler, ``clients/app.py``).

    A task that asks for secure aggregation never gets a plaintext update from this node: a
    train message without the protocol's shares is refused (no downgrade by the coordinator).
    """
    kind = kind_of(msg)
    if kind not in (P.SECAGG, "train") or P.CONFIG not in msg.content:
        return call_next(msg, context)
    cfg = msg.content[P.CONFIG]
    if kind == P.SECAGG and P.QUERY_JSON in cfg:
        from clients.context import query_of

        q, _ = query_of(msg)
        if not q.secure_aggregation:
            return _refused(msg, "secure aggregation: this query does not use it (secure_aggregation = false)")
        try:
            return _secagg_stage(msg, context, SecAggParams())
        except (SecAggError, KeyError, ValueError, TypeError) as exc:
            log.warning("node: secure aggregation stopped: %s", exc)
            return _refused(msg, f"secure aggregation: {exc}")
    if not _has_task(msg):
        return call_next(msg, context)
    task, _ = task_of(msg)
    t = task.training
    if not t.secure_aggregation:
        if kind == P.SECAGG:
            return _refused(msg, "secure aggregation: this task does not use it (training.secure_aggregation = false)")
        return call_next(msg, context)
    params = SecAggParams(clip=t.secure_clip)
    server_round = int(cfg["server-round"])  # type: ignore[arg-type]
    try:
        if kind == P.SECAGG:
            return _secagg_stage(msg, context, params)
        # a train message: decrypt the routed shares, train, mask the update
        st, survivors = secagg_receive(msg, context, server_round)
        distributed = None
        if task.privacy.enabled and task.privacy.mode == "distributed":
            distributed = _distributed_check(msg, context, task, survivors)
    except (SecAggError, PrivacyError, KeyError, ValueError, TypeError) as exc:
        log.warning("node: secure aggregation stopped: %s", exc)
        return _refused(msg, f"secure aggregation: {exc}")
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    glob = {k: v.numpy() for k, v in msg.content.array_records[P.ARRAYS].items()}
    local = local_model(reply.content.array_records[P.ARRAYS], glob)
    m = next(iter(reply.content.metric_records.values()))
    update = [local[k].astype(float) - glob[k].astype(float) for k in glob]
    try:
        if distributed is not None:
            from fedgov.privacy.distributed import encode_share

            plan, min_contributors = distributed
            y = encode_share(update, plan, min_contributors=min_contributors, contributors=len(survivors))
        else:
            weight = min(float(m["num-examples"]), t.secure_weight_cap) / t.secure_weight_cap  # type: ignore[arg-type]
            y = encode_update(update, weight, params)
        masked = st.mask(y, survivors)
    except (SecAggError, PrivacyError) as exc:
        return _refused(msg, f"secure aggregation: {exc}")
    secagg_keep(msg, context, st)
    # The exact row count stays at the node (the weight is inside the masked sum).
    metrics = {k: v for k, v in m.items() if k != "num-examples"}
    metrics["num-examples"] = 1.0
    return Message(
        RecordDict({P.ARRAYS: ArrayRecord({P.MASKED: Array(masked.astype(np.uint32))}), P.METRICS: MetricRecord(metrics)}),  # type: ignore[arg-type]
        reply_to=msg,
    )
