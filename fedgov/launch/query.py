"""Statistics queries across the federation: the node's answer and the coordinator's run.

A query (:mod:`fedgov.analytics.query`) travels to every node as a Flower *query* message of
kind ``stats``. Each node, on its own:

1. refuses if paused, or if its policy does not accept the query (:func:`fedgov.node.policy.check_query`:
   kind ``statistics``, the contract served, epsilon and delta per node), or while it waits
   for an operator's approval (``approval = "manual"``);
2. looks up whether its data conforms to the contract (checked when the data was registered,
   ``fedgov node data check``; checked again when the files changed): refuses with the fixed
   ``data-invalid`` text, no counts, columns or values; and refuses with fewer than
   ``limits.min_rows`` rows;
3. reserves the query's whole epsilon and delta in its ledger (refuses with
   ``budget-exhausted`` and the reason when that would overspend the data set's budget);
4. computes its noisy release with OpenDP (:func:`fedgov.analytics.local_release`: rows per
   person capped, values clamped to the contract, small cells as its policy says), records
   the spend in the ledger and the audit log, and only then answers.

The coordinator (:func:`run_query`) combines the noisy parts (national, per region, per
node), lists refusals per node, and in simulation also computes the true answer from the
simulated nodes' files and the error of every figure. It writes ``query.json``,
``query.csv`` and ``query.png`` into the run directory.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedgov import protocol as P
from fedgov.node.admission import awaiting_approval
from fedgov.analytics import (
    LocalRelease,
    Query,
    QueryNode,
    QueryReport,
    combine,
    compare,
    local_release,
    true_result,
    write_outputs,
)
from fedgov.config import Contract
from fedgov.errors import DataValidationError, FederationError, FedgovError
from fedgov.coordinator.events import EventWriter
from fedgov.node.ledger import Mechanism
from fedgov.errors import BudgetExceeded
from fedgov.config.municipalities import display_name
from fedgov.node.contracts import data_status
from fedgov.node.refusals import refusal_text
from fedgov.node.home import NodeHome, budget_of
from fedgov.node.policy import check_query

__all__ = [
    "query_fingerprint", "query_id_of", "answer_query", "run_query", "regions_of", "read_node_frame",
    "run_query_simulation", "submit_query",
]

log = logging.getLogger("fedgov.launch.query")


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


def read_node_frame(contract: Contract, paths: Iterable[Path | None]) -> pd.DataFrame:
    """All of a node's rows for a query (training and test files together), validated."""
    from fedgov.data import read_table, validate_frame

    frames = []
    for p in paths:
        if p is None or not Path(p).is_file():
            continue
        raw = read_table(p)
        frames.append(validate_frame(raw, contract, file=str(p)))
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
    """Everything a node does with one statistics query (see the module docstring)."""
    if not home.exists():
        return _refuse(node, P.RefusalCode.NO_POLICY.value, "this node has no policy: it takes part in nothing")
    paused, why = home.state.paused()
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
    if policy.approval == "manual":
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
        if waiting is not None:
            code = "approval-rejected" if home.state.status(fp) == "rejected" else P.RefusalCode.PENDING_APPROVAL.value
            return _refuse(node, code, refusal_text(code, key=fp))
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
        frame = read_node_frame(contract, [ds.path, ds.test_path])
    except DataValidationError:
        return _refuse(node, invalid, refusal_text(invalid, contract=contract.ref))
    except FedgovError:
        return _refuse(node, missing, refusal_text(missing, contract=contract.ref))
    if len(frame) < policy.limits.min_rows:
        return _refuse(node, P.RefusalCode.TOO_FEW_ROWS.value, refusal_text("too-few-rows", setting="limits.min_rows"))
    mechanism = mechanism_of(query)
    budget = budget_of(ds)
    try:
        home.ledger.reserve(dataset=ds.name, task_id=query_id, mechanism=mechanism, budget=budget, note=f"statistics query {query.name}")
    except BudgetExceeded as exc:
        home.audit.append("decision", task_id=query_id, payload={"accepted": False, "code": P.RefusalCode.BUDGET_EXHAUSTED.value, "reason": str(exc)[:500]})
        return _refuse(node, P.RefusalCode.BUDGET_EXHAUSTED.value, str(exc).splitlines()[0][:400])
    home.audit.append(
        "decision", task_id=query_id,
        payload={"accepted": True, "kind": "statistics", "dataset": ds.name, "epsilon_reserved": query.privacy.epsilon,
                 "delta_reserved": query.privacy.delta, "mechanism": mechanism.kind},
    )
    try:
        release = local_release(
            frame, query, contract, min_cohort=policy.limits.min_cohort, small_cells=policy.limits.small_cells,
        )
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
                 "parts": len(release.parts), "small_cells": policy.limits.small_cells, "min_cohort": policy.limits.min_cohort},
    )
    return P.StatsAnswer(
        node=node, node_name=display_name(node), accepted=True, reason=decision.reason,
        epsilon=release.epsilon, delta=release.delta, release_json=release.model_dump_json(),
    )


