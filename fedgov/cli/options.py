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

__all__ = [
    "Approval", "Cpus", "JsonOut", "NodeBudget", "NodePolicyOption", "RayAddress", "RunsDir", "StateDir", "from_command_line",
    "node_policy_pairs", "simulation_options",
]

RunsDir = Annotated[Path, typer.Option(help="Where run directories are created")]
Cpus = Annotated[int | None, typer.Option(help="CPUs for the simulation engine (default: all)")]
StateDir = Annotated[Path | None, typer.Option(help="Keep the simulated nodes' directories (policy, ledger, audit log) here, between runs")]
NodeBudget = Annotated[
    float | None,
    typer.Option(help="Total epsilon per data set in a new simulated node's policy (default: the federation "
                      "file's node_policy table, budget_epsilon, else 10); the same as --node-policy budget_epsilon=E"),
]
Approval = Annotated[
    str | None,
    typer.Option(help="Approval mode in a new simulated node's policy: auto, manual or deny (default: the federation "
                      "file's node_policy table, approval, else auto)"),
]
NodePolicyOption = Annotated[
    list[str] | None,
    typer.Option(
        "--node-policy", metavar="KEY=VALUE",
        help="What every new simulated node's policy says, over the federation file's node_policy table (repeat it): "
        "min_rows, min_rows_distributed, require_privacy, budget_epsilon, max_epsilon_per_task, approval; e.g. "
        "--node-policy min_rows=10 --node-policy require_privacy=false. Simulation only: a deployed node's policy is its own",
    ),
]
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


def node_policy_pairs(pairs: list[str] | None) -> dict[str, str]:
    """``--node-policy KEY=VALUE`` options as a mapping (exit 2 on one without ``=`` or with an
    unknown key; the values are checked with the federation file's ``[node_policy]``)."""
    from fedgov.config.federation import NODE_POLICY_KEYS  # lazy: pydantic models (fedgov --help)

    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not value.strip():
            usage_error(f"--node-policy takes KEY=VALUE, not {pair!r}")
        if key not in NODE_POLICY_KEYS:
            usage_error(f"--node-policy: unknown key {key!r}; one of {', '.join(NODE_POLICY_KEYS)}")
        out[key] = value.strip()
    return out


def simulation_options(
    *,
    runs_dir: Path,
    num_cpus: int | None,
    state_dir: Path | None,
    node_budget: float | None,
    approval: str | None,
    local_baseline: bool = True,
    ray_address: str | None = None,
    node_policy: list[str] | None = None,
) -> SimulationOptions:
    """Simulation options from the shared command-line options; exit 2 on a bad approval mode or
    on ``--cpus`` with a Ray cluster, exit 10 (ConfigError) on a Ray address that is not HOST:PORT.

    ``ray_address``: ``--ray-address`` as Click resolved it (the option, else ``RAY_ADDRESS``);
    empty or ``local``: a Ray of the run's own.
    """
    from fedgov.launch.raycluster import parse_ray_address, resolve_ray_address  # lazy: the launchers (fedgov --help)
    from fedgov.launch.simulation import SimulationOptions  # lazy: numpy, Flower's simulation (fedgov --help)

    mode = next((a for a in _APPROVALS if a == approval), None)
    if mode is None and approval is not None:
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
        node_policy=node_policy_pairs(node_policy),
    )
