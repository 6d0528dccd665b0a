"""Secure aggregation and distributed DP at the node: its decisions, free of Flower.

The node's secure-aggregation mod (``clients.mods.secagg_mod``) parses a message into the
values below, calls one function here and builds the reply; every check that protects the
node from a coordinator that deviates is made here (:mod:`fedgov.privacy.secagg`,
``docs/threat-model.md``):

* ``keys``: fresh round keys, signed with the node's identity key over the task or query
  key, the round, the Flower node id, the roster name, the roster and both keys;
* ``shares``: every node's keys checked against the pinned roster before any share is made;
  the SecAgg+ graph from the roster's digest, what the task asks and the round;
* ``consistency``: the survivor list checked and signed, once per round (node state);
* ``unmask``: only for the list this node signed, with at least the threshold of valid
  signatures over it from roster members; each peer's share recorded (self-mask or key,
  never both, across every message of the round and restarts) before the reply leaves;
* a train reply (:func:`mask_update`) or a statistics release (:func:`mask_release`) leaves
  only masked; under distributed DP (:func:`check_distributed`) the coordinator's public
  parameters must be the node's own plan before anything is trained.

The node's per-task secure-aggregation keys live in its Flower state between messages; the
functions here read and write them through :class:`RunState`, text by key.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from fedgov import protocol as P
from fedgov.errors import FedgovError, NoRoster, PrivacyError, RevealConflict, SecAggError
from fedgov.node.home import NodeHome
from fedgov.node.rounds import DPState
from fedgov.node.state import NodeState
from fedgov.privacy.roster import Roster
from fedgov.privacy.secagg import NodeSecAgg, SecAggParams

__all__ = [
    "SECAGG_STAGES",
    "Identity",
    "NoRoster",
    "RunState",
    "StageRequest",
    "check_distributed",
    "secagg_graph_key",
    "node_identity",
    "keep_keys",
    "mask_release",
    "mask_update",
    "receive_shares",
    "run_stage",
    "secure_coin",
    "secagg_key",
]

SECAGG_STAGES = ("keys", "shares", "consistency", "unmask")
"""The stages of secure aggregation a node answers, in their order within a round."""


class RunState(Protocol):
    """Where the node keeps, between the messages of a run, what it must remember (its Flower
    state in the ClientApp): a text per key, None when there is none."""

    def get(self, key: str) -> str | None: ...

    def put(self, key: str, text: str) -> None: ...


def secagg_key(round_key: str) -> str:
    """Where the node keeps its secure-aggregation keys for the task or query ``round_key``
    (its ledger key). All 256 bits: two keys that shared a state would share one round's secrets."""
    return "fedgov-secagg-" + hashlib.sha256(round_key.encode()).hexdigest()


def secagg_graph_key(*, kind: Literal["task", "query"], fingerprint: str, server_round: int, rounds: int = 1) -> str:
    """What seeds the SecAgg+ graph besides the roster and the round: the task's or query's
    ``fingerprint`` (what it asks), never a value the coordinator can vary freely (the Flower
    run id, ``task-run``). A round outside the task's ``rounds`` (a query has one) is refused:
    a coordinator re-rolls the graph only by submitting another task, which the node admits
    (and its operator approves) anew."""
    if kind == "query":
        if server_round != 1:
            raise SecAggError(f"a statistics query has one round, not round {server_round}")
        return "query-" + fingerprint
    if not 1 <= server_round <= rounds:
        raise SecAggError(f"round {server_round} is not one of the task's {rounds} rounds")
    return "task-" + fingerprint


@dataclass(frozen=True)
class Identity:
    """The node in secure aggregation: its name in the roster, its identity private key (an
    Ed25519 key object), the pinned roster it checked, and its node directory."""

    name: str
    key: Any
    roster: Roster
    home: NodeHome


def node_identity(home: NodeHome) -> Identity:
    """This node's :class:`Identity`; :class:`NoRoster` when its policy pins none,
    :class:`SecAggError` when the roster or the identity key cannot be used."""
    from fedgov.privacy.roster import IDENTITY_KEY, load_pinned, load_private_key, public_key_of

    policy = home.policy()
    spec = policy.secure_aggregation
    if spec is None:
        raise NoRoster("this node's policy pins no federation roster")
    try:
        roster = load_pinned(spec.roster, spec.authority_key)
        key = load_private_key(home.path / IDENTITY_KEY)
    except FedgovError as exc:
        raise SecAggError(f"the roster or the identity key cannot be used: {str(exc).splitlines()[0]}") from None
    own = roster.key_of(policy.node)
    if own is None or own != public_key_of(key):
        raise SecAggError(f"the roster does not hold this node's identity key under its name {policy.node}")
    return Identity(policy.node, key, roster, home)