# --- the coordinator ---------------------------------------------------------------------------


def regions_of(codes: Iterable[str], columns: Iterable[str]) -> dict[str, dict[str, str]]:
    """Each node's region values (e.g. its province, from the municipalities table)."""
    from fedgov.config.municipalities import all_municipalities

    table = all_municipalities()
    cols = list(columns)
    out: dict[str, dict[str, str]] = {}
    for code in codes:
        m = table.get(code)
        out[code] = {c: str(getattr(m, c)) for c in cols if m is not None and getattr(m, c, None) is not None}
    return out


def run_query(
    grid: Any,
    query: Query,
    contract: Contract,
    *,
    run_dir: Path,
    query_file: str,
    expected_nodes: int,
    federation: str = "",
    mode: str = "simulation",
    truth_paths: dict[str, list[Path]] | None = None,
    node_wait: float = 120.0,
    reply_timeout: float = 600.0,
    flower_run_id: int | None = None,
) -> QueryReport:
    """Run a query over the nodes connected to ``grid``; write and return its report.

    ``truth_paths`` (simulation only: node code -> its files) lets the coordinator compute the
    true answer and every figure's error; in deployment the coordinator never sees data.
    """
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fedgov.coordinator.run import wait_for_nodes

    run_dir.mkdir(parents=True, exist_ok=True)
    events = EventWriter(run_dir / "events.jsonl")
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    import fedgov

    report = QueryReport(
        fedgov_version=fedgov.__version__, run_id=run_dir.name, query=query.name, query_file=query_file,
        contract=contract.ref, federation=federation, mode=mode,  # type: ignore[arg-type]
        status="running", started=started, epsilon=query.privacy.epsilon, delta=query.privacy.delta,
        mechanism=query.privacy.mechanism, max_rows_per_person=query.privacy.max_rows_per_person,
        flower_run_id=flower_run_id,
    )
    events.emit("started", query=query.name, mode=mode, flower_run_id=flower_run_id)
    try:
        node_ids = wait_for_nodes(grid, expected_nodes, node_wait)
        events.emit("nodes-connected", count=len(node_ids), expected=expected_nodes)
        if not node_ids:
            raise FederationError(f"no node connected within {node_wait:.0f} s")
        stage_config = {P.QUERY_JSON: query.model_dump_json(), P.CONTRACT_JSON: contract.model_dump_json()}
        content = ConfigRecord({P.KIND: P.STATS, **stage_config, "server-round": 1})
        secure = None
        if query.secure_aggregation:
            from fedgov.coordinator.run import secagg_setup

            secure, failures = secagg_setup(grid, node_ids, 1, stage_config, reply_timeout)
            if secure is None:
                raise FederationError(
                    "secure aggregation could not be set up with enough nodes: "
                    + "; ".join(f"node-{n}: {why}" for n, why in list(failures.items())[:10])
                )
            events.emit("secure-aggregation", nodes=len(secure.survivors), threshold=secure.threshold)

        def message(nid: int) -> Message:
            rd = RecordDict({P.CONFIG: content})
            if secure is not None:
                rd[P.SECAGG] = secure.record_for(nid)
            return Message(content=rd, message_type=MessageType.QUERY, dst_node_id=nid)

        msgs = [message(nid) for nid in (secure.survivors if secure is not None else node_ids)]
        answers: dict[int, P.StatsAnswer] = {}
        masked: dict[int, Any] = {}
        for reply in grid.send_and_receive(msgs, timeout=reply_timeout):
            nid = reply.metadata.src_node_id
            if not reply.has_error() and P.ARRAYS in reply.content.array_records:
                masked[nid] = reply.content.array_records[P.ARRAYS][P.MASKED].numpy().astype(np.int64)
            if reply.has_error():
                answers[nid] = P.StatsAnswer(node=f"node-{nid}", accepted=False, code=P.RefusalCode.INTERNAL.value,
                                             reason=(reply.error.reason or "no reason given")[:500])
                continue
            try:
                answers[nid] = P.StatsAnswer.model_validate_json(str(reply.content[P.STATS][P.ANSWER_JSON]))
            except Exception as exc:  # noqa: BLE001 - a malformed answer is a failure of that node
                answers[nid] = P.StatsAnswer(node=f"node-{nid}", accepted=False, code=P.RefusalCode.INTERNAL.value,
                                             reason=f"malformed answer: {exc}"[:500])
        for nid in node_ids:
            answers.setdefault(nid, P.StatsAnswer(node=f"node-{nid}", accepted=False, code=P.RefusalCode.INTERNAL.value,
                                                  reason=f"no answer within {reply_timeout:.0f} s"))
        releases = {
            a.node: LocalRelease.model_validate_json(a.release_json)
            for a in answers.values() if a.accepted and a.release_json
        }
        report.nodes = [
            QueryNode(node=a.node, node_name=a.node_name, accepted=a.accepted, code=a.code, reason=a.reason,
                      epsilon=a.epsilon, delta=a.delta)
            for a in answers.values()
        ]
        events.emit(
            "answers", accepted=sorted(releases),
            refused={a.node: f"{a.code}: {a.reason}" for a in answers.values() if not a.accepted},
        )
        if not releases:
            raise FederationError(
                "no node answered the query: " + "; ".join(f"{a.node}: {a.code} ({a.reason})" for a in answers.values())
            )
        regions = regions_of(releases, query.regions)
        if secure is not None:
            from fedgov.analytics.secure import combine_secure
            from fedgov.coordinator.run import secagg_unmask

            names = {nid: a.node for nid, a in answers.items()}
            masked = {nid: v for nid, v in masked.items() if nid in names and names[nid] in releases}
            total = secagg_unmask(grid, secure, masked, 1, stage_config, reply_timeout)
            layouts = {tuple((p.measure, p.part, len(p.cells), p.noise_sd) for p in releases[names[n]].parts) for n in masked}
            if len(layouts) != 1:
                raise FederationError("the nodes' releases do not share one layout; the secure sum cannot be read")
            report.result = combine_secure(releases[names[next(iter(masked))]], total, [names[n] for n in masked], query, contract)
        else:
            report.result = combine(releases, query, contract, regions=regions)
        if truth_paths is not None:
            frames = {code: read_node_frame(contract, truth_paths[code]) for code in releases if code in truth_paths}
            report.truth = true_result(frames, query, contract, regions=regions)
            report.errors = compare(report.result, report.truth)
        report.status = "completed"
    except Exception as exc:  # the report must say what happened, whatever it was
        log.exception("statistics query failed")
        report.status = "failed"
        report.message = str(exc)
        events.emit("failed", message=str(exc))
    finally:
        report.finished = datetime.now(timezone.utc)
        report.wall_seconds = time.monotonic() - t0
        try:
            report.artifacts = write_outputs(report, run_dir)
        except Exception:  # noqa: BLE001 - the JSON report at least
            log.exception("writing the query outputs failed")
            from fedgov.reports import write_json_atomic

            write_json_atomic(run_dir / "query.json", report.model_dump_json(indent=2))
        events.emit("report", path=str(run_dir / "query.json"), status=report.status)
    return report


