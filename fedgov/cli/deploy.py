"""``fedgov coordinator ...`` and ``fedgov local-federation ...``: deployment as real processes.

The coordinator is a Flower SuperLink with TLS and SuperNode authentication; only nodes
whose public key it admitted can connect. ``local-federation`` runs a coordinator and N
nodes on this machine, each a process of its own, for trying out and testing deployment.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedgov.cli.node import _guard
from fedgov.launch.processes import ManagedProcess

coordinator_app = typer.Typer(
    help="Run the coordinator: a SuperLink with TLS that admits nodes by their public key.", no_args_is_help=True
)
local_app = typer.Typer(
    help="A coordinator and N nodes as separate processes on this machine (TLS, node keys).", no_args_is_help=True
)

task_app = typer.Typer(help="Run tasks on the real federation of a coordinator.", no_args_is_help=True)

app_app = typer.Typer(help="The app bundle (Flower FAB) that nodes run, and its hash.", no_args_is_help=True)


@app_app.command("hash")
@_guard
def app_hash(
    directory: Annotated[
        Path | None, typer.Argument(help="A Flower app directory (default: this fedgov installation's app)")
    ] = None,
) -> None:
    """Print the SHA-256 of the app bundle built from DIR: what a node's accept.apps lists."""
    from fedgov.deploy.trust import build_bundle, bundle_hash

    fab = build_bundle(directory)
    print(bundle_hash(fab))


CoordDir = Annotated[Path, typer.Option("--coordinator-dir", "-C", help="The coordinator directory")]


@task_app.command("submit")
@_guard
def task_submit(
    task: Annotated[Path, typer.Argument(help="Task file, e.g. configs/tasks/adult-income.toml")],
    coordinator_dir: CoordDir,
    runs_dir: Annotated[Path, typer.Option(help="Where run directories are created")] = Path("runs"),
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds")] = 3600.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON at the end")] = False,
) -> None:
    """Run a task on the coordinator's nodes (run it on the coordinator's host); same report as a simulation."""
    from fedgov.cli.commands import print_summary, run_with_progress
    from fedgov.deploy.submit import submit_task
    from fedgov.reports import load_report

    run_dir = run_with_progress(lambda on_event: submit_task(task, coordinator_dir, runs_dir=runs_dir, on_event=on_event, timeout=timeout))
    report = load_report(run_dir / "report.json")
    print_summary(report, run_dir)
    if json_out:
        print(report.model_dump_json(indent=2))


@task_app.command("resume")
@_guard
def task_resume(
    run_dir: Annotated[Path, typer.Argument(help="The run directory of the interrupted run ('fedgov task list')")],
    coordinator_dir: CoordDir,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds")] = 3600.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON at the end")] = False,
) -> None:
    """Continue an interrupted run (coordinator crash, 'fedgov task stop') from its last checkpoint."""
    from fedgov.cli.commands import print_summary, run_with_progress
    from fedgov.deploy.submit import resume_task
    from fedgov.reports import load_report

    done = run_with_progress(lambda on_event: resume_task(run_dir, coordinator_dir, on_event=on_event, timeout=timeout))
    report = load_report(done / "report.json")
    print_summary(report, done)
    if json_out:
        print(report.model_dump_json(indent=2))


def _runs_table(infos: list) -> Table:  # type: ignore[type-arg]
    table = Table(title="runs at the coordinator")
    for col in ("run id", "status", "task", "rounds", "elapsed", "run directory"):
        table.add_column(col)
    for i in infos:
        rounds = f"{i.rounds_done or 0}/{i.rounds_planned}" if i.rounds_planned else ("-" if i.rounds_done is None else str(i.rounds_done))
        status = i.status + (f" ({i.status_details})" if i.status_details else "")
        table.add_row(str(i.run_id), status, i.task or "-", rounds, f"{i.elapsed_s:.0f} s" if i.elapsed_s is not None else "-", i.run_dir or "-")
    return table


RunsDir = Annotated[Path, typer.Option(help="Where 'fedgov task submit' created run directories")]


