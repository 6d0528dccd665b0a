"""A node's side of a statistics query: everything it does before a noisy release leaves it.

A query (:mod:`fedgov.analytics.query`) reaches the node as a Flower *query* message of kind
``stats`` (``clients/app.py``). The node, on its own (:func:`answer_query`):

1. refuses if paused, or if its policy does not accept the query (:func:`fedgov.node.policy.check_query`:
   kind ``statistics``, the contract served, epsilon and delta per node), or while it waits
   for an operator's approval (``approval = "manual"``);
2. looks up whether its data conforms to the contract (checked when the data was registered,
   ``fedgov node data check``; checked again when the files changed): refuses with the fixed
   ``data-invalid`` text, no counts, columns or values; and refuses with fewer than
   ``limits.min_rows`` training rows (the data set's ``path``; the answer uses its test rows too);
3. reserves the query's whole epsilon and delta in its ledger (refuses with
   ``budget-exhausted`` and the reason when that would overspend the data set's budget);
4. computes its noisy release with OpenDP (:func:`fedgov.analytics.local_release`: rows per
   person capped, values clamped to the contract, small cells as its policy says), records
   the spend in the ledger and the audit log, and only then answers.

The coordinator's side is :mod:`fedgov.coordinator.statistics`; the launchers are in
:mod:`fedgov.launch.query`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from fedgov import protocol as P
from fedgov.analytics import LocalRelease, Query, local_release
from fedgov.config import Contract
from fedgov.config.municipalities import display_name
from fedgov.errors import BudgetExceeded, DataValidationError, FedgovError
from fedgov.node.admission import awaiting_approval
from fedgov.config.datasource import DataSource, SqlQuery
from fedgov.node.contracts import data_status, one_read, source_exists, validated_frame
from fedgov.node.home import NodeHome, budget_of
from fedgov.privacy.events import Mechanism
from fedgov.node.policy import DatasetSpec, LimitsSpec, check_query, min_rows_for
from fedgov.node.refusals import refusal_text

__all__ = ["answer_query", "mechanism_of", "query_fingerprint", "query_id_of", "read_node_frame"]


def query_fingerprint(query: Query, contract: Contract) -> str:
    """What a query asks, as a short hash: the key an operator approves (``fedgov node approve``)."""
    return hashlib.sha256((query.model_dump_json() + contract.model_dump_json()).encode()).hexdigest()[:16]


def query_id_of(query: Query, contract: Contract, run_id: int | str) -> str:
    """The ledger's key for one run of a query: its name, its fingerprint and the run id."""
    return f"{query.name}-{query_fingerprint(query, contract)}-{run_id}"


def mechanism_of(query: Query) -> Mechanism:
    """What the whole query spends at one node, as the ledger records it."""
    if query.privacy.mechanism == "gaussian":
        return Mechanism(kind="gaussian", epsilon=query.privacy.epsilon, delta=query.privacy.delta)
    return Mechanism(kind="laplace", epsilon=query.privacy.epsilon, delta=query.privacy.delta)


def read_node_frame(contract: Contract, paths: Iterable[DataSource | None]) -> pd.DataFrame:
    """All of a node's rows for a query (training and test files, or queries, together), validated."""
    frames = []
    for p in paths:
        if p is None or not source_exists(p):
            continue
        frames.append(validated_frame(p if isinstance(p, SqlQuery) else Path(p), contract))
    if not frames:
        raise DataValidationError("the node has no data file for this contract", [])
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _refuse(node: str, code: str, reason: str) -> P.StatsAnswer:
    return P.StatsAnswer(node=node, node_name=display_name(node), accepted=False, code=code, reason=reason[:500])


def answer_query(
    home: NodeHome,
    node: str,
    query: Query,
    contract: Contract,
    *,
    query_id: str,
    coordinator: str | None = None,
) -> P.StatsAnswer:
    """Everything a node does with one statistics query (see the module docstring): each step
    returns the refusal that ends it, or None to go on. A SQL data set is read once for it:
    its check and its release come from the same rows."""
    with one_read():
        return _answer_query(home, node, query, contract, query_id=query_id, coordinator=coordinator)


def _answer_query(
    home: NodeHome, node: str, query: Query, contract: Contract, *, query_id: str, coordinator: str | None,
) -> P.StatsAnswer:
    if not home.exists():
        return _refuse(node, P.RefusalCode.NO_POLICY.value, "this node has no policy: it takes part in nothing")
    paused, _ = home.state.paused()
    if paused:
        return _refuse(node, P.RefusalCode.PAUSED.value, refusal_text("paused"))
    policy = home.policy()
    decision = check_query(
        policy, contract=contract, epsilon=query.privacy.epsilon, delta=query.privacy.delta, coordinator=coordinator,
        secure_aggregation=query.secure_aggregation,
    )
    if not decision.accepted:
        home.audit.append("decision", task_id=query_id, payload={"accepted": False, "code": decision.code, "reason": decision.reason})
        return _refuse(node, str(decision.code.value if decision.code else "policy"), decision.reason)
    ds = policy.dataset_for(contract)
    assert ds is not None  # check_query refuses a contract no data set serves
    refusal = _awaiting_approval(home, node, query, contract, ds) if policy.approval == "manual" else None
    if refusal is not None:
        return refusal
    frame = _read_conforming(home, node, ds, contract, min_rows=min_rows_for(policy, None)[0])
    if isinstance(frame, P.StatsAnswer):
        return frame
    mechanism = mechanism_of(query)
    refusal = _reserve(home, node, ds, query, query_id=query_id, mechanism=mechanism)
    if refusal is not None:
        return refusal
    release = _release(home, ds, frame, query, contract, policy.limits, query_id=query_id, mechanism=mechanism)
    return P.StatsAnswer(
        node=node, node_name=display_name(node), accepted=True, reason=decision.reason,
        epsilon=release.epsilon, delta=release.delta, release_json=release.model_dump_json(),
    )