@dataclass(frozen=True)
class StageRequest:
    """A ``secagg`` message, parsed.

    ``round_key`` is the ledger key of the task or query every signature is bound to;
    ``graph_key`` (``keys``) :func:`secagg_graph_key`; ``round_keys`` (``shares``) each node's
    ``(node id, c_pk, s_pk, roster name, signature)``; ``survivors`` (``consistency``,
    ``unmask``) sorted and unique; ``signers`` and ``signatures`` (``unmask``) the survivor
    list's signatures as the coordinator collected them.
    """

    stage: str
    server_round: int
    round_key: str
    graph_key: str = ""
    round_keys: list[tuple[int, bytes, bytes, str, bytes]] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)
    signers: list[int] = field(default_factory=list)
    signatures: list[bytes] = field(default_factory=list)


def _round_state(text: str | None, server_round: int) -> NodeSecAgg:
    if text is None:
        raise SecAggError("no secure-aggregation keys for this task: the keys stage did not reach this node")
    st = NodeSecAgg.from_json(text)
    if st.round != server_round:
        raise SecAggError(f"the keys are of round {st.round}, the message is of round {server_round}")
    return st


def run_stage(req: StageRequest, me: Identity, *, state: RunState, node_id: int, params: SecAggParams) -> dict[str, Any]:
    """One stage of secure aggregation at this node: what its reply carries. Raises
    :class:`SecAggError` for anything that must stop the round here (nothing is sent)."""
    from fedgov.privacy.roster import consistency_message, keys_message, sign
    from fedgov.privacy.secagg import roster_graph_seed

    key = secagg_key(req.round_key)
    rkey, rnd = req.round_key, req.server_round
    if req.stage not in SECAGG_STAGES:
        raise SecAggError(f"unknown stage {req.stage!r}")
    if req.stage == "keys":
        old = state.get(key)
        if old is not None:
            before = NodeSecAgg.from_json(old)
            if before.round == rnd and before.masked:
                raise SecAggError(f"new keys asked for round {rnd}, in which this node already masked its input")
        st, c_pk, s_pk = NodeSecAgg.keys(node_id, rnd)
        st.seed = roster_graph_seed(me.roster.digest, req.graph_key, rnd)
        sig = sign(me.key, keys_message(rkey, rnd, node_id, me.name, me.roster.digest, c_pk, s_pk))
        out: dict[str, Any] = {"c-pk": c_pk, "s-pk": s_pk, "name": me.name, "graph-seed": st.seed, "sig": sig}
    elif req.stage == "shares":
        st = _round_state(state.get(key), rnd)
        out = _shares(st, req, me, state=state, node_id=node_id, params=params)
    elif req.stage == "consistency":
        st = _round_state(state.get(key), rnd)
        _check_survivors(st, req.survivors)
        try:
            me.home.state.sign_survivors(rkey, rnd, req.survivors)
        except RevealConflict as exc:
            raise SecAggError(str(exc)) from None
        out = {"sig": sign(me.key, consistency_message(rkey, rnd, req.survivors))}
    else:
        st = _round_state(state.get(key), rnd)
        out = _unmask(st, req, me, me.home.state)
    state.put(key, st.to_json())
    return out


def _shares(
    st: NodeSecAgg, req: StageRequest, me: Identity, *, state: RunState, node_id: int, params: SecAggParams
) -> dict[str, Any]:
    """Every node's round keys verified against the roster, then this node's encrypted shares."""
    from fedgov.privacy.secagg import RoundKeys

    entries = {nid: (c_pk, s_pk, name, sig) for nid, c_pk, s_pk, name, sig in req.round_keys}
    if len(entries) != len(req.round_keys):
        raise SecAggError("a node id is given twice among the round's keys")
    names = _verify_round_keys(entries, me.roster, state=state, key=secagg_key(req.round_key), rkey=req.round_key,
                               server_round=req.server_round)
    if names.get(node_id) != me.name:
        raise SecAggError("this node's own keys are not among the round's keys under its name")
    pks = RoundKeys({n: (e[0], e[1]) for n, e in entries.items()}, names, st.seed)
    cts = st.shares(pks, params)
    return {"dst": [str(d) for d in cts], "ct": list(cts.values())}


