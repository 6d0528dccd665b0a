"""``fedgov run|check|report|exit-codes|version`` and ``fedgov data validate``: training in a
simulated federation, and the files around a run (configuration, data, report)."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

import fedgov
from fedgov.cli.console import console, new_typer, print_error, usage_error
from fedgov.cli.daemon import ConsoleHost, ConsolePort, PasswordFile, TlsCert, TlsDev, TlsKey, serve_console
from fedgov.cli.options import (
    Approval, Cpus, JsonOut, NodeBudget, NodePolicyOption, RayAddress, RunsDir, StateDir, simulation_options,
)
from fedgov.cli.summary import exit_if_not_learned, print_query_summary, print_summary, run_with_progress
from fedgov.config import load_contract, load_federation, load_task
from fedgov.config._base import load_toml
from fedgov.errors import EXIT_HELP, ExitCode, FederationError, FedgovError

__all__ = ["check", "data_app", "data_validate", "exit_codes", "report", "run", "runs_console", "version"]

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
    node_budget: NodeBudget = None,
    approval: Approval = None,
    node_policy: NodePolicyOption = None,
    ray_address: RayAddress = None,
    json_out: JsonOut = False,
) -> None:
    """Run a training task on a simulated federation (Flower simulation engine).

    The coordinator saves a checkpoint after every round; after a crash, ``fedgov run --resume
    RUN_DIR`` runs the remaining rounds, and no node's ledger is charged twice. With
    ``--ray-address HOST:PORT`` the simulation runs on that Ray cluster. The simulated nodes'
    policies: the federation file's node_policy table, over it ``--node-policy KEY=VALUE``.
    """
    from fedgov.launch.simulation import resume_simulation, run_simulation  # lazy: numpy, Flower (fedgov --help)
    from fedgov.reports import load_report  # lazy: pydantic models (fedgov --help)

    if (task is None) == (resume is None):
        usage_error("give a task file, or --resume RUN_DIR (not both)")
    if resume is not None and (node_policy or node_budget is not None or approval is not None):
        usage_error("a resumed run keeps its nodes' policies: --node-policy, --node-budget and --approval are for a new run")
    opts = simulation_options(
        runs_dir=runs_dir, num_cpus=cpus, local_baseline=not no_baseline,
        state_dir=state_dir, node_budget=node_budget, approval=approval, ray_address=ray_address,
        node_policy=node_policy,
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
                from fedgov.node.policy import MIN_ROWS_LOCAL, load_policy  # lazy: pydantic models (fedgov --help)

                pol = load_policy(f)
                console.print(f"[green]ok[/] {f}: policy of node {pol.node} ({len(pol.datasets)} data set(s), approval {pol.approval})")

                if pol.limits.min_rows < MIN_ROWS_LOCAL:
                    console.print(
                        f"[bold]notice:[/] {escape(str(f))}: limits.min_rows = {pol.limits.min_rows} counts as {MIN_ROWS_LOCAL} for "
                        f"training with local DP-SGD (its floor); statistics queries use {pol.limits.min_rows}", soft_wrap=True,
                    )
            elif "members" in raw:
                fed = load_federation(f)
                of = "" if fed.registry is None else f" of registry {fed.registry}"
                given = fed.node_policy.given()
                policy = f"; simulated nodes' policy: {', '.join(f'{k}={v}' for k, v in given.items())}" if given else ""
                console.print(f"[green]ok[/] {f}: federation {fed.name} ({len(fed.members)} members{escape(of)}){escape(policy)}")
            elif "measures" in raw:
                from fedgov.analytics import load_query  # lazy: pandas, numpy (fedgov --help)

                q, c = load_query(f)
                console.print(f"[green]ok[/] {f}: query {q.name} on {c.ref} ({len(q.measures)} measures, epsilon {q.privacy.epsilon:g} per node)")
            else:
                t, c = load_task(f)
                console.print(f"[green]ok[/] {f}: task {t.name} on {c.ref}")
                if t.evaluation.centralized is None:
                    console.print(f"[bold]notice:[/] {escape(str(f))}: {escape(_global_figure(t))}", soft_wrap=True)
        except FedgovError as exc:  # every file is checked; the first error's code is the exit code
            print_error(str(exc))
            worst = worst or exc
    if worst is not None:
        raise typer.Exit(int(worst.exit_code))


def _global_figure(task: Any) -> str:
    """Which global figure a task without a central test set will report."""
    p = task.privacy
    evals = task.evaluation.node_evaluations(task.training.rounds, enabled=p.mode == "local") if p.enabled else task.training.rounds
    if evals:
        return (
            "no central test set ([evaluation] centralized): the global accuracy shown will be pooled over the nodes' own "
            "test splits (the sum of the correct and total counts they release, with DP, in their evaluation: no extra budget)"
        )
    return (
        "no central test set ([evaluation] centralized) and no evaluation at the nodes (evaluation.at_nodes, "
        "evaluation.epsilon, privacy.mode): a simulation shows the final model on the members' pooled test splits "
        "(exact, read by the simulation from the table it split); a deployed run shows no global figure"
    )


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


@data_app.command("draft")
def data_draft(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet file: one row per record, a column naming each row's organisation")],
    target: Annotated[str, typer.Option("--target", "-t", help="The column to predict")],
    organisation: Annotated[str, typer.Option("--organisation", "-o", help="The column naming each row's organisation")],
    name: Annotated[str | None, typer.Option("--name", "-n", help="Name of the drafted contract, federation and task (default: the file's stem)")] = None,
    person_id: Annotated[str | None, typer.Option("--person-id", help="A column identifying the person a row belongs to")] = None,
    drop: Annotated[list[str] | None, typer.Option("--drop", help="A column to leave out of the contract (repeatable)")] = None,
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where to write contracts/, registries/, federations/, tasks/, queries/")] = Path("configs"),
    epsilon: Annotated[float, typer.Option("--epsilon", help="The task's epsilon per node")] = 2.0,
    central_test: Annotated[float, typer.Option(
        "--central-test", min=0.0, max=0.5,
        help="Share of the rows held out as the coordinator's test set (data/NAME-central-test.csv; the rest: "
        "data/NAME-nodes.csv); 0: none, the summary then shows the nodes' pooled figure",
    )] = 0.1,
    force: Annotated[bool, typer.Option("--force", help="Overwrite drafted files that exist")] = False,
) -> None:
    """Draft a contract, an organisation registry, a federation, a task and a query for a new table.

    Every numeric bound is read off the table and rounded outward, and says so: replace it by a
    bound known without the data before a real federation uses the contract.
    """


    from fedgov.data import read_table  # lazy: pandas (fedgov --help)
    from fedgov.data.draft import DraftError, draft  # lazy: pandas (fedgov --help)

    stem = name or re.sub(r"[^a-z0-9_-]+", "-", file.name.split(".")[0].lower()).strip("-_") or "dataset"
    df = read_table(file)
    source = os.path.relpath(file.resolve(), out_dir.resolve()).replace(os.sep, "/")
    held: dict[str, Any] = {}
    if central_test > 0:  # a seeded split: the nodes' rows and the coordinator's held-out test set
        import numpy as np  # lazy: numpy (fedgov --help)

        test = np.random.default_rng(0).random(len(df)) < central_test
        source = f"data/{stem}-nodes.csv"
        held = {source: df[~test], f"data/{stem}-central-test.csv": df[test]}
    try:
        result = draft(df[~test] if held else df, name=stem, source=source, target=target, organisation=organisation,
                       person_id=person_id, drop=tuple(drop or ()), epsilon=epsilon,
                       central=f"data/{stem}-central-test.csv" if held else None)
    except DraftError as exc:
        usage_error(f"{file}: {exc}")
    existing = [out_dir / rel for rel in [*result.files, *held] if (out_dir / rel).exists()]
    if existing and not force:
        usage_error("would overwrite " + ", ".join(map(str, existing)) + " (--force to overwrite)")
    for rel, text in result.files.items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        console.print(f"[green]wrote[/] {escape(str(path))}")
    for rel, part in held.items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # the central test set holds the contract's columns only (no organisation, nothing dropped)
        cols = [c for c in part.columns if c not in (organisation, *(drop or ()))] if rel.endswith("central-test.csv") else list(part.columns)
        part[cols].to_csv(path, index=False)
        console.print(f"[green]wrote[/] {escape(str(path))} ({len(part)} rows)")
    for note in result.notes:
        console.print(f"  {escape(note)}", soft_wrap=True)
    console.print(
        f"Next: read {escape(str(out_dir / 'contracts' / (stem + '.toml')))} (every min/max is a placeholder read off the data), then\n"
        f"  fedgov check {escape(str(out_dir / 'tasks' / (stem + '.toml')))}\n"
        f"  fedgov run {escape(str(out_dir / 'tasks' / (stem + '.toml')))}\n"
        f"  fedgov query {escape(str(out_dir / 'queries' / (stem + '.toml')))}",
        soft_wrap=True,
    )


def report(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory (runs/<timestamp>-<task or query>), or its report.json or query.json")
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Show the summary of a run: a training run (report.json) or a statistics query (query.json).

    Exits non-zero (20, as the run itself did) when the run failed or never finished.
    """
    from fedgov.reports import load_report  # lazy: pydantic models (fedgov --help)

    if run_dir.is_file():
        path = run_dir
    else:
        found = [run_dir / name for name in ("report.json", "query.json") if (run_dir / name).is_file()]
        if not found:
            usage_error(f"no report.json (training run) or query.json (query) in {run_dir}")
        path = found[0]
    # a damaged file: ReportError, a message and exit 10
    if path.name == "query.json":
        from fedgov.analytics import load_query_report  # lazy: pandas, numpy (fedgov --help)

        q = load_query_report(path)
        status, message = q.status, q.message
        if json_out:
            print(q.model_dump_json(indent=2))
        else:
            print_query_summary(q, path.parent)
    else:
        r = load_report(path)
        status, message = r.status, r.message
        if json_out:
            print(r.model_dump_json(indent=2))
        else:
            print_summary(r, path.parent)
    if status == "failed":
        raise FederationError(f"the run failed: {message or 'no reason recorded'} (report: {path})")
    if status != "completed":
        raise FederationError(
            f"the run has not finished: its report says '{status}' (still running, or stopped before it could end; report: {path})"
        )
    if path.name != "query.json":
        exit_if_not_learned(r)  # a completed run whose model does not beat guessing: 21, as the run itself ended


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


def runs_console(
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="The run directories of 'fedgov run' and 'fedgov query'")] = Path("runs"),
    host: ConsoleHost = "127.0.0.1",
    port: ConsolePort = 8766,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_dev: TlsDev = None,
    password_file: PasswordFile = None,
) -> None:
    """A web console of simulation runs until Ctrl-C: accuracy per round, per-node results,
    participation, query figures with their error bars. Prints a login token."""
    from fedgov.console.coordinator import coordinator_console  # lazy: Starlette, Jinja2 (fedgov --help)

    if not runs_dir.is_dir():
        usage_error(f"{runs_dir} is not a directory (--runs-dir: where 'fedgov run' and 'fedgov query' write runs)")
    serve_console(
        lambda guard, hosts: coordinator_console(runs_dir, guard, allowed_hosts=hosts), what=f"runs console of {runs_dir.resolve()}",
        host=host, port=port, tls_cert=tls_cert, tls_key=tls_key, tls_dev=tls_dev, password_file=password_file,
    )
