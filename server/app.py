"""The Flower ServerApp of fedgov (Message API): parse the run config, run one function.

A training task runs in :func:`fedgov.coordinator.run_training`, a statistics query in
:func:`fedgov.coordinator.run_query`. The run config is typed (:class:`server.config.RunConfig`):
an unknown key or a bad value stops the app here, with the key named.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedgov.analytics import load_query
from fedgov.config import load_task
from fedgov.coordinator import run_query, run_training
from fedgov.coordinator.grid import PollingGrid
from fedgov.coordinator.simengine import index_pending_messages
from fedgov.pacing import shorten_object_pulls
from server.config import RunConfig

__all__ = ["app"]

app = ServerApp()
log = logging.getLogger("fedgov.server")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the task (``task-path``) or the statistics query (``query-path``) of the run config."""
    config = RunConfig.from_flower(context.run_config)
    run_id = int(context.run_id)
    index_pending_messages(grid)  # simulation: each virtual node's messages found without a scan of all
    grid = PollingGrid(grid)  # replies looked for every 20 to 100 ms, not every 3 s
    import flwr.superlink.grid.http_grid as http_grid

    shorten_object_pulls(http_grid)  # a reply's objects: asked for again after 20 ms, not 1 s
    if config.query_path is not None:
        query, contract = load_query(config.query_path)
        query_report = run_query(grid, query, contract, **config.query_arguments(query.name, flower_run_id=run_id))
        log.info("fedgov query %s finished: %s", query.name, query_report.status)
        return
    task, task_contract = load_task(config.task_file())
    report = run_training(grid, task, task_contract, config.training_options(task, flower_run_id=run_id))
    log.info("fedgov run %s finished: %s", report.run_id, report.status)
