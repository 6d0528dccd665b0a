"""The node's Flower mods (one signature: ``mod(msg, context, call_next) -> Message``).

Thin glue over :mod:`fedgov.node.admission` and :mod:`fedgov.node.audit`; their order is documented in
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

from fedgov.node.context import kind_of, node_of, task_id, task_of
from fedgov.node import admission
from fedgov import protocol as P
from fedgov.errors import PrivacyError
from fedgov.node.refusals import error_reason, refusal_text
from fedgov.node.rounds import DPState, SentUpdates, model_digest
from fedgov.privacy.secagg import NodeSecAgg, SecAggParams, encode_update
from fedgov.errors import SecAggError
from fedgov.transport import local_model, pack, unpack

log = logging.getLogger("fedgov.node")

ERROR_REFUSED = 403  # the code of a node's error reply that is a refusal, not a failure


def state_key(msg: Message) -> str:
    """Where the node keeps its accountant for this task in its Flower state."""
    return "fedgov-dp-" + hashlib.sha256(task_id(msg).encode()).hexdigest()  # all 256 bits: no collisions to search


def _has_task(msg: Message) -> bool:
    return P.CONFIG in msg.content and P.TASK_JSON in msg.content[P.CONFIG]


def _query_id(msg: Message) -> str | None:
    """The ledger key of a statistics query message, or None for any other message."""
    if kind_of(msg) != P.STATS:
        return None
    from fedgov.node.context import query_of
    from fedgov.launch.query import query_id_of

    q, contract = query_of(msg)
    return query_id_of(q, contract, msg.metadata.run_id)


def _hello_reply(msg: Message, hello: P.NodeHello) -> Message:
    return Message(RecordDict({P.HELLO: ConfigRecord({P.NODE_JSON: hello.model_dump_json()})}), reply_to=msg)


def _refused(msg: Message, code: str, **params: Any) -> Message:
    """A refusal as an error reply: ``code`` and its fixed text (:mod:`fedgov.node.refusals`)."""
    return Message(Error(code=ERROR_REFUSED, reason=error_reason(code, **params)), reply_to=msg)


INTERNAL = "fedgov-internal"
"""Where a handler leaves, in the node's Flower state, what the mods need of its work but what
must not leave the node (rows, loss, the round's DP-SGD steps): the reply carries none of it."""


def stash(context: Context, values: dict[str, float]) -> None:
    context.state[INTERNAL] = MetricRecord({k: float(v) for k, v in values.items()})


def internal(context: Context) -> dict[str, float]:
    """What the last train handler left for the mods (:func:`stash`)."""
    if INTERNAL not in context.state:
        raise KeyError("the handler left no internal record")
    return {k: float(v) for k, v in context.state[INTERNAL].items()}  # type: ignore[union-attr, arg-type]


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
        paused, _ = home.state.paused()
        if paused:
            log.warning("node %s: paused, refusing %s", node, kind)
            if kind == P.HELLO:
                return _hello_reply(msg, admission._refusal(node, P.RefusalCode.PAUSED.value, refusal_text("paused")))
            return _refused(msg, "paused")
    return call_next(msg, context)


def admission_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """3. Policy before data; then approval and the ledger reservation; only admitted tasks run.

    The hello the handler answers holds the node's row counts and DP-SGD plan, for the checks
    here; what leaves is only the public part (:func:`_public_hello`)."""
    kind = kind_of(msg)
    if not _has_task(msg) or kind == P.END:
        return call_next(msg, context)
    task, contract = task_of(msg)
    node, home, simulated = node_of(context)
    tid = task_id(msg)
    if kind == P.HELLO:
        early = admission.precheck(home, task, contract, node=node, simulated=simulated)
        if early is None and task.privacy.enabled and task.privacy.reproducible_noise and not simulated:
            early = admission._refusal(node, "reproducible-noise", refusal_text("reproducible-noise"))
        if early is None and task.training.secure_aggregation and home.policy().secure_aggregation is None:
            # Secure by default: without a pinned roster no peer's keys can be checked.
            early = admission._refusal(node, "secure-aggregation-no-roster", refusal_text("secure-aggregation-no-roster"))
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
            history = plan.planned_history() if hasattr(plan, "planned_history") else plan.history_after(task.training.rounds)
        final = admission.admit(home, task, contract, hello, task_id=tid, history=history)
        if final.accepted and task.privacy.enabled:
            done = admission.spent(home, contract, task, task_id=tid)
            if done:
                # A resumed task: the accountant continues from this node's own ledger.
                dp = DPState.from_json(str(context.state[key]["json"]))
                dp.history = admission.spent_history(home, contract, task, task_id=tid)
                context.state[key] = ConfigRecord({"json": dp.to_json()})
                home.audit.append("resume", task_id=tid, payload={"rounds_spent": sorted(done)})
        _audit_decision(home, tid, final, history)
        return _hello_reply(msg, _public_hello(final, task))
    if not admission.is_admitted(home, contract, tid, task):
        return _refused(msg, P.RefusalCode.NOT_ADMITTED.value, task_id=tid)
    return call_next(msg, context)


def _public_hello(hello: P.NodeHello, task: Any) -> P.NodeHello:
    """What of a hello may leave the node: who, whether, a refusal's code and fixed text; for an
    acceptance the released (noisy) row count with the delta and noise multiplier computed
    from it, and as the planned epsilon the task's own target (which the node's plan keeps).
    A refusal carries no sizes."""
    if not hello.accepted:
        return hello.model_copy(update={"train_rows": 0, "test_rows": 0, "delta": None, "noise_multiplier": None,
                                        "planned_epsilon": None, "evaluation_noise": None})
    planned = task.privacy.target_epsilon if task.privacy.enabled else None
    return hello.model_copy(update={"test_rows": 0, "planned_epsilon": planned, "reason": ""})


def _audit_decision(home: Any, tid: str, hello: P.NodeHello, history: list[tuple[float, float, int]] | None = None) -> None:
    """The node's decision in its audit log: the code and fixed text, and for an acceptance the
    mechanism reserved in the ledger (its own record); no row counts."""
    if not home.path.is_dir():
        return
    payload: dict[str, Any] = {"accepted": hello.accepted, "code": hello.code, "reason": hello.reason}
    if hello.accepted:
        payload.update(epsilon_reserved=hello.planned_epsilon, mechanism=[list(h) for h in history or []])
    home.audit.append("decision", task_id=tid, payload=payload)


def budget_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """4. A train reply leaves only after its spend is in the ledger; an evaluation's spend is
    recorded before it is computed (one per round, only the planned ones); ``end`` releases
    the rest."""
    kind = kind_of(msg)
    if not _has_task(msg) or kind not in ("train", "evaluate", P.END):
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
    server_round = int(msg.content[P.CONFIG]["server-round"])  # type: ignore[arg-type]
    if kind == "evaluate":
        return _evaluation(msg, context, call_next, task, contract, home, tid, server_round)
    if not task.privacy.enabled:
        return call_next(msg, context)
    digest = model_digest({k: v.numpy() for k, v in msg.content.array_records[P.ARRAYS].items()})
    if server_round in admission.spent(home, contract, task, task_id=tid):
        # This round was trained and spent before (the coordinator restarted in the middle of it).
        if task.privacy.mode == "distributed":
            # The noise share is drawn when the update is masked: a second one would be a second
            # release of the same update. The round goes on without this node.
            return _refused(msg, "round-spent", round=server_round, task_id=tid)
        again = sent.load(tid, server_round, digest)
        if again is None:
            return _refused(msg, "round-spent", round=server_round, task_id=tid)
        arrays, kept = again
        home.audit.append("resent", task_id=tid, payload={"round": server_round, "ledger": "no new spend"})
        stash(context, kept)
        content = RecordDict({P.ARRAYS: pack(arrays), P.METRICS: MetricRecord({"num-examples": float(kept["num-examples"])})})
        return Message(content, reply_to=msg)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    m = internal(context)
    entry = (float(m["noise-multiplier"]), float(m["sample-rate"]), int(m["steps"]))
    try:
        admission.record_spend(home, contract, task, task_id=tid, entries=[entry], server_round=server_round)
    except Exception as exc:  # the spend could not be recorded: the update must not leave
        log.error("node: recording the spend failed (%s); withholding the update", type(exc).__name__)
        return _refused(msg, "spend-not-recorded")
    home.audit.append("spend", task_id=tid, payload={"round": server_round, "mechanism": list(entry), "epsilon_task": _finite(m["epsilon"])})
    try:
        sent.save(tid, server_round, digest, unpack(reply.content.array_records[P.ARRAYS]), m)
    except OSError:  # without the copy, a resumed round is refused rather than charged twice
        log.warning("node: could not keep a copy of the sent update")
    return reply


def _evaluation(
    msg: Message, context: Context, call_next: ClientAppCallable, task: Any, contract: Any, home: Any, tid: str, server_round: int,
) -> Message:
    """An evaluation of the global model: refused unless planned at admission (local DP), for a
    round of the task not evaluated yet (the final round when only that one is planned); its
    spend goes into the ledger and the node's accountant before the counts are computed."""
    if not task.privacy.enabled:
        return call_next(msg, context)
    key = state_key(msg)
    dp = DPState.from_json(str(context.state[key]["json"])) if key in context.state else None
    plan = dp.fixed_plan(task) if dp is not None and dp.plan_json and task.privacy.mode == "local" else None
    if plan is None or not getattr(plan, "evaluations", 0) or plan.evaluation_noise is None:
        return _refused(msg, "evaluation-not-offered")
    if not 1 <= server_round <= task.training.rounds or (plan.evaluations == 1 and server_round != task.training.rounds):
        return _refused(msg, "evaluation-repeated", round=server_round, task_id=tid)
    if server_round in admission.evaluated_rounds(home, contract, task, task_id=tid):
        return _refused(msg, "evaluation-repeated", round=server_round, task_id=tid)
    from fedgov.privacy import epsilon_from_history, merge_history

    entry = plan.evaluation_entry()
    history = merge_history(list(dp.history) + [entry])  # type: ignore[union-attr]
    if epsilon_from_history(history=history, delta=plan.delta, accountant=plan.accountant) > plan.target_epsilon:
        return _refused(msg, "privacy-cap")
    try:
        admission.record_evaluation(home, contract, task, task_id=tid, entry=entry, server_round=server_round)
    except Exception as exc:  # noqa: BLE001 - not recorded: nothing is computed or sent
        log.error("node: recording the evaluation's spend failed (%s)", type(exc).__name__)
        return _refused(msg, "spend-not-recorded")
    dp.history = [tuple(h) for h in history]  # type: ignore[union-attr, misc]
    context.state[key] = ConfigRecord({"json": dp.to_json()})  # type: ignore[union-attr]
    home.audit.append("spend", task_id=tid, payload={"round": server_round, "mechanism": list(entry), "evaluation": True})
    return call_next(msg, context)


def _secagg_key(msg: Message) -> str:
    """Where a node keeps its secure-aggregation keys for the task or query of ``msg``."""
    if P.QUERY_JSON in msg.content[P.CONFIG]:
        from fedgov.node.context import query_of
        from fedgov.launch.query import query_id_of

        q, contract = query_of(msg)
        return "fedgov-secagg-" + hashlib.sha256(query_id_of(q, contract, msg.metadata.run_id).encode()).hexdigest()
    # all 256 bits: two task ids that shared a state would share one round's secrets
    return "fedgov-secagg-" + hashlib.sha256(task_id(msg).encode()).hexdigest()


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


class NoRoster(SecAggError):
    """This node's policy pins no federation roster: it takes no part in secure aggregation."""


def _graph_key(msg: Message, server_round: int) -> str:
    """What seeds the SecAgg+ graph besides the roster and the round: the task's or query's
    fingerprint (what it asks), never a value the coordinator can vary freely (the Flower run
    id, ``task-run``); a round outside the task's rounds is refused."""
    if P.QUERY_JSON in msg.content[P.CONFIG]:
        from fedgov.node.context import query_of
        from fedgov.launch.query import query_fingerprint

        q, contract = query_of(msg)
        if server_round != 1:
            raise SecAggError(f"a statistics query has one round, not round {server_round}")
        return "query-" + query_fingerprint(q, contract)
    task, contract = task_of(msg)
    if not 1 <= server_round <= task.training.rounds:
        raise SecAggError(f"round {server_round} is not one of the task's {task.training.rounds} rounds")
    return "task-" + P.fingerprint(task, contract)


def _round_key(msg: Message) -> str:
    """The key of the task or query of ``msg`` that every signature and record of secure
    aggregation is bound to (its ledger key)."""
    if P.QUERY_JSON in msg.content[P.CONFIG]:
        from fedgov.node.context import query_of
        from fedgov.launch.query import query_id_of

        q, contract = query_of(msg)
        return query_id_of(q, contract, msg.metadata.run_id)
    return task_id(msg)


def _secagg_identity(context: Context) -> tuple[str, Any, Any, Any]:
    """``(roster name, identity private key, checked roster, node home)`` of this node;
    :class:`NoRoster` when its policy pins none, :class:`SecAggError` when the roster or the
    identity key cannot be used."""
    from fedgov.errors import FedgovError
    from fedgov.privacy.roster import IDENTITY_KEY, load_pinned, load_private_key, public_key_of

    _, home, _ = node_of(context)
    policy = home.policy()
    spec = policy.secure_aggregation
    if spec is None:
        raise NoRoster("this node's policy pins no federation roster")
    try:
        roster = load_pinned(spec.roster, spec.authority_key)
        ident = load_private_key(home.path / IDENTITY_KEY)
    except FedgovError as exc:
        raise SecAggError(f"the roster or the identity key cannot be used: {str(exc).splitlines()[0]}") from None
    own = roster.key_of(policy.node)
    if own is None or own != public_key_of(ident):
        raise SecAggError(f"the roster does not hold this node's identity key under its name {policy.node}")
    return policy.node, ident, roster, home


def _verify_round_keys(
    context: Context, state_key: str, rkey: str, server_round: int, roster: Any,
    entries: dict[int, tuple[bytes, bytes, str, bytes]],
) -> dict[int, str]:
    """Every node's round keys must be signed, for this task or query, round and Flower node
    id, by the identity key the roster holds for the name it gives; a name twice, a name not in
    the roster or a node id that was another name before stops the round. The names by node."""
    import json

    from fedgov.privacy.roster import keys_message, verify

    names = [e[2] for e in entries.values()]
    if len(set(names)) != len(names):
        raise SecAggError("a roster name is given for two nodes of the round")
    bind_key = state_key + "-names"
    bound: dict[str, str] = json.loads(str(context.state[bind_key]["json"])) if bind_key in context.state else {}
    for nid, (c_pk, s_pk, name, sig) in entries.items():
        pk = roster.key_of(name)
        if pk is None:
            raise SecAggError(f"node {nid} gives the name {name[:40]!r}, which the roster does not hold")
        if not verify(pk, sig, keys_message(rkey, server_round, nid, name, roster.digest, c_pk, s_pk)):
            raise SecAggError(f"the round keys of node {nid} ({name}) are not signed by that member's identity key")
        if bound.get(str(nid), name) != name:
            raise SecAggError(f"node {nid} was {bound[str(nid)]} in an earlier round of this task, now {name}")
    bound.update({str(n): e[2] for n, e in entries.items()})
    context.state[bind_key] = ConfigRecord({"json": json.dumps(bound)})
    return {nid: e[2] for nid, e in entries.items()}


def _check_survivors(st: NodeSecAgg, survivors: list[int]) -> None:
    """Before signing or revealing: the survivors are nodes this node masked against, itself
    among them, at least the threshold of its group and, under distributed DP, at least the
    contributors its noise share was sized for."""
    if not st.masked:
        raise SecAggError("this node sent no masked input this round: nothing to sign or unmask")
    if st.node_id not in survivors:
        raise SecAggError("this node is not listed as a survivor")
    stray = [v for v in survivors if v not in set(st.mask_nodes)]
    if stray:
        raise SecAggError(f"nodes {stray[:5]} are listed as survivors but this node did not mask against them")
    alive = [v for v in survivors if v in set(st.group)]
    if len(alive) < st.threshold:
        raise SecAggError(f"only {len(alive)} of this node's group survived; revealing needs {st.threshold}")
    if len(survivors) < st.min_survivors:
        raise SecAggError(
            f"{len(survivors)} survivors, this node's noise share was sized for at least {st.min_survivors} contributors"
        )


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
    """One stage of secure aggregation at this node, hardened against a coordinator that
    deviates (:mod:`fedgov.privacy.secagg`, ``docs/threat-model.md``):

    * ``keys``: fresh round keys, signed with the node's identity key over the task or query
      key, the round, the Flower node id, the roster name, the roster and both keys;
    * ``shares``: every node's keys checked against the pinned roster before any share is made;
      the SecAgg+ graph from the roster's digest, the key and the round;
    * ``consistency``: the survivor list checked and signed, once per round (node state);
    * ``unmask``: only for the list this node signed, with at least the threshold of valid
      signatures over it from roster members; each peer's share recorded (self-mask or key,
      never both, across every message of the round and restarts) before the reply leaves.
    """
    from fedgov.errors import RevealConflict
    from fedgov.privacy.roster import consistency_message, keys_message, sign, verify
    from fedgov.privacy.secagg import RoundKeys, roster_graph_seed

    cfg = msg.content[P.CONFIG]
    server_round = int(cfg["server-round"])  # type: ignore[arg-type]
    key = _secagg_key(msg)
    rkey = _round_key(msg)
    stage = str(cfg[P.SECAGG_STAGE])
    name, ident, roster, home = _secagg_identity(context)
    nid = int(context.node_id)
    out: dict[str, Any] = {}
    if stage == "keys":
        if key in context.state:
            old = NodeSecAgg.from_json(str(context.state[key]["json"]))
            if old.round == server_round and old.masked:
                raise SecAggError(f"new keys asked for round {server_round}, in which this node already masked its input")
        st, c_pk, s_pk = NodeSecAgg.keys(nid, server_round)
        # the graph: the roster, what the task asks (its fingerprint, not the coordinator's run id)
        # and the round, which must be one of the task's: a coordinator re-rolls it only by
        # submitting another task, which the node admits (and its operator approves) anew
        st.seed = roster_graph_seed(roster.digest, _graph_key(msg, server_round), server_round)
        sig = sign(ident, keys_message(rkey, server_round, nid, name, roster.digest, c_pk, s_pk))
        out = {"c-pk": c_pk, "s-pk": s_pk, "name": name, "graph-seed": st.seed, "sig": sig}
    elif stage == "shares":
        st = secagg_state(context, key, server_round)
        ids = [int(str(x)) for x in _items(cfg, "nodes")]  # type: ignore[arg-type]
        entries = dict(zip(ids, zip(
            [bytes(x) for x in _items(cfg, "c-pks")], [bytes(x) for x in _items(cfg, "s-pks")],  # type: ignore[arg-type]
            [str(x) for x in _items(cfg, "names")], [bytes(x) for x in _items(cfg, "sigs")],  # type: ignore[arg-type]
            strict=True,
        ), strict=True))
        if len(entries) != len(ids):
            raise SecAggError("a node id is given twice among the round's keys")
        names = _verify_round_keys(context, key, rkey, server_round, roster, entries)
        if names.get(nid) != name:
            raise SecAggError("this node's own keys are not among the round's keys under its name")
        pks = RoundKeys({n: (e[0], e[1]) for n, e in entries.items()}, names, st.seed)
        cts = st.shares(pks, params)
        out = {"dst": [str(d) for d in cts], "ct": list(cts.values())}
    elif stage == "consistency":
        st = secagg_state(context, key, server_round)
        survivors = sorted({int(str(x)) for x in _items(cfg, "survivors")})  # type: ignore[arg-type]
        _check_survivors(st, survivors)
        try:
            home.state.sign_survivors(rkey, server_round, survivors)
        except RevealConflict as exc:
            raise SecAggError(str(exc)) from None
        out = {"sig": sign(ident, consistency_message(rkey, server_round, survivors))}
    elif stage == "unmask":
        st = secagg_state(context, key, server_round)
        survivors = sorted({int(str(x)) for x in _items(cfg, "survivors")})  # type: ignore[arg-type]
        if home.state.signed_survivors(rkey, server_round) != survivors:
            raise SecAggError("the survivor list to unmask for is not the one this node signed")
        _check_survivors(st, survivors)
        signers = [int(str(x)) for x in _items(cfg, "signers")] if "signers" in cfg else []  # type: ignore[arg-type]
        sigs = [bytes(x) for x in _items(cfg, "sigs")] if "sigs" in cfg else []  # type: ignore[arg-type]
        text = consistency_message(rkey, server_round, survivors)
        valid = set()
        for s_id, sig in zip(signers, sigs, strict=True):
            pk = roster.key_of(st.names[s_id]) if s_id in st.names and s_id in survivors else None
            if pk is not None and verify(pk, sig, text):
                valid.add(st.names[s_id])
        if len(valid) < st.threshold:
            raise SecAggError(f"{len(valid)} valid signatures over the survivor list; unmasking needs {st.threshold}")
        alive = set(survivors)
        dropped = [v for v in st.mask_nodes if v not in alive]
        revealed = st.reveal(survivors, dropped)
        try:  # recorded before the reply leaves: one kind of share per peer and round, ever
            home.state.record_reveals(rkey, server_round, {v: "self-mask" if v in alive else "key" for v in revealed})
        except RevealConflict as exc:
            raise SecAggError(str(exc)) from None
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
    n = len(survivors)
    own_min = max(1, n - math.floor(float(getattr(task.privacy, "dropout_tolerance", 0.0)) * n))
    if min_contributors < own_min:
        # Sized for fewer contributors than the task allows to drop: each share would be larger,
        # but the coordinator could then unmask a sum of fewer nodes than the task promises.
        raise PrivacyError(f"min_contributors {min_contributors} is below the task's own {own_min} for {n} nodes")
    if tau(plan.node_variance(min_contributors), len(survivors)) * plan.dimension > TAU_LIMIT:
        raise PrivacyError("each node's noise share is too small for the distributed discrete Gaussian analysis")
    return plan, min_contributors


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """3b. Secure aggregation (:mod:`fedgov.privacy.secagg`): the protocol's stages (``secagg`` query
    messages, for training tasks and statistics queries), and a training task's train reply
    masked so that the coordinator learns only the round's sum (a query's release is masked in
    its handler, ``clients/app.py``).

    A task that asks for secure aggregation never gets a plaintext update from this node: a
    train message without the protocol's shares is refused (no downgrade by the coordinator).

    Distributed DP with ``training.fraction_train`` = q < 1: the coordinator asks every node
    every round, and each node flips its own secret coin (the secure generator): with
    probability q its clipped update goes into the sum, else zeros; its noise share goes in
    either way, and it trains either way, so neither the masked vector nor the time it took
    tells the coordinator whether it took part. That is the Poisson sampling the accountant
    credits at rate q; a coordinator that picks who is asked gets no amplification from it.
    """
    kind = kind_of(msg)
    if kind not in (P.SECAGG, "train") or P.CONFIG not in msg.content:
        return call_next(msg, context)
    cfg = msg.content[P.CONFIG]
    if kind == P.SECAGG and P.QUERY_JSON in cfg:
        from fedgov.node.context import query_of

        q, _ = query_of(msg)
        if not q.secure_aggregation:
            return _refused(msg, "secure-aggregation")
        try:
            return _secagg_stage(msg, context, SecAggParams())
        except NoRoster:
            return _no_roster(msg, context)
        except (SecAggError, KeyError, ValueError, TypeError) as exc:
            return _secagg_stopped(msg, context, exc)
    if not _has_task(msg):
        return call_next(msg, context)
    task, _ = task_of(msg)
    t = task.training
    if not t.secure_aggregation:
        if kind == P.SECAGG:
            return _refused(msg, "secure-aggregation")
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
            st.min_survivors = distributed[1]  # kept: the survivors at unmask are checked against it
    except NoRoster:
        return _no_roster(msg, context)
    except PrivacyError as exc:
        log.warning("node: distributed DP refused: %s", exc)
        return _refused(msg, "distributed-dp")
    except (SecAggError, KeyError, ValueError, TypeError) as exc:
        return _secagg_stopped(msg, context, exc)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    glob = {k: v.numpy() for k, v in msg.content.array_records[P.ARRAYS].items()}
    local = local_model(reply.content.array_records[P.ARRAYS], glob)
    m = internal(context)
    update = [local[k].astype(float) - glob[k].astype(float) for k in glob]
    try:
        if distributed is not None:
            from fedgov.privacy.distributed import encode_share

            plan, min_contributors = distributed
            if plan.sample_rate < 1 and not _coin(plan.sample_rate):
                update = [np.zeros_like(u) for u in update]  # not in this round's sample: zeros, noise share still added
            y = encode_share(update, plan, min_contributors=min_contributors, contributors=len(survivors))
        else:
            weight = min(float(m["num-examples"]), t.secure_weight_cap) / t.secure_weight_cap
            y = encode_update(update, weight, params)
        masked = st.mask(y, survivors)
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
    """True with probability ``rate``, from the secure generator (never the coordinator's word)."""
    from fedgov.privacy.rng import SecureRNG

    return bool(SecureRNG.fresh().uniform(1)[0] < rate)


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


def released_counts(home: Any, contract: Any) -> set[int]:
    """The row counts this node has released for the data set serving ``contract`` (ledger)."""
    from fedgov.node.rounds import ROWS_NOTE

    ds = admission.dataset_name(home, contract)
    if ds is None:
        return set()
    return {int(ev.note[len(ROWS_NOTE):]) for ev in home.ledger.events(ds) if ev.kind == "spend" and ev.note.startswith(ROWS_NOTE)}


def gate_kind(msg: Message) -> str:
    """The release gate's name for the kind of ``msg`` (:data:`fedgov.node.gate.DECLARATION`)."""
    kind = kind_of(msg)
    if kind == P.SECAGG:
        return f"secagg-{msg.content[P.CONFIG].get(P.SECAGG_STAGE, '?')}"
    return kind


def _gate_context(msg: Message, context: Context, kind: str) -> Any:
    """The node's own facts the gate checks a reply against (its ledger, never the message's word)."""
    from fedgov.node.gate import GateContext

    _, home, simulated = node_of(context)
    rnd = msg.content[P.CONFIG].get("server-round") if P.CONFIG in msg.content else None
    ctx = GateContext(kind=kind, server_round=int(rnd) if rnd is not None else None, simulated=simulated)  # type: ignore[arg-type]
    if _has_task(msg):
        task, contract = task_of(msg)
        tid = task_id(msg)
        ctx.privacy_enabled = task.privacy.enabled
        ctx.secure = task.training.secure_aggregation
        ctx.target_epsilon = task.privacy.target_epsilon
        ctx.round_spent = lambda r: r in admission.spent(home, contract, task, task_id=tid)
        ctx.released_rows = lambda: released_counts(home, contract)
        ctx.round_evaluated = lambda r: r in admission.evaluated_rounds(home, contract, task, task_id=tid)
    elif P.CONFIG in msg.content and P.QUERY_JSON in msg.content[P.CONFIG]:
        from fedgov.node.context import query_of

        q, contract = query_of(msg)
        qid = _query_id(msg)
        ctx.secure = q.secure_aggregation
        ds = admission.dataset_name(home, contract)

        def query_spent() -> bool:
            return ds is not None and any(
                ev.task_id == qid and ev.kind == "spend" for ev in home.ledger.events(ds)
            )

        ctx.query_spent = query_spent
    return ctx


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
        if home.path.is_dir():
            home.audit.append("blocked", task_id=tid, payload={"kind": kind, "violations": violations})
            if _has_task(msg) and tid is not None:
                task, contract = task_of(msg)
                admission.release(home, contract, task, task_id=tid, note="stopped by the node's release gate")
    except Exception:  # noqa: BLE001 - blocked all the same
        log.error("node: could not record the release gate's block")
    return _refused(msg, "release-blocked")


def contract_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """2b. The contract check, before anything is read: a message's contract must be byte for
    byte the canonical JSON of a contract file this node holds and pins for that name and
    version (:mod:`fedgov.node.contracts`); else ``contract-mismatch``. A contract name the
    node does not serve at all goes on to the policy check (``contract-not-served``)."""
    from fedgov.errors import FedgovError
    from fedgov.node.contracts import ContractCheck, check_received, serving
    from fedgov.node.refusals import refusal_text

    kind = kind_of(msg)
    if kind == P.END or P.CONFIG not in msg.content or P.CONTRACT_JSON not in msg.content[P.CONFIG]:
        return call_next(msg, context)
    try:
        node, home, _ = node_of(context)
    except Exception:  # noqa: BLE001 - no node directory: the handlers say so
        return call_next(msg, context)
    if not home.exists():
        return call_next(msg, context)  # no policy: the policy check refuses (no-policy)
    received = str(msg.content[P.CONFIG][P.CONTRACT_JSON])
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
            return _hello_reply(msg, admission._refusal(node, P.RefusalCode.CONTRACT_MISMATCH.value, text))
        return _refused(msg, P.RefusalCode.CONTRACT_MISMATCH.value, contract=ref)
    with serving(home):
        return call_next(msg, context)
