"""The coordinator's side of a statistics query: ask the nodes, combine their noisy parts.

A query (:mod:`fedgov.analytics.query`) travels to every node as a Flower *query* message of
kind ``stats``; each node answers on its own (:mod:`fedgov.node.statistics`). The coordinator
(:func:`run_query`) combines the noisy parts (national, per region, per node), lists
refusals per node, and in simulation also computes the true answer from the simulated nodes'
files and the error of every figure. Under secure aggregation (``secure_aggregation = true``)
it learns only the sum of the nodes' noisy parts (:mod:`fedgov.coordinator.secure`). It
writes ``query.json``, ``query.csv`` and ``query.png`` into the run directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

import fedgov
from fedgov import protocol as P
from fedgov.analytics import LocalRelease, Query, QueryNode, QueryReport, QueryResult, combine, compare, true_result, write_outputs
from fedgov.config import Contract
from fedgov.config.registry import Registry
from fedgov.coordinator.events import EventWriter
from fedgov.coordinator.grid import wait_for_nodes
from fedgov.coordinator.secure import SecAggRound, secagg_setup, secagg_unmask
from fedgov.errors import DataValidationError, FederationError

__all__ = ["regions_of", "run_query"]

log = logging.getLogger(__name__)


def _registry_of(federation_file: str) -> Registry | None:
    """The organisation registry of a simulated federation (None: the CBS municipalities)."""
    if not federation_file:
        return None
    from fedgov.config import load_federation

    return load_federation(federation_file).organisations


def regions_of(codes: Iterable[str], columns: Iterable[str], registry: Registry | None = None) -> dict[str, dict[str, str]]:
    """Each node's region values from the organisation registry: ``region`` (for the default
    registry of CBS municipalities also ``province``, the same value)."""
    from fedgov.config.registry import default_registry

    table = registry if registry is not None else default_registry()
    cols = list(columns)
    out: dict[str, dict[str, str]] = {}
    for code in codes:
        org = table.get(code)
        values: dict[str, str] = {}
        if org is not None and org.region is not None:
            values["region"] = org.region
            if table.default:
                values["province"] = org.region
        out[code] = {c: values[c] for c in cols if c in values}
    return out


@dataclass
class _Answers:
    """The nodes' answers to one query: by Flower node id, the masked vectors (secure), and the releases by node name."""

    by_id: dict[int, P.StatsAnswer]
    masked: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def releases(self) -> dict[str, LocalRelease]:
        return {a.node: LocalRelease.model_validate_json(a.release_json) for a in self.by_id.values() if a.accepted and a.release_json}


def run_query(
    grid: Grid,
    query: Query,
    contract: Contract,
    *,
    run_dir: Path,
    query_file: str,
    expected_nodes: int,
    federation: str = "",
    federation_file: str = "",
    mode: Literal["simulation", "deployment"] = "simulation",
    truth_paths: dict[str, list[Path]] | None = None,
    node_wait: float = 120.0,
    reply_timeout: float = 600.0,
    flower_run_id: int | None = None,
) -> QueryReport:
    """Run a query over the nodes connected to ``grid``; write and return its report.

    ``truth_paths`` (simulation only: node code -> its files) lets the coordinator compute the
    true answer and every figure's error; in deployment the coordinator never sees data.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    events = EventWriter(run_dir / "events.jsonl")
    t0 = time.monotonic()
    report = QueryReport(
        fedgov_version=fedgov.__version__, run_id=run_dir.name, query=query.name, query_file=query_file,
        contract=contract.ref, federation=federation, federation_file=federation_file, mode=mode,
        status="running", started=datetime.now(timezone.utc), epsilon=query.privacy.epsilon, delta=query.privacy.delta,
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
        secure = _secure_setup(grid, node_ids, stage_config, reply_timeout, events) if query.secure_aggregation else None
        answers = _ask(grid, node_ids, stage_config, secure, reply_timeout)
        releases = _record_answers(report, answers, events)
        regions = regions_of(releases, query.regions, registry=_registry_of(federation_file))
        if secure is not None:
            report.result = _combine_secure(grid, secure, answers, releases, query, contract, stage_config, reply_timeout)
        else:
            report.result = combine(releases, query, contract, regions=regions)
        if truth_paths is not None:
            report.truth = true_result(_truth_frames(contract, truth_paths, releases), query, contract, regions=regions)
            report.errors = compare(report.result, report.truth)
        report.status = "completed"
    except Exception as exc:  # the report must say what happened, whatever it was
        log.exception("statistics query failed")
        report.status = "failed"
        report.message = str(exc)
        events.emit("failed", message=str(exc))
    finally:
        _write(report, run_dir, events, time.monotonic() - t0)
    return report


def _secure_setup(grid: Grid, node_ids: list[int], stage_config: dict[str, str], timeout: float, events: EventWriter) -> SecAggRound:
    """The keys and shares stages of secure aggregation; a FederationError when too few nodes took part."""
    secure, failures = secagg_setup(grid, node_ids, 1, stage_config, timeout)
    if secure is None:
        raise FederationError(
            "secure aggregation could not be set up with enough nodes: "
            + "; ".join(f"node-{n}: {why}" for n, why in list(failures.items())[:10])
        )
    events.emit("secure-aggregation", nodes=len(secure.survivors), threshold=secure.threshold)
    return secure


def _ask(grid: Grid, node_ids: list[int], stage_config: dict[str, str], secure: SecAggRound | None, timeout: float) -> _Answers:
    """Send the query to every node (under secure aggregation: every survivor, with its shares);
    each node's answer, or why there is none."""
    content = ConfigRecord({P.KIND: P.STATS, **stage_config, "server-round": 1})

    def message(nid: int) -> Message:
        rd = RecordDict({P.CONFIG: content})
        if secure is not None:
            rd[P.SECAGG] = secure.record_for(nid)
        return Message(content=rd, message_type=MessageType.QUERY, dst_node_id=nid)

    answers = _Answers(by_id={})
    msgs = [message(nid) for nid in (secure.survivors if secure is not None else node_ids)]
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        nid = reply.metadata.src_node_id
        if not reply.has_error() and P.ARRAYS in reply.content.array_records:
            answers.masked[nid] = reply.content.array_records[P.ARRAYS][P.MASKED].numpy().astype(np.int64)
        answers.by_id[nid] = _stats_answer(nid, reply)
    for nid in node_ids:
        answers.by_id.setdefault(nid, P.StatsAnswer(node=f"node-{nid}", accepted=False, code=P.RefusalCode.INTERNAL.value,
                                                    reason=f"no answer within {timeout:.0f} s"))
    return answers


