"""Launchers: simulation and query runs on this machine, and the Flower processes they manage.

* :mod:`~fedgov.launch.simulation`: ``fedgov run``, a task on Flower's simulation engine, and
  what it shares with deployment (the app directory, following a run, the run config);
* :mod:`~fedgov.launch.processes`: Flower's processes with fedgov's environment, stopped with
  all their children;
* :mod:`~fedgov.launch.query`: statistics queries.

A name is imported from its module when first used (PEP 562), so that the deployment modules,
which need only :mod:`~fedgov.launch.processes`, do not import the launchers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedgov._lazy import lazy_exports

if TYPE_CHECKING:
    from fedgov.launch.query import finish_query, run_query_simulation
    from fedgov.launch.processes import (
        ManagedProcess,
        descendants,
        flower_bin,
        flower_env,
        free_port,
        kill_tree,
        wait_healthy,
    )
    from fedgov.launch.simulation import (
        SimulationOptions,
        app_dir,
        follow_run,
        new_run_dir,
        pin_roster_text,
        prepare_nodes,
        resume_simulation,
        run_simulation,
        simulate,
        write_run_config,
    )

_EXPORTS: dict[str, tuple[str, ...]] = {
    "processes": (
        "ManagedProcess", "descendants", "flower_bin", "flower_env", "free_port", "kill_tree", "wait_healthy",
    ),
    "query": ("finish_query", "run_query_simulation"),
    "simulation": (
        "SimulationOptions", "app_dir", "follow_run", "new_run_dir", "pin_roster_text", "prepare_nodes",
        "resume_simulation", "run_simulation", "simulate", "write_run_config",
    ),
}
"""Each public name, by the module that defines it (read by :func:`__getattr__`)."""

__all__ = [
    "ManagedProcess",
    "SimulationOptions",
    "app_dir",
    "descendants",
    "flower_bin",
    "flower_env",
    "follow_run",
    "finish_query",
    "free_port",
    "kill_tree",
    "new_run_dir",
    "pin_roster_text",
    "prepare_nodes",
    "resume_simulation",
    "run_query_simulation",
    "run_simulation",
    "simulate",
    "wait_healthy",
    "write_run_config",
]

if not TYPE_CHECKING:  # type checkers read the imports above; a __getattr__ would hide typos from them
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
