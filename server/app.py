"""The Flower ServerApp of fedgov (Message API). All logic lives in :mod:`fedgov.coordinator.run`."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedgov.config import load_task
from fedgov.coordinator.run import run_training
from fedgov.data import read_manifest

app = ServerApp()
log = logging.getLogger("fedgov.server")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the task named in the run config (``task-path``) and write its report."""
    cfg = context.run_config
    if str(cfg.get("query-path", "") or ""):
        _query(grid, context)
        return
    task_path = Path(str(cfg["task-path"]))
    task, contract = load_task(task_path)
    run_dir_value = str(cfg.get("run-dir", "") or "")
    run_dir = Path(run_dir_value) if run_dir_value else Path("runs") / f"flwr-{task.name}"
    manifest_value = str(cfg.get("manifest-path", "") or "")
    expected = len(read_manifest(Path(manifest_value))) if manifest_value else task.training.min_nodes
    federation = str(cfg.get("federation-path", "") or "") or "(deployment)"
    report = run_training(
        grid,
        task,
        contract,
        run_dir=run_dir,
        expected_nodes=expected,
        task_file=str(task_path),
        federation=Path(federation).stem if federation != "(deployment)" else federation,
        local_baseline=bool(cfg.get("local-baseline", True)),
        mode="deployment" if str(cfg.get("mode", "simulation")) == "deployment" else "simulation",
        connect_timeout=task.training.node_wait,
        reply_timeout=task.training.reply_timeout,
        flower_run_id=int(context.run_id),
        federation_file=federation if federation != "(deployment)" else "",
        resume=bool(cfg.get("resume", False)),
        crash_after_round=int(str(cfg.get("crash-after-round", 0) or 0)) or None,
    )
    log.info("fedgov run %s finished: %s", report.run_id, report.status)


def _query(grid: Grid, context: Context) -> None:
    """A statistics query (``query-path``): :func:`fedgov.launch.query.run_query`."""
    from fedgov.analytics import load_query
    from fedgov.launch.query import run_query

    cfg = context.run_config
    query_path = Path(str(cfg["query-path"]))
    query, contract = load_query(query_path)
    run_dir = Path(str(cfg.get("run-dir", "") or "") or Path("runs") / f"flwr-{query.name}")
    manifest_value = str(cfg.get("manifest-path", "") or "")
    truth = None
    expected = 1
    if manifest_value:  # simulation: the coordinator may read the simulated nodes' files
        nodes = read_manifest(Path(manifest_value))
        expected = len(nodes)
        truth = {n.code: [n.train_path, n.test_path] for n in nodes}
    else:
        expected = int(str(cfg.get("expected-nodes", 1) or 1))
    report = run_query(
        grid, query, contract, run_dir=run_dir, query_file=str(query_path), expected_nodes=expected,
        federation=Path(str(cfg.get("federation-path", "") or "")).stem or "(deployment)",
        mode="deployment" if str(cfg.get("mode", "simulation")) == "deployment" else "simulation",
        truth_paths=truth, flower_run_id=int(context.run_id),
        node_wait=float(str(cfg.get("node-wait", 120) or 120)),
    )
    log.info("fedgov query %s finished: %s", query.name, report.status)

