"""``fedgov query``: a statistics query across the federation, with differential privacy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedgov.cli.console import usage_error
from fedgov.cli.options import (
    Approval, Cpus, JsonOut, NodeBudget, NodePolicyOption, RayAddress, RunsDir, StateDir, from_command_line, simulation_options,
)
from fedgov.cli.summary import print_query_summary, run_with_progress

__all__ = ["query"]


def query(
    query_file: Annotated[Path, typer.Argument(help="Query file, e.g. configs/queries/wmo-monitor.toml")],
    federation: Annotated[Path | None, typer.Option("--federation", "-f", help="Simulated federation (default: the query's)")] = None,
    coordinator_dir: Annotated[
        Path | None, typer.Option("--coordinator-dir", "-C", help="Ask the real nodes of this coordinator instead of a simulation")
    ] = None,
    expected_nodes: Annotated[int, typer.Option(help="Deployment: wait for this many nodes (at most --node-wait s)")] = 1,
    node_wait: Annotated[float, typer.Option(help="Deployment: seconds to wait for the expected nodes")] = 120.0,
    runs_dir: RunsDir = Path("runs"),
    cpus: Cpus = None,
    state_dir: StateDir = None,
    node_budget: NodeBudget = None,
    approval: Approval = None,
    node_policy: NodePolicyOption = None,
    ray_address: RayAddress = None,
    json_out: JsonOut = False,
) -> None:
    """Answer a statistics query across the federation with differential privacy (simulation, or -C for deployment)."""
    from fedgov.analytics import load_query_report  # lazy: pandas, numpy (fedgov --help)
    from fedgov.deploy.submit import submit_query  # lazy: pandas, numpy, Flower (fedgov --help)
    from fedgov.launch.query import run_query_simulation  # lazy: pandas, numpy, Flower (fedgov --help)

    if coordinator_dir is not None:
        if ray_address and from_command_line("ray_address"):
            usage_error("--ray-address runs a simulation on a Ray cluster; with --coordinator-dir the query goes to real nodes")
        ray_address = ""  # a RAY_ADDRESS in the environment is for simulations
        if node_policy or node_budget is not None or approval is not None:
            usage_error("--node-policy, --node-budget and --approval set simulated nodes' policies; a real node's policy "
                        "is its operator's own (fedgov node init, its policy.toml)")
    opts = simulation_options(
        runs_dir=runs_dir, num_cpus=cpus, state_dir=state_dir, node_budget=node_budget, approval=approval,
        ray_address=ray_address, node_policy=node_policy,
    )
    if coordinator_dir is not None:
        coordinator = coordinator_dir
        run_dir = run_with_progress(
            lambda on_event: submit_query(query_file, coordinator, runs_dir=runs_dir, expected_nodes=expected_nodes,
                                          node_wait=node_wait, on_event=on_event)
        )
    else:
        run_dir = run_with_progress(lambda on_event: run_query_simulation(query_file, federation, opts, on_event))
    report = load_query_report(run_dir / "query.json")
    print_query_summary(report, run_dir)
    if json_out:
        print(report.model_dump_json(indent=2))