def _awaiting_approval(home: NodeHome, node: str, query: Query, contract: Contract, ds: DatasetSpec) -> P.StatsAnswer | None:
    """With ``approval = "manual"``: the refusal while the operator has not approved the query."""
    fp = query_fingerprint(query, contract)
    waiting = awaiting_approval(
        home, fp,
        lambda: {
            "kind": "statistics", "query": query.name, "contract": contract.ref, "dataset": ds.name,
            "epsilon": query.privacy.epsilon, "delta": query.privacy.delta,
            "measures": [m.name for m in query.measures],
            "sends": "noisy aggregates per cell (OpenDP), no rows",
        },
        what="query",
    )
    if waiting is None:
        return None
    code = "approval-rejected" if home.state.status(fp) == "rejected" else P.RefusalCode.PENDING_APPROVAL.value
    return _refuse(node, code, refusal_text(code, key=fp))


def _read_conforming(home: NodeHome, node: str, ds: DatasetSpec, contract: Contract, *, min_rows: int) -> pd.DataFrame | P.StatsAnswer:
    """The data set's rows, or the refusal: data that does not conform, is missing, or too small."""
    # The data was checked against the node's contract when it was registered (fedgov node data
    # check): the recorded result for the current files says whether it conforms; the details
    # (rows, columns, values) stay in the node-local report, and the answer is a fixed text.
    status = data_status(home, ds, contract)
    invalid = P.RefusalCode.DATA_INVALID.value
    missing = P.RefusalCode.DATA_MISSING.value
    if status != "conforms":
        code = missing if status == "missing" else invalid
        return _refuse(node, code, refusal_text(code, contract=contract.ref))
    try:
        train = read_node_frame(contract, [ds.train_source])
        test = read_node_frame(contract, [ds.test_source]) if ds.test_source is not None and source_exists(ds.test_source) else None
        frame = train if test is None else pd.concat([train, test], ignore_index=True)
    except DataValidationError:
        return _refuse(node, invalid, refusal_text(invalid, contract=contract.ref))
    except FedgovError:
        return _refuse(node, missing, refusal_text(missing, contract=contract.ref))
    # limits.min_rows counts the training rows (the data set's path), as for training
    # (fedgov.node.policy.min_rows_for); the answer uses the test rows too
    if len(train) < min_rows:
        return _refuse(node, P.RefusalCode.TOO_FEW_ROWS.value, refusal_text("too-few-rows", setting="limits.min_rows", limit=min_rows))
    return frame


def _reserve(home: NodeHome, node: str, ds: DatasetSpec, query: Query, *, query_id: str, mechanism: Mechanism) -> P.StatsAnswer | None:
    """Reserve the query's whole epsilon and delta, and record the decision; the refusal when
    that would overspend the data set's budget."""
    try:
        home.ledger.reserve(dataset=ds.name, task_id=query_id, mechanism=mechanism, budget=budget_of(ds), note=f"statistics query {query.name}")
    except BudgetExceeded as exc:
        home.audit.append("decision", task_id=query_id, payload={"accepted": False, "code": P.RefusalCode.BUDGET_EXHAUSTED.value, "reason": str(exc)[:500]})
        return _refuse(node, P.RefusalCode.BUDGET_EXHAUSTED.value, str(exc).splitlines()[0][:400])
    home.audit.append(
        "decision", task_id=query_id,
        payload={"accepted": True, "kind": "statistics", "dataset": ds.name, "epsilon_reserved": query.privacy.epsilon,
                 "delta_reserved": query.privacy.delta, "mechanism": mechanism.kind},
    )
    return None


def _release(
    home: NodeHome, ds: DatasetSpec, frame: pd.DataFrame, query: Query, contract: Contract, limits: LimitsSpec, *,
    query_id: str, mechanism: Mechanism,
) -> LocalRelease:
    """The noisy release, with its spend in the ledger and the audit log before it leaves the
    node; on any failure the reservation goes back and nothing is released."""
    try:
        release = local_release(frame, query, contract, min_cohort=limits.min_cohort, small_cells=limits.small_cells)
    except Exception:
        # Nothing was released: the reservation goes back, and the error stays at the node.
        home.ledger.release(dataset=ds.name, task_id=query_id, note="query failed at the node before any release")
        raise
    if not (math.isclose(release.epsilon, mechanism.epsilon or 0.0, rel_tol=1e-9, abs_tol=1e-12)
            and math.isclose(release.delta, mechanism.delta, rel_tol=1e-9, abs_tol=1e-15)):
        # Never happens by construction; if it did, what was reserved would not cover the release.
        home.ledger.release(dataset=ds.name, task_id=query_id, note="release did not match the reservation; nothing sent")
        raise RuntimeError(f"the release spends ({release.epsilon}, {release.delta}), the query reserved ({mechanism.epsilon}, {mechanism.delta})")
    # The spend is in the ledger before the answer leaves the node.
    home.ledger.spend(dataset=ds.name, task_id=query_id, mechanism=mechanism, round=1)
    home.ledger.release(dataset=ds.name, task_id=query_id, note="statistics query answered")
    home.audit.append(
        "spend", task_id=query_id,
        payload={"kind": "statistics", "mechanism": mechanism.kind, "epsilon": release.epsilon, "delta": release.delta,
                 "parts": len(release.parts), "small_cells": limits.small_cells, "min_cohort": limits.min_cohort},
    )
    return release
