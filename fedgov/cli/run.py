"""``fedgov run|check|report|exit-codes|version`` and ``fedgov data validate``: training in a
simulated federation, and the files around a run (configuration, data, report)."""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

import fedgov
from fedgov.cli.console import console, new_typer, print_error, usage_error
from fedgov.cli.options import Approval, Cpus, JsonOut, NodeBudget, RayAddress, RunsDir, StateDir, simulation_options
from fedgov.cli.summary import exit_if_not_learned, print_summary, run_with_progress
from fedgov.config import load_contract, load_federation, load_task
from fedgov.config._base import load_toml
from fedgov.errors import EXIT_HELP, ExitCode, FedgovError

__all__ = ["check", "data_app", "data_validate", "exit_codes", "report", "run", "version"]

data_app = new_typer("Check data files against a data contract.")


def run(
    task: Annotated[Path | None, typer.Argument(help="Task file, e.g. configs/tasks/adult-income.toml")] = None,
    federation: Annotated[Path | None, typer.Option("--federation", "-f", help="Federation file (default: the task's)")] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the run in this run directory from its last checkpoint (after a crash)")
    ] = None,
    runs_dir: RunsDir = Path("runs"),
    cpus: Cpus = None,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="Skip the local-only baselines")] = False,
    state_dir: StateDir = None,
    node_budget: NodeBudget = 10.0,
    approval: Approval = "auto",
    ray_address: RayAddress = None,
    json_out: JsonOut = False,
) -> None:
    """Run a training task on a simulated federation (Flower simulation engine).

    The coordinator saves a checkpoint after every round; after a crash, ``fedgov run --resume
    RUN_DIR`` runs the remaining rounds, and no node's ledger is charged twice. With
    ``--ray-address HOST:PORT`` the simulation runs on that Ray cluster.
    """
    from fedgov.launch.simulation import resume_simulation, run_simulation  # lazy: numpy, Flower (fedgov --help)
    from fedgov.reports import load_report  # lazy: pydantic models (fedgov --help)

    if (task is None) == (resume is None):
        usage_error("give a task file, or --resume RUN_DIR (not both)")
    opts = simulation_options(
        runs_dir=runs_dir, num_cpus=cpus, local_baseline=not no_baseline,
        state_dir=state_dir, node_budget=node_budget, approval=approval, ray_address=ray_address,
    )
    if resume is not None:
        resume_dir = resume
        run_dir = run_with_progress(lambda on_event: resume_simulation(resume_dir, opts, on_event))
    else:
        assert task is not None
        task_file = task
        run_dir = run_with_progress(lambda on_event: run_simulation(task_file, federation, opts, on_event))
    report = load_report(run_dir / "report.json")
    print_summary(report, run_dir)
    if json_out:
        print(report.model_dump_json(indent=2))
    exit_if_not_learned(report)


def check(
    files: Annotated[list[Path], typer.Argument(help="Task, federation, contract, query or node policy files")],
) -> None:
    """Validate configuration files; every problem is listed with its file and field."""
    worst: FedgovError | None = None
    for f in files:
        try:
            raw = load_toml(f)
            if "columns" in raw:
                c = load_contract(f)
                console.print(f"[green]ok[/] {f}: contract {c.ref} ({len(c.columns)} columns)")
            elif "datasets" in raw:
                from fedgov.node.policy import load_policy  # lazy: pydantic models (fedgov --help)

                pol = load_policy(f)
                console.print(f"[green]ok[/] {f}: policy of node {pol.node} ({len(pol.datasets)} data set(s), approval {pol.approval})")
            elif "members" in raw:
                fed = load_federation(f)
                console.print(f"[green]ok[/] {f}: federation {fed.name} ({len(fed.members)} members)")
            elif "measures" in raw:
                from fedgov.analytics import load_query  # lazy: pandas, numpy (fedgov --help)

                q, c = load_query(f)
                console.print(f"[green]ok[/] {f}: query {q.name} on {c.ref} ({len(q.measures)} measures, epsilon {q.privacy.epsilon:g} per node)")
            else:
                t, c = load_task(f)
                console.print(f"[green]ok[/] {f}: task {t.name} on {c.ref}")
        except FedgovError as exc:  # every file is checked; the first error's code is the exit code
            print_error(str(exc))
            worst = worst or exc
    if worst is not None:
        raise typer.Exit(int(worst.exit_code))


@data_app.command("validate")
def data_validate(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet file")],
    contract: Annotated[Path, typer.Option("--contract", "-c", help="Contract file")],
) -> None:
    """Check a data file against a contract; every violation is listed (row, column, found, expected)."""
    from fedgov.data import read_table, validate_frame  # lazy: pandas (fedgov --help)

    c = load_contract(contract)
    frame = validate_frame(read_table(file), c, file=str(file))
    console.print(f"[green]ok[/] {file}: {len(frame)} rows conform to {c.ref}")


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/<timestamp>-<task>), or its report.json")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Show the summary of a finished run."""
    from fedgov.reports import load_report  # lazy: pydantic models (fedgov --help)

    path = run_dir if run_dir.is_file() else run_dir / "report.json"
    if not path.is_file():
        usage_error(f"no report.json in {run_dir}")
    r = load_report(path)  # a damaged file: ReportError, a message and exit 10
    if json_out:
        print(r.model_dump_json(indent=2))
    else:
        print_summary(r, path.parent)


def exit_codes() -> None:
    """List the exit codes of fedgov's commands."""
    t = Table(title="fedgov exit codes")
    t.add_column("code", justify="right")
    t.add_column("name")
    t.add_column("meaning")
    for code in ExitCode:
        t.add_row(str(int(code)), code.name, EXIT_HELP[code])
    console.print(t)


def version() -> None:
    """Print fedgov's version and that of its main dependencies."""
    parts = {"fedgov": fedgov.__version__}
    for pkg in ("flwr", "opacus", "torch", "pydantic"):
        try:
            parts[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            parts[pkg] = "not installed"
    console.print(json.dumps(parts))
