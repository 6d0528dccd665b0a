"""``fedgov task submit``: a task on the real federation of a running coordinator.

The run goes through the coordinator's SuperLink (TLS, authenticated SuperNodes) with
``flwr run``; the ServerApp runs on the coordinator's host and writes the same report as a
simulation into the run directory, which this command follows for progress. Run it on the
coordinator's host: Flower's Control API is not exposed to the network.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedgov.config import load_task
from fedgov.deploy.coordinator import CONNECTION, load_coordinator
from fedgov.errors import FederationError
from fedgov.reports import load_report, plot_report, write_json_atomic
from fedgov.runtime import flower_env
from fedgov.simulation import EventCallback, follow_run, new_run_dir, write_run_config

__all__ = ["submit_task"]


def submit_task(
    task_path: Path,
    coordinator_dir: Path,
    *,
    runs_dir: Path = Path("runs"),
    on_event: EventCallback | None = None,
    timeout: float = 3600.0,
) -> Path:
    """Run ``task_path`` on the coordinator's federation; return the run directory."""
    emit = on_event or (lambda e: None)
    task, _ = load_task(task_path)
    base, cfg = load_coordinator(coordinator_dir)
    run_dir = new_run_dir(runs_dir, task.name).resolve()
    emit({"event": "run-dir", "path": str(run_dir)})
    run_config = write_run_config(
        run_dir,
        {
            "task-path": str(Path(task_path).resolve()),
            "run-dir": str(run_dir),
            # A deployed node refuses the local-only baseline: a second release of its data.
            "local-baseline": False,
            "mode": "deployment",
        },
    )
    started = time.time()
    follow_run(CONNECTION, run_config, env=flower_env(cfg.path(base, cfg.flwr_home)), run_dir=run_dir, emit=emit, timeout=timeout)
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        log = run_dir / "logs" / "flower.log"
        tail = "\n".join(log.read_text("utf-8", errors="replace").splitlines()[-25:]) if log.is_file() else ""
        raise FederationError(f"the run ended without a report; see {log}:\n{tail}")
    report = load_report(report_path)
    if report.status != "completed":
        err = FederationError(f"the run failed: {report.message} (report: {report_path})")
        err.run_dir = run_dir  # type: ignore[attr-defined]
        raise err
    report.wall_seconds = time.time() - started
    report.artifacts["plot"] = plot_report(report, run_dir / "accuracy.png").name
    write_json_atomic(report_path, report.model_dump_json(indent=2))
    emit({"event": "done", "report": str(report_path)})
    return run_dir
