"""``fedgov coordinator ...`` and ``fedgov local-federation ...``: deployment as real processes.

The coordinator is a Flower SuperLink with TLS and SuperNode authentication; only nodes
whose public key it admitted can connect. ``local-federation`` runs a coordinator and N
nodes on this machine, each a process of its own, for trying out and testing deployment.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedgov.cli_node import _guard
from fedgov.runtime import ManagedProcess

coordinator_app = typer.Typer(
    help="Run the coordinator: a SuperLink with TLS that admits nodes by their public key.", no_args_is_help=True
)
local_app = typer.Typer(
    help="A coordinator and N nodes as separate processes on this machine (TLS, node keys).", no_args_is_help=True
)

task_app = typer.Typer(help="Run tasks on the real federation of a coordinator.", no_args_is_help=True)

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
    from fedgov.cli import print_summary, run_with_progress
    from fedgov.deploy.submit import submit_task
    from fedgov.reports import load_report

    run_dir = run_with_progress(lambda on_event: submit_task(task, coordinator_dir, runs_dir=runs_dir, on_event=on_event, timeout=timeout))
    report = load_report(run_dir / "report.json")
    print_summary(report, run_dir)
    if json_out:
        print(report.model_dump_json(indent=2))


def node_start(
    node_dir: Annotated[Path, typer.Argument(help="The node directory ('fedgov node init')")],
    coordinator: Annotated[str, typer.Option("--coordinator", help="The coordinator's address, host:port")],
    ca: Annotated[Path, typer.Option("--ca", help="The coordinator's CA certificate (ca.crt)")],
    port: Annotated[int, typer.Option(help="Local port of the node's ClientApp API (127.0.0.1 only)")] = 9094,
) -> None:
    """Run the node's SuperNode in the foreground until Ctrl-C (TLS, authenticated with node-key)."""
    from fedgov.cli import console
    from fedgov.deploy.node import start_node

    proc = start_node(node_dir, coordinator, ca, port)
    console.print(f"SuperNode running for {node_dir} (pid {proc.pid}), coordinator {coordinator}; log: {proc.log_path}. Ctrl-C stops it.")
    _foreground(proc, "SuperNode")


@coordinator_app.command("init")
@_guard
def coordinator_init(
    directory: Annotated[Path, typer.Argument(help="The new coordinator directory")],
    host: Annotated[str, typer.Option(help="Address the SuperLink listens on (Fleet AND Control API: keep it private)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The SuperLink's HTTPS port")] = 9092,
    san: Annotated[list[str] | None, typer.Option("--san", help="Extra host name or IP for the server certificate")] = None,
) -> None:
    """Create a coordinator directory: development CA and server certificate, coordinator.toml."""
    from fedgov.cli import console
    from fedgov.deploy.coordinator import init_coordinator

    cfg = init_coordinator(directory, host=host, port=port, hosts=tuple(san or ()))
    base = directory.resolve()
    console.print(f"coordinator directory {base} created (SuperLink on {cfg.host}:{cfg.port})")
    console.print(f"  give the nodes the CA certificate: {cfg.path(base, cfg.ca_cert)}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(
            "[yellow]warning:[/] the Control API shares this port and has no authentication in "
            "open-source Flower: whoever reaches it can submit runs."
        )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _foreground(proc: ManagedProcess, what: str) -> None:
    """Keep a daemon in the foreground until Ctrl-C or SIGTERM; stop it with all it started."""
    from fedgov.cli import console

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while proc.running():
            proc.remember_descendants()
            time.sleep(1.0)
        console.print(f"[red]the {what} exited (exit {proc.proc.returncode})[/]:\n{proc.tail()}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print(f"stopping the {what}")
    finally:
        proc.stop()


@coordinator_app.command("start")
@_guard
def coordinator_start(directory: Annotated[Path, typer.Argument(help="The coordinator directory")]) -> None:
    """Run the SuperLink in the foreground until Ctrl-C."""
    from fedgov.cli import console
    from fedgov.deploy.coordinator import load_coordinator, start_coordinator

    _, cfg = load_coordinator(directory)
    proc = start_coordinator(directory)
    console.print(f"SuperLink running on {cfg.address} (pid {proc.pid}); log: {proc.log_path}. Ctrl-C stops it.")
    _foreground(proc, "SuperLink")


@coordinator_app.command("admit")
@_guard
def coordinator_admit(
    pubkey: Annotated[Path, typer.Argument(help="The node's public key (node-key.pub)")],
    name: Annotated[str, typer.Option("--name", help="The node's name, e.g. GM0363")],
    coordinator_dir: CoordDir,
) -> None:
    """Register a node's public key with the running coordinator."""
    from fedgov.cli import console
    from fedgov.deploy.coordinator import admit

    res = admit(coordinator_dir, pubkey, name)
    console.print(f"admitted {name}: node id {res.get('node-id')}")


@coordinator_app.command("nodes")
@_guard
def coordinator_nodes(coordinator_dir: CoordDir) -> None:
    """List the nodes the running coordinator knows, with their status."""
    from fedgov.cli import console
    from fedgov.deploy.coordinator import nodes

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
    from fedgov.cli import console
    from fedgov.deploy.local import local_federation_up

    state = local_federation_up(directory, nodes=nodes, task_path=task)
    console.print(f"coordinator on {state['address']} (pid {state['superlink']}), {len(state['nodes'])} node(s) online:")
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
    from fedgov.cli import console
    from fedgov.deploy.local import local_federation_down

    stopped = local_federation_down(directory)
    console.print(f"stopped {len(stopped)} process(es)")