def _verify_round_keys(
    entries: dict[int, tuple[bytes, bytes, str, bytes]], roster: Roster, *, state: RunState, key: str, rkey: str,
    server_round: int,
) -> dict[int, str]:
    """Every node's round keys must be signed, for this task or query, round and Flower node
    id, by the identity key the roster holds for the name it gives; a name twice, a name not in
    the roster or a node id that was another name before stops the round. The names by node
    (bound in the node's state for the rest of the task)."""
    from fedgov.privacy.roster import keys_message, verify

    names = [e[2] for e in entries.values()]
    if len(set(names)) != len(names):
        raise SecAggError("a roster name is given for two nodes of the round")
    bound_text = state.get(key + "-names")
    bound: dict[str, str] = json.loads(bound_text) if bound_text is not None else {}
    for nid, (c_pk, s_pk, name, sig) in entries.items():
        pk = roster.key_of(name)
        if pk is None:
            raise SecAggError(f"node {nid} gives the name {name[:40]!r}, which the roster does not hold")
        if not verify(pk, sig, keys_message(rkey, server_round, nid, name, roster.digest, c_pk, s_pk)):
            raise SecAggError(f"the round keys of node {nid} ({name}) are not signed by that member's identity key")
        if bound.get(str(nid), name) != name:
            raise SecAggError(f"node {nid} was {bound[str(nid)]} in an earlier round of this task, now {name}")
    bound.update({str(n): e[2] for n, e in entries.items()})
    state.put(key + "-names", json.dumps(bound))
    return {nid: e[2] for nid, e in entries.items()}


def _check_survivors(st: NodeSecAgg, survivors: Sequence[int]) -> None:
    """Before signing or revealing: the survivors are nodes this node masked against, itself
    among them, at least the threshold of its group and, under distributed DP, at least the
    contributors its noise share was sized for."""
    if not st.masked:
        raise SecAggError("this node sent no masked input this round: nothing to sign or unmask")
    if st.node_id not in survivors:
        raise SecAggError("this node is not listed as a survivor")
    masked_against, group = set(st.mask_nodes), set(st.group)
    stray = [v for v in survivors if v not in masked_against]
    if stray:
        raise SecAggError(f"nodes {stray[:5]} are listed as survivors but this node did not mask against them")
    alive = [v for v in survivors if v in group]
    if len(alive) < st.threshold:
        raise SecAggError(f"only {len(alive)} of this node's group survived; revealing needs {st.threshold}")
    if len(survivors) < st.min_survivors:
        raise SecAggError(
            f"{len(survivors)} survivors, this node's noise share was sized for at least {st.min_survivors} contributors"
        )


def _unmask(st: NodeSecAgg, req: StageRequest, me: Identity, node_state: NodeState) -> dict[str, Any]:
    """The shares that unmask the survivors' sum, for the list this node signed only."""
    from fedgov.privacy.roster import consistency_message, verify

    rkey, rnd, survivors = req.round_key, req.server_round, req.survivors
    if node_state.signed_survivors(rkey, rnd) != survivors:
        raise SecAggError("the survivor list to unmask for is not the one this node signed")
    _check_survivors(st, survivors)
    text = consistency_message(rkey, rnd, survivors)
    if len(req.signers) != len(req.signatures):
        raise SecAggError("the survivor list's signers and signatures do not pair up")
    valid: set[str] = set()
    alive = set(survivors)
    for s_id, sig in zip(req.signers, req.signatures, strict=True):
        if len(valid) >= st.threshold:
            break  # enough: the rest need not be checked
        pk = me.roster.key_of(st.names[s_id]) if s_id in st.names and s_id in alive else None
        if pk is not None and verify(pk, sig, text):
            valid.add(st.names[s_id])
    if len(valid) < st.threshold:
        raise SecAggError(f"{len(valid)} valid signatures over the survivor list; unmasking needs {st.threshold}")
    alive = set(survivors)
    dropped = [v for v in st.mask_nodes if v not in alive]
    revealed = st.reveal(survivors, dropped)
    try:  # recorded before the reply leaves: one kind of share per peer and round, ever
        node_state.record_reveals(rkey, rnd, {v: "self-mask" if v in alive else "key" for v in revealed})
    except RevealConflict as exc:
        raise SecAggError(str(exc)) from None
    return {"owner": [str(o) for o in revealed], "share": list(revealed.values())}


def receive_shares(
    state: RunState, *, round_key: str, server_round: int, node_id: int, ciphertexts: dict[int, bytes], nodes: Sequence[int]
) -> NodeSecAgg:
    """The node's keys for this round with the shares the coordinator routed to it decrypted
    (a train message, or a query's ``stats``); :class:`SecAggError` unless this node is among
    the round's ``nodes``."""
    st = _round_state(state.get(secagg_key(round_key)), server_round)
    st.receive(ciphertexts)
    if node_id not in nodes:
        raise SecAggError("this node is not among the round's nodes")
    return st


def keep_keys(state: RunState, st: NodeSecAgg, *, round_key: str) -> None:
    """Keep the node's keys after it masked its input (the later stages check it)."""
    state.put(secagg_key(round_key), st.to_json())


