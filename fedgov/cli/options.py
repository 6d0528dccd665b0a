"""Command-line options that ``fedgov run`` and ``fedgov query`` share: the simulated federation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from fedgov.cli.console import usage_error

if TYPE_CHECKING:
    from fedgov.launch.simulation import SimulationOptions

__all__ = ["Approval", "Cpus", "JsonOut", "NodeBudget", "RunsDir", "StateDir", "simulation_options"]

RunsDir = Annotated[Path, typer.Option(help="Where run directories are created")]
Cpus = Annotated[int | None, typer.Option(help="CPUs for the simulation engine (default: all)")]
StateDir = Annotated[Path | None, typer.Option(help="Keep the simulated nodes' directories (policy, ledger, audit log) here, between runs")]
NodeBudget = Annotated[float, typer.Option(help="Total epsilon per data set in a new simulated node's policy")]
Approval = Annotated[str, typer.Option(help="Approval mode in a new simulated node's policy: auto, manual or deny")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the report as JSON at the end")]

_APPROVALS: tuple[Literal["auto", "manual", "deny"], ...] = ("auto", "manual", "deny")


def simulation_options(
    *,
    runs_dir: Path,
    num_cpus: int | None,
    state_dir: Path | None,
    node_budget: float,
    approval: str,
    local_baseline: bool = True,
) -> SimulationOptions:
    """Simulation options from the shared command-line options; exit 2 on a bad approval mode."""
    from fedgov.launch.simulation import SimulationOptions  # lazy: numpy, Flower's simulation (fedgov --help)

    mode = next((a for a in _APPROVALS if a == approval), None)
    if mode is None:
        usage_error(f"--approval must be auto, manual or deny, not {approval!r}")
    return SimulationOptions(
        runs_dir=runs_dir, num_cpus=num_cpus, local_baseline=local_baseline,
        state_dir=state_dir, node_budget=node_budget, approval=mode,
    )
