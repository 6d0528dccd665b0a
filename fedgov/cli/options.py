"""Command-line options that ``fedgov run`` and ``fedgov query`` share: the simulated federation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import click
import typer
from click.core import ParameterSource

from fedgov.cli.console import usage_error

if TYPE_CHECKING:
    from fedgov.launch.simulation import SimulationOptions

__all__ = ["Approval", "Cpus", "JsonOut", "NodeBudget", "RayAddress", "RunsDir", "StateDir", "from_command_line", "simulation_options"]

RunsDir = Annotated[Path, typer.Option(help="Where run directories are created")]
Cpus = Annotated[int | None, typer.Option(help="CPUs for the simulation engine (default: all)")]
StateDir = Annotated[Path | None, typer.Option(help="Keep the simulated nodes' directories (policy, ledger, audit log) here, between runs")]
NodeBudget = Annotated[float, typer.Option(help="Total epsilon per data set in a new simulated node's policy")]
Approval = Annotated[str, typer.Option(help="Approval mode in a new simulated node's policy: auto, manual or deny")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the report as JSON at the end")]
RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray-address", envvar="RAY_ADDRESS", show_envvar=True,
        help="Run the simulation on this existing Ray cluster: HOST:PORT of its head (ray start --head --port). "
        "The run directory (and --state-dir) must lie on storage every Ray node sees at the same path; fedgov checks "
        "that first. Empty: a Ray of the run's own on this machine (the default without RAY_ADDRESS)",
    ),
]

_APPROVALS: tuple[Literal["auto", "manual", "deny"], ...] = ("auto", "manual", "deny")


def from_command_line(name: str) -> bool:
    """Whether the current command's parameter ``name`` was given on the command line (not by
    an environment variable or its default)."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE


def simulation_options(
    *,
    runs_dir: Path,
    num_cpus: int | None,
    state_dir: Path | None,
    node_budget: float,
    approval: str,
    local_baseline: bool = True,
    ray_address: str | None = None,
) -> SimulationOptions:
    """Simulation options from the shared command-line options; exit 2 on a bad approval mode or
    on ``--cpus`` with a Ray cluster, exit 10 (ConfigError) on a Ray address that is not HOST:PORT.

    ``ray_address``: ``--ray-address`` as Click resolved it (the option, else ``RAY_ADDRESS``);
    empty or ``local``: a Ray of the run's own.
    """
    from fedgov.launch.raycluster import parse_ray_address, resolve_ray_address  # lazy: the launchers (fedgov --help)
    from fedgov.launch.simulation import SimulationOptions  # lazy: numpy, Flower's simulation (fedgov --help)

    mode = next((a for a in _APPROVALS if a == approval), None)
    if mode is None:
        usage_error(f"--approval must be auto, manual or deny, not {approval!r}")
    address = resolve_ray_address(ray_address, environ={})  # Click has read RAY_ADDRESS already
    if address is not None:
        parse_ray_address(address)  # before any data is partitioned
        if num_cpus is not None:
            given = "--ray-address" if from_command_line("ray_address") else "RAY_ADDRESS"
            usage_error(
                f"--cpus sets the CPUs of a Ray of the run's own, but the run goes to the Ray cluster at {address} "
                f"({given}), whose nodes have the CPUs 'ray start --num-cpus' gave them: leave out --cpus, "
                "or run on this machine with --ray-address ''"
            )
    return SimulationOptions(
        runs_dir=runs_dir, num_cpus=num_cpus, local_baseline=local_baseline,
        state_dir=state_dir, node_budget=node_budget, approval=mode, ray_address=address,
    )
