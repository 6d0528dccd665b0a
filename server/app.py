"""The Flower ServerApp of fedgov (Message API). All logic lives in :mod:`fedgov.coordinator`."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedgov.config import load_task
from fedgov.coordinator import run_training
from fedgov.data import read_manifest

app = ServerApp()
log = logging.getLogger("fedgov.server")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the task named in the run config (``task-path``) and write its report."""
    cfg = context.run_config
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
    )
    log.info("fedgov run %s finished: %s", report.run_id, report.status)
