"""The ``fedgov`` command line. Entry point: :func:`main`.

Errors fedgov raises on purpose end in a clear message and a documented exit code
(``fedgov exit-codes``), never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedgov.errors import EXIT_HELP, ExitCode, FedgovError

app = typer.Typer(
    name="fedgov",
    help="Privacy-preserving federated learning for municipalities.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Check data files against a data contract.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _add_node_app() -> None:
    from fedgov.cli.node import node_app

    app.add_typer(node_app, name="node")


def _add_roster_app() -> None:
    from fedgov.cli.roster import roster_app

    app.add_typer(roster_app, name="roster")


def _add_deploy_apps() -> None:
    from fedgov.cli.deploy import app_app, coordinator_app, local_app, node_start, task_app
    from fedgov.cli.node import _guard, node_app

    node_app.command("start")(_guard(node_start))

    app.add_typer(coordinator_app, name="coordinator")
    app.add_typer(task_app, name="task")
    app.add_typer(local_app, name="local-federation")
    app.add_typer(app_app, name="app")

# Wide enough for the per-node table also when the output is a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _fail(exc: FedgovError) -> None:
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(int(exc.exit_code))


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def print_summary(report: Any, run_dir: Path) -> None:
    """The terminal summary of a training report."""
    t = Table(title=f"{report.task}: per node (target epsilon {report.privacy.get('target_epsilon')})")
    for col in ("node", "name", "rows (noisy)", "epsilon", "federated acc.", "local-only acc.", "gain", "status"):
        t.add_column(col, justify="right" if col not in ("node", "name", "status") else "left")
    for n in sorted(report.nodes, key=lambda n: -n.train_rows):
        status = n.status if n.status == "accepted" else f"{n.status}: {n.refusal_code or ''} {n.refusal_reason}"
        t.add_row(
            n.node, n.name, str(n.train_rows) if n.train_rows else "-", _fmt(n.epsilon),
            _fmt(n.federated_accuracy) + ("" if n.federated_accuracy_sd is None else f" ± {n.federated_accuracy_sd:.3f}"),
            _fmt(n.local_only_accuracy),
            "-" if n.gain is None else f"{100 * n.gain:+.1f} pt", status,
        )
    console.print(t)
    if report.final is not None:
        console.print(
            f"Global model on the held-out test set ({report.final.n} rows): accuracy [bold]{report.final.accuracy:.4f}[/], "
            f"AUC {_fmt(report.final.auc, '.4f')}, loss {report.final.loss:.4f}; majority class {_fmt(report.majority_rate, '.4f')}"
        )
    gain = report.median_gain()
    if report.privacy.get("mode") == "distributed":
        console.print(
            f"Distributed DP: epsilon {_fmt(report.max_epsilon(), '.3f')} per municipality at most (delta "
            f"{report.privacy.get('delta')}), and so for every citizen in it; noise multiplier of the sum "
            f"{_fmt(report.privacy.get('noise_multiplier'), '.2f')}, update clip {report.privacy.get('update_clip')}"
        )
    console.print(
        f"Largest planned epsilon of a node: {_fmt(report.max_epsilon(), '.3f')}; median gain from federating: "
        f"{'-' if gain is None else f'{100 * gain:+.1f} points'}; wall time {_fmt(report.wall_seconds, '.0f')} s"
    )
    eval_eps = report.privacy.get("evaluation_epsilon")
    if any(n.federated_accuracy is not None for n in report.nodes) and eval_eps:
        console.print(
            f"[dim]Each node's own test accuracy is a DP release (noisy correct and total counts, epsilon {eval_eps} of the "
            "task's): a small node's figure, and so its gain, can be far off; rows are noisy counts too.[/]"
        )
    shown = [f"{label}: {run_dir / name}" for label, name in (("Report", "report.json"), ("Plot", "accuracy.png"), ("Model", "model.pt")) if (run_dir / name).is_file()]
    console.print("   ".join(shown))


def run_with_progress(call: Callable[[Callable[[dict[str, Any]], None]], Path]) -> Path:
    """Run ``call(on_event)`` showing its progress events; on failure print what the report says."""
    from fedgov.reports import load_report

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"), console=console, transient=False,
    ) as progress:
        bar = progress.add_task("preparing", total=None, info="")

        def on_event(ev: dict[str, Any]) -> None:
            kind = ev.get("event")
            if kind == "run-dir":
                progress.console.print(f"Run directory: {ev['path']}")
            elif kind == "partitioned":
                progress.update(bar, description="starting Flower", info=f"{len(ev['nodes'])} nodes")
            elif kind == "admission":
                refused = ev.get("refused") or {}
                progress.console.print(f"{len(ev['accepted'])} node(s) accepted the task, {len(refused)} refused")
                for node, why in refused.items():
                    progress.console.print(f"  [yellow]refused[/] {node}: {why}")
            elif kind == "resumed":
                progress.console.print(f"Resuming after round {ev['round']} of {ev['rounds']} (ledger key run {ev.get('task_run')})")
            elif kind == "training-start":
                first = int(ev.get("first_round", 1))
                progress.update(bar, description="training", total=int(ev["rounds"]), completed=first - 1, info="")
            elif kind == "round" and ev.get("round", 0) > 0:
                info = f"acc {_fmt(ev.get('accuracy'))}  max eps {_fmt(ev.get('max_epsilon'))}"
                progress.update(bar, completed=ev["round"], info=info)
                progress.console.print(
                    f"round {ev['round']:>3}: accuracy {_fmt(ev.get('accuracy'), '.4f')}  AUC {_fmt(ev.get('auc'), '.4f')}  "
                    f"nodes' own test acc. {_fmt(ev.get('federated_accuracy'), '.4f')}  max epsilon {_fmt(ev.get('max_epsilon'))}  "
                    f"({len(ev.get('nodes_trained', []))} nodes, {_fmt(ev.get('seconds'), '.1f')} s)"
                )
            elif kind == "rejected":
                for node, why in (ev.get("nodes") or {}).items():
                    progress.console.print(f"  [yellow]round {ev.get('round')}: update of {node} left out[/]: {why}")
            elif kind == "warning":
                progress.console.print(f"[bold yellow]warning:[/] {ev.get('message')}")
            elif kind == "failed":
                progress.console.print(f"[red]run failed:[/] {ev.get('message')}")
            elif kind == "nodes-connected":
                progress.update(bar, description="waiting for answers", info=f"{ev['count']} nodes")
            elif kind == "answers":
                refused = ev.get("refused") or {}
                progress.console.print(f"{len(ev['accepted'])} node(s) answered the query, {len(refused)} refused")
                for node, why in list(refused.items())[:20]:
                    progress.console.print(f"  [yellow]refused[/] {node}: {why}")
            elif kind == "baselines":
                progress.update(bar, description="local-only baselines at the nodes", info=f"{ev['nodes']} nodes")
            elif kind == "done":
                progress.update(bar, description="done", info="")

        try:
            return call(on_event)
        except FedgovError as exc:
            progress.stop()
            failed_dir = getattr(exc, "run_dir", None)
            if failed_dir is not None and (failed_dir / "report.json").is_file():
                print_summary(load_report(failed_dir / "report.json"), failed_dir)
            elif failed_dir is not None and (failed_dir / "query.json").is_file():
                from fedgov.analytics import load_query_report

                print_query_summary(load_query_report(failed_dir / "query.json"), failed_dir)
            _fail(exc)
            raise  # unreachable: _fail exits


RunsDir = Annotated[Path, typer.Option(help="Where run directories are created")]
Cpus = Annotated[int | None, typer.Option(help="CPUs for the simulation engine (default: all)")]
StateDir = Annotated[Path | None, typer.Option(help="Keep the simulated nodes' directories (policy, ledger, audit log) here, between runs")]
NodeBudget = Annotated[float, typer.Option(help="Total epsilon per data set in a new simulated node's policy")]
Approval = Annotated[str, typer.Option(help="Approval mode in a new simulated node's policy: auto, manual or deny")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the report as JSON at the end")]


def _simulation_options(**kw: Any) -> Any:
    """Simulation options from the shared command-line options; exit 2 on a bad approval mode."""
    from fedgov.launch.simulation import SimulationOptions

    if kw["approval"] not in ("auto", "manual", "deny"):
        err_console.print(f"[bold red]error:[/] --approval must be auto, manual or deny, not {kw['approval']!r}")
        raise typer.Exit(int(ExitCode.USAGE))
    return SimulationOptions(**kw)


@app.command()
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
    json_out: JsonOut = False,
) -> None:
    """Run a training task on a simulated federation (Flower simulation engine).

    The coordinator saves a checkpoint after every round; after a crash, ``fedgov run --resume
    RUN_DIR`` runs the remaining rounds, and no node's ledger is charged twice.
    """
    from fedgov.reports import load_report
    from fedgov.launch.simulation import resume_simulation, run_simulation

    if (task is None) == (resume is None):
        err_console.print("[bold red]error:[/] give a task file, or --resume RUN_DIR (not both)")
        raise typer.Exit(int(ExitCode.USAGE))
    opts = _simulation_options(
        runs_dir=runs_dir, num_cpus=cpus, local_baseline=not no_baseline,
        state_dir=state_dir, node_budget=node_budget, approval=approval,
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


def print_query_summary(report: Any, run_dir: Path, *, max_rows: int = 40) -> None:
    """The national figures of a query, with their 95% intervals (and true values in simulation)."""
    from rich.table import Table

    acc, ref = report.accepted(), report.refused()
    console.print(
        f"[bold]{report.query}[/] ({report.mode}): {report.status}; {len(acc)} node(s) answered, {len(ref)} refused; "
        f"epsilon {report.epsilon:g} per node ({report.mechanism}, at most {report.max_rows_per_person} row(s) per person)"
    )
    for n in ref[:20]:
        console.print(f"  [yellow]refused[/] {n.node}: {n.code}: {n.reason}")
    if len(ref) > 20:
        console.print(f"  ... and {len(ref) - 20} more (query.json)")
    if report.message:
        console.print(f"  {report.message}")
    if report.result is None:
        return
    truth = {f.key: f for f in report.truth.figures} if report.truth else {}
    table = Table(title="national figures (95% interval)" + ("; true value from the simulated data" if truth else ""))
    for col in ("measure", "cell", "estimate", "95% interval") + (("true", "error") if truth else ()):
        table.add_column(col, justify="right" if col not in ("measure", "cell") else "left")
    shown = 0
    for f in report.result.figures:
        if f.scope != "national":
            continue
        shown += 1
        if shown > max_rows:
            continue
        est = "suppressed" if f.estimate is None else f"{f.estimate:,.4g}" + (" (incomplete)" if f.incomplete else "")
        ci = "" if f.ci_low is None or f.ci_high is None else f"{f.ci_low:,.4g} .. {f.ci_high:,.4g}"
        row = [f.measure, f.cell or "-", est, ci]
        if truth:
            t = truth.get(f.key)
            tv = None if t is None else t.estimate
            err = "" if tv is None or f.estimate is None else (f"{(f.estimate - tv) / tv:+.2%}" if tv else f"{f.estimate - tv:+.3g}")
            row += ["" if tv is None else f"{tv:,.4g}", err]
        table.add_row(*row)
    console.print(table)
    if shown > max_rows:
        console.print(f"... {shown - max_rows} more national figures, and all regional and per-node ones, in {run_dir / 'query.csv'}")
    console.print(f"report: {run_dir / 'query.json'}, table: {run_dir / 'query.csv'}, chart: {run_dir / 'query.png'}")


@app.command()
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
    node_budget: NodeBudget = 10.0,
    approval: Approval = "auto",
    json_out: JsonOut = False,
) -> None:
    """Answer a statistics query across the federation with differential privacy (simulation, or -C for deployment)."""
    from fedgov.analytics import load_query_report
    from fedgov.launch.query import run_query_simulation, submit_query

    opts = _simulation_options(runs_dir=runs_dir, num_cpus=cpus, state_dir=state_dir, node_budget=node_budget, approval=approval)
    if coordinator_dir is not None:
        run_dir = run_with_progress(
            lambda on_event: submit_query(query_file, coordinator_dir, runs_dir=runs_dir, expected_nodes=expected_nodes,
                                          node_wait=node_wait, on_event=on_event)
        )
    else:
        run_dir = run_with_progress(lambda on_event: run_query_simulation(query_file, federation, opts, on_event))
    report = load_query_report(run_dir / "query.json")
    print_query_summary(report, run_dir)
    if json_out:
        print(report.model_dump_json(indent=2))


@app.command()
def check(
    files: Annotated[list[Path], typer.Argument(help="Task, federation, contract, query or node policy files")],
) -> None:
    """Validate configuration files; every problem is listed with its file and field."""
    from fedgov.config import load_contract, load_federation, load_task
    from fedgov.config._base import load_toml

    worst: FedgovError | None = None
    for f in files:
        try:
            raw = load_toml(f)
            if "columns" in raw:
                c = load_contract(f)
                console.print(f"[green]ok[/] {f}: contract {c.ref} ({len(c.columns)} columns)")
            elif "datasets" in raw:
                from fedgov.node.policy import load_policy

                pol = load_policy(f)
                console.print(f"[green]ok[/] {f}: policy of node {pol.node} ({len(pol.datasets)} data set(s), approval {pol.approval})")
            elif "members" in raw:
                fed = load_federation(f)
                console.print(f"[green]ok[/] {f}: federation {fed.name} ({len(fed.members)} members)")
            elif "measures" in raw:
                from fedgov.analytics import load_query

                q, c = load_query(f)
                console.print(f"[green]ok[/] {f}: query {q.name} on {c.ref} ({len(q.measures)} measures, epsilon {q.privacy.epsilon:g} per node)")
            else:
                t, c = load_task(f)
                console.print(f"[green]ok[/] {f}: task {t.name} on {c.ref}")
        except FedgovError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            worst = worst or exc
    if worst is not None:
        raise typer.Exit(int(worst.exit_code))


@data_app.command("validate")
def data_validate(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet file")],
    contract: Annotated[Path, typer.Option("--contract", "-c", help="Contract file")],
) -> None:
    """Check a data file against a contract; every violation is listed (row, column, found, expected)."""
    from fedgov.config import load_contract
    from fedgov.data import read_table, validate_frame

    try:
        c = load_contract(contract)
        frame = validate_frame(read_table(file), c, file=str(file))
    except FedgovError as exc:
        _fail(exc)
        return
    console.print(f"[green]ok[/] {file}: {len(frame)} rows conform to {c.ref}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/<timestamp>-<task>)")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Show the summary of a finished run."""
    from fedgov.reports import load_report

    path = run_dir / "report.json"
    if not path.is_file():
        err_console.print(f"[bold red]error:[/] no report.json in {run_dir}")
        raise typer.Exit(int(ExitCode.USAGE))
    r = load_report(path)
    if json_out:
        print(r.model_dump_json(indent=2))
    else:
        print_summary(r, run_dir)


@app.command("exit-codes")
def exit_codes() -> None:
    """List the exit codes of fedgov's commands."""
    t = Table(title="fedgov exit codes")
    t.add_column("code", justify="right")
    t.add_column("name")
    t.add_column("meaning")
    for code in ExitCode:
        t.add_row(str(int(code)), code.name, EXIT_HELP[code])
    console.print(t)


@app.command()
def version() -> None:
    """Print fedgov's version and that of its main dependencies."""
    import importlib.metadata as md

    import fedgov

    parts = {"fedgov": fedgov.__version__}
    for pkg in ("flwr", "opacus", "torch", "pydantic"):
        try:
            parts[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            parts[pkg] = "not installed"
    console.print(json.dumps(parts))


_add_node_app()
_add_roster_app()
_add_deploy_apps()


def main() -> None:
    """Console entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted; managed processes were stopped")
        sys.exit(int(ExitCode.INTERRUPTED))


if __name__ == "__main__":  # pragma: no cover
    main()