# --- running a query: simulation and deployment -------------------------------------------------


def _finish(run_dir: Path, started: float) -> QueryReport:
    path = run_dir / "query.json"
    if not path.is_file():
        log_file = run_dir / "logs" / "flower.log"
        tail = "\n".join(log_file.read_text("utf-8", errors="replace").splitlines()[-25:]) if log_file.is_file() else ""
        raise FederationError(f"the query ended without a report; see {log_file}:\n{tail}")
    report = QueryReport.model_validate_json(path.read_text("utf-8"))
    report.wall_seconds = time.time() - started
    report.artifacts = write_outputs(report, run_dir)
    if report.status != "completed":
        err = FederationError(f"the query failed: {report.message} (report: {path})")
        err.run_dir = run_dir  # type: ignore[attr-defined]
        raise err
    return report


def run_query_simulation(
    query_path: Path,
    federation_path: Path | None = None,
    options: Any = None,
    on_event: Any = None,
) -> Path:
    """Answer a query on a simulated federation (Flower's simulation engine); return the run dir.

    Each municipality gets a node directory (policy, ledger, audit log) as in ``fedgov run``;
    with ``options.state_dir`` they persist, so that budgets are spent across queries.
    """
    from fedgov.analytics import load_query
    from fedgov.config import load_federation
    from fedgov.errors import ConfigError, Problem
    from fedgov.launch.simulation import SimulationOptions, new_run_dir, prepare_nodes, simulate

    opts: SimulationOptions = options or SimulationOptions()
    emit = on_event or (lambda e: None)
    query, contract = load_query(query_path)
    fed_path = federation_path or query.federation
    if fed_path is None:
        raise ConfigError(
            f"No federation for query {query_path}",
            [Problem(str(query_path), "federation", "name a federation in the query file or with --federation")],
        )
    federation = load_federation(fed_path)
    run_dir = new_run_dir(opts.runs_dir, query.name).resolve()
    nodes, manifest = prepare_nodes(run_dir, federation, contract, opts, emit, max_epsilon=query.privacy.epsilon)
    started = time.time()
    simulate(
        run_dir,
        n_nodes=len(nodes),
        run_config_values={
            "query-path": str(Path(query_path).resolve()),
            "federation-path": str(Path(fed_path).resolve()),
            "manifest-path": str(manifest),
            "run-dir": str(run_dir),
        },
        options=opts,
        emit=emit,
    )
    _finish(run_dir, started)
    emit({"event": "done", "report": str(run_dir / "query.json")})
    return run_dir


def submit_query(
    query_path: Path,
    coordinator_dir: Path,
    *,
    runs_dir: Path = Path("runs"),
    expected_nodes: int = 1,
    node_wait: float = 120.0,
    on_event: Any = None,
    timeout: float = 3600.0,
) -> Path:
    """Answer a query on the coordinator's real nodes (run it on the coordinator's host)."""
    from fedgov.analytics import load_query
    from fedgov.deploy.submit import run_at_coordinator
    from fedgov.launch.simulation import new_run_dir

    emit = on_event or (lambda e: None)
    query, _ = load_query(query_path)
    run_dir = new_run_dir(runs_dir, query.name).resolve()
    started = time.time()
    run_at_coordinator(
        coordinator_dir, run_dir,
        {"query-path": str(Path(query_path).resolve()), "expected-nodes": int(expected_nodes), "node-wait": float(node_wait)},
        emit=emit, timeout=timeout,
    )
    _finish(run_dir, started)
    emit({"event": "done", "report": str(run_dir / "query.json")})
    return run_dir