def _stats_answer(nid: int, reply: Message) -> P.StatsAnswer:
    """A node's answer; an error reply or a malformed answer is a failure of that node."""
    if reply.has_error():
        return P.StatsAnswer(node=f"node-{nid}", accepted=False, code=P.RefusalCode.INTERNAL.value,
                             reason=(reply.error.reason or "no reason given")[:500])
    try:
        return P.StatsAnswer.model_validate_json(str(reply.content[P.STATS][P.ANSWER_JSON]))
    except Exception as exc:  # noqa: BLE001 - a malformed answer is a failure of that node
        return P.StatsAnswer(node=f"node-{nid}", accepted=False, code=P.RefusalCode.INTERNAL.value,
                             reason=f"malformed answer: {exc}"[:500])


def _record_answers(report: QueryReport, answers: _Answers, events: EventWriter) -> dict[str, LocalRelease]:
    """Every node's answer into the report; the releases of those that answered (none: a FederationError)."""
    releases = answers.releases
    report.nodes = [
        QueryNode(node=a.node, node_name=a.node_name, accepted=a.accepted, code=a.code, reason=a.reason,
                  epsilon=a.epsilon, delta=a.delta)
        for a in answers.by_id.values()
    ]
    events.emit(
        "answers", accepted=sorted(releases),
        refused={a.node: f"{a.code}: {a.reason}" for a in answers.by_id.values() if not a.accepted},
    )
    if not releases:
        raise FederationError(
            "no node answered the query: " + "; ".join(f"{a.node}: {a.code} ({a.reason})" for a in answers.by_id.values())
        )
    return releases


def _combine_secure(
    grid: Grid, secure: SecAggRound, answers: _Answers, releases: dict[str, LocalRelease], query: Query, contract: Contract,
    stage_config: dict[str, str], timeout: float,
) -> QueryResult:
    """Unmask the sum of the masked releases of the nodes that answered, and read the result from it."""
    from fedgov.analytics.secure import combine_secure

    names = {nid: a.node for nid, a in answers.by_id.items()}
    masked = {nid: v for nid, v in answers.masked.items() if nid in names and names[nid] in releases}
    total = secagg_unmask(grid, secure, masked, 1, stage_config, timeout)
    layouts = {tuple((p.measure, p.part, len(p.cells), p.noise_sd) for p in releases[names[n]].parts) for n in masked}
    if len(layouts) != 1:
        raise FederationError("the nodes' releases do not share one layout; the secure sum cannot be read")
    return combine_secure(releases[names[next(iter(masked))]], total, [names[n] for n in masked], query, contract)


def _truth_frames(contract: Contract, truth_paths: dict[str, list[Path]], releases: Iterable[str]) -> dict[str, pd.DataFrame]:
    """Simulation only: the true data of each node that answered, read from its files.

    The same reading as a node's own (:func:`fedgov.node.statistics.read_node_frame`): all of
    its files that exist, each validated against the contract, in one frame.
    """
    from fedgov.data import read_table, validate_frame

    frames: dict[str, pd.DataFrame] = {}
    for code in releases:
        if code not in truth_paths:
            continue
        parts = [validate_frame(read_table(p), contract, file=str(p)) for p in truth_paths[code] if p is not None and Path(p).is_file()]
        if not parts:
            raise DataValidationError("the node has no data file for this contract", [])
        frames[code] = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    return frames


def _write(report: QueryReport, run_dir: Path, events: EventWriter, seconds: float) -> None:
    """The report and its outputs (CSV, plot); at least the JSON report when the outputs fail."""
    report.finished = datetime.now(timezone.utc)
    report.wall_seconds = seconds
    try:
        report.artifacts = write_outputs(report, run_dir)
    except Exception:  # noqa: BLE001 - the JSON report at least
        log.exception("writing the query outputs failed")
        from fedgov.reports import write_json_atomic

        write_json_atomic(run_dir / "query.json", report.model_dump_json(indent=2))
    events.emit("report", path=str(run_dir / "query.json"), status=report.status)