@task_app.command("list")
@_guard
def task_list(
    coordinator_dir: CoordDir,
    runs_dir: RunsDir = Path("runs"),
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """List the runs at the coordinator (run it on the coordinator's host), newest first."""
    from fedgov.cli.commands import console
    from fedgov.deploy.tasks import list_runs

    infos = list_runs(coordinator_dir, runs_dir)
    if json_out:
        print(json.dumps([i.model_dump(mode="json") for i in infos], indent=2))
        return
    console.print(_runs_table(infos) if infos else "no runs at this coordinator yet")


@task_app.command("status")
@_guard
def task_status(
    run_id: Annotated[int, typer.Argument(help="The run id ('fedgov task list')")],
    coordinator_dir: CoordDir,
    runs_dir: RunsDir = Path("runs"),
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """One run: Flower's status and timings, and fedgov's rounds, run directory and report."""
    from fedgov.cli.commands import console
    from fedgov.deploy.tasks import run_status

    info = run_status(coordinator_dir, run_id, runs_dir)
    if json_out:
        print(info.model_dump_json(indent=2))
        return
    console.print(_runs_table([info]))
    if info.message:
        console.print(f"report: {info.report_status}: {info.message}")


@task_app.command("stop")
@_guard
def task_stop(
    run_id: Annotated[int, typer.Argument(help="The run id ('fedgov task list')")],
    coordinator_dir: CoordDir,
) -> None:
    """Stop a running task; the nodes' ledgers keep what was spent, and release the rest."""
    from fedgov.cli.commands import console
    from fedgov.deploy.tasks import stop_run

    info = stop_run(coordinator_dir, run_id)
    console.print(f"run {run_id}: {info.status}")


def node_start(
    node_dir: Annotated[Path, typer.Argument(help="The node directory ('fedgov node init')")],
    coordinator: Annotated[str, typer.Option("--coordinator", help="The coordinator's address, host:port")],
    ca: Annotated[Path, typer.Option("--ca", help="The coordinator's CA certificate (ca.crt)")],
    port: Annotated[int, typer.Option(help="Local port of the node's ClientApp API (127.0.0.1 only)")] = 9094,
) -> None:
    """Run the node's SuperNode in the foreground until Ctrl-C (TLS, authenticated with node-key)."""
    from fedgov.cli.commands import console, err_console
    from fedgov.deploy.supernode import check_before_start, start_node
    from fedgov.node.home import NodeHome

    home = NodeHome(node_dir)
    if home.exists():  # the data against the pinned contracts: a policy or contract error stops here
        for warning in check_before_start(home):
            err_console.print(f"[bold yellow]warning:[/] {warning}")
    proc = start_node(node_dir, coordinator, ca, port, check=False)
    console.print(f"SuperNode running for {node_dir} (pid {proc.pid}), coordinator {coordinator}; log: {proc.log_path}. Ctrl-C stops it.")
    _foreground(proc, "SuperNode")


@coordinator_app.command("init")
@_guard
def coordinator_init(
    directory: Annotated[Path, typer.Argument(help="The new coordinator directory")],
    host: Annotated[str, typer.Option(help="Address the nodes connect to (the gateway listens here), e.g. 0.0.0.0")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The gateway's HTTPS port (Fleet API only)")] = 9092,
    superlink_port: Annotated[int | None, typer.Option(help="The SuperLink's own port on 127.0.0.1 (default: port + 1)")] = None,
    san: Annotated[list[str] | None, typer.Option("--san", help="Extra host name or IP for the server certificate")] = None,
) -> None:
    """Create a coordinator directory: development CA and server certificate, coordinator.toml."""
    from fedgov.cli.commands import console
    from fedgov.deploy.superlink import init_coordinator

    cfg = init_coordinator(directory, host=host, port=port, superlink_port=superlink_port, hosts=tuple(san or ()))
    base = directory.resolve()
    console.print(
        f"coordinator directory {base} created: nodes connect to {cfg.host}:{cfg.port} (Fleet API only); "
        f"the SuperLink and its Control API stay on {cfg.control_address}"
    )
    console.print(f"  give the nodes the CA certificate: {cfg.path(base, cfg.ca_cert)}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _foreground(procs: ManagedProcess | list[ManagedProcess], what: str) -> None:
    """Keep a daemon (one or more processes) in the foreground until Ctrl-C or SIGTERM; stop it
    with all it started. If one of its processes exits, the others are stopped too."""
    from fedgov.cli.commands import console

    group = procs if isinstance(procs, list) else [procs]
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while all(p.running() for p in group):
            for p in group:
                p.remember_descendants()
            time.sleep(1.0)
        dead = next(p for p in group if not p.running())
        console.print(f"[red]the {what} ({dead.name}) exited (exit {dead.proc.returncode})[/]:\n{dead.tail()}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print(f"stopping the {what}")
    finally:
        for p in reversed(group):
            p.stop()


@coordinator_app.command("start")
@_guard
def coordinator_start(directory: Annotated[Path, typer.Argument(help="The coordinator directory")]) -> None:
    """Run the SuperLink in the foreground until Ctrl-C."""
    from fedgov.cli.commands import console
    from fedgov.deploy.superlink import load_coordinator, start_coordinator

    _, cfg = load_coordinator(directory)
    coordinator = start_coordinator(directory)
    console.print(
        f"coordinator running: nodes connect to {cfg.host}:{cfg.port} (gateway, Fleet API only, pid "
        f"{coordinator.gateway.pid}); SuperLink on {cfg.control_address} (this host only, pid "
        f"{coordinator.superlink.pid}); logs in {coordinator.superlink.log_path.parent}. Ctrl-C stops it."
    )
    _foreground(coordinator.procs, "coordinator")


@coordinator_app.command("admit")
@_guard
def coordinator_admit(
    pubkey: Annotated[Path, typer.Argument(help="The node's public key (node-key.pub)")],
    name: Annotated[str, typer.Option("--name", help="The node's name, e.g. GM0363")],
    coordinator_dir: CoordDir,
) -> None:
    """Register a node's public key with the running coordinator."""
    from fedgov.cli.commands import console
    from fedgov.deploy.superlink import admit

    res = admit(coordinator_dir, pubkey, name)
    console.print(f"admitted {name}: node id {res.get('node-id')}")


@coordinator_app.command("nodes")
@_guard
def coordinator_nodes(coordinator_dir: CoordDir) -> None:
    """List the nodes the running coordinator knows, with their status."""
    from fedgov.cli.commands import console
    from fedgov.deploy.superlink import nodes

    t = Table()
    for col in ("node id", "status", "created", "online since"):
        t.add_column(col)
    for n in nodes(coordinator_dir):
        t.add_row(str(n.get("node-id")), str(n.get("status")), str(n.get("created-at")), str(n.get("online-at")))
    console.print(t)


@local_app.command("up")
@_guard
def local_up(
    directory: Annotated[Path, typer.Option("--dir", "-d", help="Directory for the coordinator, the nodes and their data")],
    nodes: Annotated[int, typer.Option("--nodes", "-n", help="Number of nodes (the first members of the task's federation)")] = 3,
    task: Annotated[Path | None, typer.Option("--task", help="Task whose federation and contract give the nodes' data (default: the demo task)")] = None,
) -> None:
    """Start a coordinator and N nodes in the background; wait until all nodes are online."""
    from fedgov.cli.commands import console
    from fedgov.deploy.local import local_federation_up

    state = local_federation_up(directory, nodes=nodes, task_path=task)
    console.print(
        f"coordinator on {state['address']} (gateway pid {state['gateway']}, SuperLink pid {state['superlink']} "
        f"on {state['control_address']}), {len(state['nodes'])} node(s) online:"
    )
    for code, n in state["nodes"].items():
        console.print(f"  {code}: pid {n['pid']}, node id {n['node_id']}")
    console.print(f"submit a task: fedgov task submit configs/tasks/adult-income.toml -C {state['coordinator']}")
    console.print(f"stop: fedgov local-federation down --dir {directory}")


@local_app.command("down")
@_guard
def local_down(
    directory: Annotated[Path, typer.Option("--dir", "-d", help="The local federation's directory")],
) -> None:
    """Stop the coordinator and every node of a local federation."""
    from fedgov.cli.commands import console
    from fedgov.deploy.local import local_federation_down

    stopped = local_federation_down(directory)
    console.print(f"stopped {len(stopped)} process(es)")
