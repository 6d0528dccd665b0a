"""``fedgov task submit``: a task on the real federation of a running coordinator.

The run goes through the coordinator's SuperLink (TLS, authenticated SuperNodes) with
``flwr run``; the ServerApp runs on the coordinator's host and writes the same report as a
simulation into the run directory, which this command follows for progress. Run it on the
coordinator's host: Flower's Control API is not exposed to the network.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from fedgov.config import load_task
from fedgov.deploy.superlink import CONNECTION, load_coordinator
from fedgov.errors import FederationError
from fedgov.reports import load_report, plot_report, write_json_atomic
from fedgov.launch.processes import flower_env
from fedgov.launch.simulation import EventCallback, follow_run, new_run_dir, write_run_config

__all__ = ["resume_task", "run_at_coordinator", "submit_query", "submit_task"]


def _stopped_note(coordinator_dir: Path, run_dir: Path) -> str | None:
    """'run N was stopped ...' if the SuperLink says the run was stopped, else None."""
    from fedgov.deploy.tasks import run_dirs, run_status

    ids = [rid for rid, d in run_dirs(run_dir.parent).items() if d == run_dir]
    if not ids:
        return None
    try:
        info = run_status(coordinator_dir, max(ids), run_dir.parent)
    except FederationError:
        return None
    if info.status == "finished:stopped":
        done = f" after round {info.rounds_done}" if info.rounds_done else ""
        return f"run {max(ids)} was stopped at the coordinator ('fedgov task stop'){done}"
    return None


def run_at_coordinator(
    coordinator_dir: Path,
    run_dir: Path,
    values: dict[str, str | bool | int | float],
    *,
    emit: EventCallback,
    timeout: float,
) -> None:
    """Submit fedgov's app to the coordinator's SuperLink (``flwr run``, over the local Control
    API) with ``values`` in the run config, and follow ``run_dir/events.jsonl`` until it ends."""
    base, cfg = load_coordinator(coordinator_dir)
    emit({"event": "run-dir", "path": str(run_dir)})
    run_config = write_run_config(run_dir, {**values, "run-dir": str(run_dir), "mode": "deployment"})
    follow_run(CONNECTION, run_config, env=flower_env(cfg.path(base, cfg.flwr_home)), run_dir=run_dir, emit=emit, timeout=timeout)


def submit_task(
    task_path: Path,
    coordinator_dir: Path,
    *,
    runs_dir: Path = Path("runs"),
    on_event: EventCallback | None = None,
    timeout: float = 3600.0,
) -> Path:
    """Run ``task_path`` on the coordinator's federation; return the run directory."""
    task, _ = load_task(task_path)
    run_dir = new_run_dir(runs_dir, task.name).resolve()
    # A deployed node refuses the local-only baseline: a second release of its data.
    values: dict[str, str | bool | int | float] = {"task-path": str(Path(task_path).resolve()), "local-baseline": False}
    return _submit(coordinator_dir, run_dir, values, on_event=on_event, timeout=timeout)


def resume_task(run_dir: Path, coordinator_dir: Path, *, on_event: EventCallback | None = None, timeout: float = 3600.0) -> Path:
    """Continue the deployed run in ``run_dir`` from its last checkpoint (``fedgov task resume``),
    after the coordinator crashed or the run was stopped: the remaining rounds, on the same
    nodes, which continue their reservation (no ledger is charged twice)."""
    from fedgov.coordinator.checkpoint import load_checkpoint

    run_dir = Path(run_dir).resolve()
    ckpt, _ = load_checkpoint(run_dir)
    if ckpt.mode != "deployment":
        raise FederationError(f"{run_dir} is a simulated run: resume it with  fedgov run --resume {run_dir}")
    if ckpt.round >= ckpt.rounds_planned:
        raise FederationError(f"the run in {run_dir} completed all {ckpt.rounds_planned} rounds; there is nothing to resume")
    load_task(Path(ckpt.task_file))
    values: dict[str, str | bool | int | float] = {"task-path": ckpt.task_file, "local-baseline": False, "resume": True}
    return _submit(coordinator_dir, run_dir, values, on_event=on_event, timeout=timeout)


def _submit(
    coordinator_dir: Path, run_dir: Path, values: dict[str, str | bool | int | float], *, on_event: EventCallback | None, timeout: float
) -> Path:
    emit = on_event or (lambda e: None)
    started = time.time()
    run_at_coordinator(coordinator_dir, run_dir, values, emit=emit, timeout=timeout)
    report_path = run_dir / "report.json"
    report = load_report(report_path) if report_path.is_file() else None
    resumable = (run_dir / "checkpoint" / "state.json").is_file()
    hint = f"; the rounds completed so far are saved: continue with  fedgov task resume {run_dir} -C {coordinator_dir}" if resumable else ""
    if report is None or report.status != "completed":
        # A run stopped at the coordinator ('fedgov task stop') says so, whatever its ServerApp wrote.
        stopped = _stopped_note(coordinator_dir, run_dir)
        if stopped:
            if report is not None:
                report.status, report.message = "failed", stopped + hint
                report.finished = report.finished or datetime.now(timezone.utc)
                write_json_atomic(report_path, report.model_dump_json(indent=2))
            err = FederationError(f"{stopped} (run directory: {run_dir}){hint}")
            err.run_dir = run_dir
            raise err
    if report is None or report.status == "running":
        if report is not None:
            report.status, report.message = "failed", "the ServerApp ended before the run did"
            report.finished = datetime.now(timezone.utc)
            write_json_atomic(report_path, report.model_dump_json(indent=2))
        log = run_dir / "logs" / "flower.log"
        tail = "\n".join(log.read_text("utf-8", errors="replace").splitlines()[-25:]) if log.is_file() else ""
        err = FederationError(f"the run ended without a report; see {log}:\n{tail}{hint}")
        err.run_dir = run_dir
        raise err
    if report.status != "completed":
        err = FederationError(f"the run failed: {report.message} (report: {report_path})")
        err.run_dir = run_dir
        raise err
    report.wall_seconds = time.time() - started
    report.artifacts["plot"] = plot_report(report, run_dir / "accuracy.png").name
    write_json_atomic(report_path, report.model_dump_json(indent=2))
    emit({"event": "done", "report": str(report_path)})
    return run_dir


def submit_query(
    query_path: Path,
    coordinator_dir: Path,
    *,
    runs_dir: Path = Path("runs"),
    expected_nodes: int = 1,
    node_wait: float = 120.0,
    on_event: EventCallback | None = None,
    timeout: float = 3600.0,
) -> Path:
    """Answer a query on the coordinator's real nodes (run it on the coordinator's host)."""
    from fedgov.analytics import load_query  # lazy: pandas
    from fedgov.launch.query import finish_query

    emit: EventCallback = on_event or (lambda e: None)
    query, _ = load_query(query_path)
    run_dir = new_run_dir(runs_dir, query.name).resolve()
    started = time.time()
    run_at_coordinator(
        coordinator_dir, run_dir,
        {"query-path": str(Path(query_path).resolve()), "expected-nodes": int(expected_nodes), "node-wait": float(node_wait)},
        emit=emit, timeout=timeout,
    )
    finish_query(run_dir, started)
    emit({"event": "done", "report": str(run_dir / "query.json")})
    return run_dir