def check_distributed(
    dp: DPState | None, task: Any, *, z: float, scale: float, min_contributors: int, survivors: int
) -> tuple[Any, int]:
    """Distributed DP (:mod:`fedgov.privacy.distributed`), before any training: this node's own
    plan (fixed at hello) and the contributors the coordinator sizes the noise shares for.
    The coordinator's copy of the public parameters (``z``, ``scale``) must agree, and it
    cannot claim more contributors than the round has nodes (``survivors``), nor fewer than the
    task lets drop out: else :class:`PrivacyError`, and nothing is trained, spent or sent.
    Returns the plan and the contributors the node's noise share is sized for."""
    from fedgov.privacy.distributed import TAU_LIMIT, tau

    if dp is None or not dp.plan_json:
        raise PrivacyError("no distributed-DP plan at this node for this task")
    plan = dp.plan(task, 0)
    if not (math.isclose(z, plan.noise_multiplier, rel_tol=1e-9) and math.isclose(scale, plan.scale, rel_tol=1e-9)):
        raise PrivacyError(
            f"the coordinator's distributed-DP parameters (z {z:.6g}, scale {scale:.6g}) are not this node's "
            f"(z {plan.noise_multiplier:.6g}, scale {plan.scale:.6g})"
        )
    if not 1 <= min_contributors <= survivors:
        raise PrivacyError(f"min_contributors {min_contributors} must be between 1 and the round's {survivors} nodes")
    own_min = max(1, survivors - math.floor(float(getattr(task.privacy, "dropout_tolerance", 0.0)) * survivors))
    if min_contributors < own_min:
        # Sized for fewer contributors than the task allows to drop: each share would be larger,
        # but the coordinator could then unmask a sum of fewer nodes than the task promises.
        raise PrivacyError(f"min_contributors {min_contributors} is below the task's own {own_min} for {survivors} nodes")
    if tau(plan.node_variance(min_contributors), survivors) * plan.dimension > TAU_LIMIT:
        raise PrivacyError("each node's noise share is too small for the distributed discrete Gaussian analysis")
    return plan, min_contributors


def secure_coin(rate: float) -> bool:
    """True with probability ``rate``, from the secure generator (never the coordinator's word)."""
    from fedgov.privacy.rng import SecureRNG

    return bool(SecureRNG.fresh().uniform(1)[0] < rate)


def mask_update(
    st: NodeSecAgg,
    update: list[np.ndarray],
    *,
    survivors: list[int],
    params: SecAggParams,
    distributed: tuple[Any, int] | None,
    metrics: Mapping[str, float],
    weight_cap: float,
    coin: Callable[[float], bool] = secure_coin,
) -> np.ndarray:
    """A train reply's update as it leaves: encoded and masked so that the coordinator learns
    only the round's sum. Weighted by the node's released row count (``metrics``, what the
    train handler left: ``num-examples``), capped at ``weight_cap``, inside the sum; under distributed DP (``distributed``: the plan and the
    contributors of :func:`check_distributed`) clipped, with the node's noise share, all
    nodes weighing the same.

    Distributed DP with a sample rate q < 1: the coordinator asks every node every round, and
    each node flips its own secret ``coin`` (the secure generator): with probability q its
    clipped update goes into the sum, else zeros; its noise share goes in either way, and it
    trains either way, so neither the masked vector nor the time it took tells the coordinator
    whether it took part. That is the Poisson sampling the accountant credits at rate q; a
    coordinator that picks who is asked gets no amplification from it.
    """
    from fedgov.privacy.secagg import encode_update

    if distributed is not None:
        from fedgov.privacy.distributed import encode_share

        plan, min_contributors = distributed
        if plan.sample_rate < 1 and not coin(plan.sample_rate):
            update = [np.zeros_like(u) for u in update]  # not in this round's sample: zeros, noise share still added
        y = encode_share(update, plan, min_contributors=min_contributors, contributors=len(survivors))
    else:
        weight = min(float(metrics["num-examples"]), weight_cap) / weight_cap
        y = encode_update(update, weight, params)
    return st.mask(y, survivors)


def mask_release(st: NodeSecAgg, answer: P.StatsAnswer, query: Any, survivors: list[int]) -> tuple[P.StatsAnswer, np.ndarray]:
    """A statistics answer under secure aggregation: the release masked, and the answer with
    only its layout (parts, cells, noise) in plaintext (:mod:`fedgov.analytics.secure`)."""
    from fedgov.analytics import LocalRelease
    from fedgov.analytics.secure import secure_vector, skeleton_of

    assert answer.release_json is not None  # only an accepted answer with a release is masked
    release = LocalRelease.model_validate_json(answer.release_json)
    masked = st.mask(secure_vector(release, query), survivors)
    return answer.model_copy(update={"release_json": skeleton_of(release).model_dump_json()}), masked
