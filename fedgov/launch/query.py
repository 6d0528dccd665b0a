"""Launching a statistics query: on a simulated federation, or on the coordinator's real nodes.

What a node does with a query is in :mod:`fedgov.node.statistics`, what the coordinator does
in :mod:`fedgov.coordinator.statistics`; this module starts the Flower run that brings them
together (``fedgov query``) and reads its report back.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedgov.analytics import QueryReport, write_outputs
from fedgov.errors import FederationError

if TYPE_CHECKING:
    from fedgov.launch.simulation import EventCallback, SimulationOptions

__all__ = ["finish_query", "run_query_simulation"]

log = logging.getLogger(__name__)


def finish_query(run_dir: Path, started: float) -> QueryReport:
    """The query's report, after the Flower run ended: its outputs written, its time measured;
    a FederationError when there is none or the query failed."""
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
        err.run_dir = run_dir
        raise err
    return report


def run_query_simulation(
    query_path: Path,
    federation_path: Path | None = None,
    options: SimulationOptions | None = None,
    on_event: EventCallback | None = None,
) -> Path:
    """Answer a query on a simulated federation (Flower's simulation engine); return the run dir.

    Each municipality gets a node directory (policy, ledger, audit log) as in ``fedgov run``;
    with ``options.state_dir`` they persist, so that budgets are spent across queries.
    """
    from fedgov.analytics import load_query
    from fedgov.config import load_federation
    from fedgov.errors import ConfigError, Problem
    from fedgov.launch.simulation import SimulationOptions, new_run_dir, prepare_nodes, simulate

    opts = options or SimulationOptions()
    emit: EventCallback = on_event or (lambda e: None)
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
    finish_query(run_dir, started)
    emit({"event": "done", "report": str(run_dir / "query.json")})
    return run_dir
