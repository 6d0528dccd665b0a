"""``fedgov coordinator|task|local-federation|app ...``: deployment as real processes.

The coordinator is a Flower SuperLink with TLS and SuperNode authentication; only nodes
whose public key it admitted can connect. ``local-federation`` runs a coordinator and N
nodes on this machine, each a process of its own, for trying out and testing deployment.
(``fedgov node start``, a node's side, is in :mod:`fedgov.cli.node`.)
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from fedgov.cli.console import console, new_typer
from fedgov.cli.daemon import ConsoleHost, ConsolePort, PasswordFile, TlsCert, TlsDev, TlsKey, foreground, serve_console
from fedgov.cli.summary import exit_if_not_learned, print_summary, run_with_progress
from fedgov.deploy.local import local_federation_down, local_federation_up


class SuperLinkState(str, Enum):
    memory = "memory"
    database = "database"


SUPERLINK_STATE_HELP = (
    "The SuperLink's state: 'memory' (Flower's in-memory state, the admitted nodes kept in nodes.json; fast) or "
    "'database' (Flower's SQLite state.db: Flower's run list kept across restarts; about twice the time per deployed round)"
)

if TYPE_CHECKING:
    from fedgov.deploy.tasks import RunInfo

__all__ = ["app_app", "coordinator_app", "local_app", "task_app"]

coordinator_app = new_typer("Run the coordinator: a SuperLink with TLS that admits nodes by their public key.")
local_app = new_typer("A coordinator and N nodes as separate processes on this machine (TLS, node keys).")
task_app = new_typer("Run tasks on the real federation of a coordinator.")
app_app = new_typer("The app bundle (Flower FAB) that nodes run, and its hash.")

CoordDir = Annotated[Path, typer.Option("--coordinator-dir", "-C", help="The coordinator directory")]
RunsDir = Annotated[Path, typer.Option(help="Where 'fedgov task submit' created run directories")]


@app_app.command("hash")
def app_hash(
    directory: Annotated[
        Path | None, typer.Argument(help="A Flower app directory (default: this fedgov installation's app)")
    ] = None,
) -> None:
    """Print the SHA-256 of the app bundle built from DIR: what a node's accept.apps lists."""
    from fedgov.deploy.trust import build_bundle, bundle_hash  # lazy: pydantic models (fedgov --help)

    fab = build_bundle(directory)
    print(bundle_hash(fab))


@task_app.command("submit")
def task_submit(
    task: Annotated[Path, typer.Argument(help="Task file, e.g. configs/tasks/adult-income.toml")],
    coordinator_dir: CoordDir,
    runs_dir: Annotated[Path, typer.Option(help="Where run directories are created")] = Path("runs"),
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds")] = 3600.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON at the end")] = False,
) -> None:
    """Run a task on the coordinator's nodes (run it on the coordinator's host); same report as a simulation."""
    from fedgov.deploy.submit import submit_task  # lazy: numpy, cryptography (fedgov --help)
    from fedgov.reports import load_report  # lazy: pydantic models (fedgov --help)

    run_dir = run_with_progress(lambda on_event: submit_task(task, coordinator_dir, runs_dir=runs_dir, on_event=on_event, timeout=timeout))
    report = load_report(run_dir / "report.json")
    print_summary(report, run_dir)
    if json_out:
        print(report.model_dump_json(indent=2))
    exit_if_not_learned(report)


@task_app.command("resume")
def task_resume(
    run_dir: Annotated[Path, typer.Argument(help="The run directory of the interrupted run ('fedgov task list')")],
    coordinator_dir: CoordDir,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds")] = 3600.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON at the end")] = False,
) -> None:
    """Continue an interrupted run (coordinator crash, 'fedgov task stop') from its last checkpoint."""
    from fedgov.deploy.submit import resume_task  # lazy: numpy, cryptography (fedgov --help)
    from fedgov.reports import load_report  # lazy: pydantic models (fedgov --help)

    done = run_with_progress(lambda on_event: resume_task(run_dir, coordinator_dir, on_event=on_event, timeout=timeout))
    report = load_report(done / "report.json")
    print_summary(report, done)
    if json_out:
        print(report.model_dump_json(indent=2))
    exit_if_not_learned(report)


def _runs_table(infos: list[RunInfo]) -> Table:
    table = Table(title="runs at the coordinator")
    for col in ("run id", "status", "task", "rounds", "elapsed", "run directory"):
        table.add_column(col)
    for i in infos:
        rounds = f"{i.rounds_done or 0}/{i.rounds_planned}" if i.rounds_planned else ("-" if i.rounds_done is None else str(i.rounds_done))
        status = i.status + (f" ({i.status_details})" if i.status_details else "")
        table.add_row(str(i.run_id), status, i.task or "-", rounds, f"{i.elapsed_s:.0f} s" if i.elapsed_s is not None else "-", i.run_dir or "-")
    return table


@task_app.command("list")
def task_list(
    coordinator_dir: CoordDir,
    runs_dir: RunsDir = Path("runs"),
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """List the runs at the coordinator (run it on the coordinator's host), newest first."""
    from fedgov.deploy.tasks import list_runs  # lazy: cryptography (fedgov --help)

    infos = list_runs(coordinator_dir, runs_dir)
    if json_out:
        print(json.dumps([i.model_dump(mode="json") for i in infos], indent=2))
        return
    console.print(_runs_table(infos) if infos else "no runs at this coordinator yet")


@task_app.command("status")
def task_status(
    run_id: Annotated[int, typer.Argument(help="The run id ('fedgov task list')")],
    coordinator_dir: CoordDir,
    runs_dir: RunsDir = Path("runs"),
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """One run: Flower's status and timings, and fedgov's rounds, run directory and report."""
    from fedgov.deploy.tasks import run_status  # lazy: cryptography (fedgov --help)

    info = run_status(coordinator_dir, run_id, runs_dir)
    if json_out:
        print(info.model_dump_json(indent=2))
        return
    console.print(_runs_table([info]))
    if info.message:
        console.print(f"report: {info.report_status}: {info.message}")


@task_app.command("stop")
def task_stop(
    run_id: Annotated[int, typer.Argument(help="The run id ('fedgov task list')")],
    coordinator_dir: CoordDir,
) -> None:
    """Stop a running task; the nodes' ledgers keep what was spent, and release the rest."""
    from fedgov.deploy.tasks import stop_run  # lazy: cryptography (fedgov --help)

    info = stop_run(coordinator_dir, run_id)
    console.print(f"run {run_id}: {info.status}")


@coordinator_app.command("init")
def coordinator_init(
    directory: Annotated[Path, typer.Argument(help="The new coordinator directory")],
    host: Annotated[str, typer.Option(help="Address the nodes connect to (the gateway listens here), e.g. 0.0.0.0")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The gateway's HTTPS port (Fleet API only)")] = 9092,
    superlink_port: Annotated[int | None, typer.Option(help="The SuperLink's own port on 127.0.0.1 (default: port + 1)")] = None,
    san: Annotated[list[str] | None, typer.Option("--san", help="Extra host name or IP for the server certificate")] = None,
    superlink_state: Annotated[SuperLinkState, typer.Option(help=SUPERLINK_STATE_HELP)] = SuperLinkState.memory,
) -> None:
    """Create a coordinator directory: development CA and server certificate, coordinator.toml."""
    from fedgov.deploy.superlink import init_coordinator  # lazy: cryptography (fedgov --help)

    cfg = init_coordinator(directory, host=host, port=port, superlink_port=superlink_port, hosts=tuple(san or ()),
                           superlink_state=superlink_state.value)
    base = directory.resolve()
    console.print(
        f"coordinator directory {base} created: nodes connect to {cfg.host}:{cfg.port} (Fleet API only); "
        f"the SuperLink and its Control API stay on {cfg.control_address}"
    )
    console.print(f"  give the nodes the CA certificate: {cfg.path(base, cfg.ca_cert)}")


@coordinator_app.command("start")
def coordinator_start(directory: Annotated[Path, typer.Argument(help="The coordinator directory")]) -> None:
    """Run the SuperLink in the foreground until Ctrl-C."""
    from fedgov.deploy.superlink import load_coordinator, start_coordinator  # lazy: cryptography (fedgov --help)

    _, cfg = load_coordinator(directory)
    coordinator = start_coordinator(directory)
    console.print(
        f"coordinator running: nodes connect to {cfg.host}:{cfg.port} (gateway, Fleet API only, pid "
        f"{coordinator.gateway.pid}); SuperLink on {cfg.control_address} (this host only, pid "
        f"{coordinator.superlink.pid}); logs in {coordinator.superlink.log_path.parent}. Ctrl-C stops it."
    )
    foreground(coordinator.procs, "coordinator")


@coordinator_app.command("admit")
def coordinator_admit(
    pubkey: Annotated[Path, typer.Argument(help="The node's public key (node-key.pub)")],
    name: Annotated[str, typer.Option("--name", help="The node's name, e.g. GM0363")],
    coordinator_dir: CoordDir,
) -> None:
    """Register a node's public key with the running coordinator."""
    from fedgov.deploy.superlink import admit  # lazy: cryptography (fedgov --help)

    res = admit(coordinator_dir, pubkey, name)
    console.print(f"admitted {name}: node id {res.get('node-id')}")


@coordinator_app.command("nodes")
def coordinator_nodes(coordinator_dir: CoordDir) -> None:
    """List the nodes the running coordinator knows, with their status."""
    from fedgov.deploy.superlink import nodes  # lazy: cryptography (fedgov --help)

    t = Table()
    for col in ("node id", "status", "created", "online since"):
        t.add_column(col)
    for n in nodes(coordinator_dir):
        t.add_row(str(n.get("node-id")), str(n.get("status")), str(n.get("created-at")), str(n.get("online-at")))
    console.print(t)


@coordinator_app.command("console")
def coordinator_console(
    coordinator_dir: CoordDir,
    runs_dir: RunsDir = Path("runs"),
    host: ConsoleHost = "127.0.0.1",
    port: ConsolePort = 8766,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_dev: TlsDev = None,
    password_file: PasswordFile = None,
) -> None:
    """The coordinator's web console until Ctrl-C: runs and their reports, nodes online, query
    figures. Beyond loopback it serves with the coordinator's own certificate unless given one."""
    from fedgov.console.coordinator import coordinator_console as make  # lazy: Starlette, Jinja2 (fedgov --help)
    from fedgov.deploy.superlink import load_coordinator  # lazy: cryptography (fedgov --help)

    base, cfg = load_coordinator(coordinator_dir)
    serve_console(
        lambda guard, hosts: make(runs_dir, guard, coordinator_dir=base, allowed_hosts=hosts),
        what=f"coordinator console of {base}", host=host, port=port, tls_cert=tls_cert, tls_key=tls_key,
        tls_dev=tls_dev, password_file=password_file,
        default_tls=(cfg.path(base, cfg.server_cert), cfg.path(base, cfg.server_key)),
    )


@local_app.command("up")
def local_up(
    directory: Annotated[Path, typer.Option("--dir", "-d", help="Directory for the coordinator, the nodes and their data")],
    nodes: Annotated[int, typer.Option("--nodes", "-n", help="Number of nodes (the first members of the task's federation)")] = 3,
    task: Annotated[Path | None, typer.Option("--task", help="Task whose federation and contract give the nodes' data (default: the demo task)")] = None,
    runtime: Annotated[str, typer.Option("--runtime", help="The nodes' ClientApp runtime: 'warm' (a long-lived worker per node) or 'cold' (a fresh process per message, as Flower does)")] = "warm",
    superlink_state: Annotated[SuperLinkState, typer.Option(help=SUPERLINK_STATE_HELP + " (a new coordinator only)")] = SuperLinkState.memory,
) -> None:
    """Start a coordinator and N nodes in the background; wait until all nodes are online."""
    state = local_federation_up(directory, nodes=nodes, task_path=task, runtime=runtime, superlink_state=superlink_state.value)
    console.print(
        f"coordinator on {state['address']} (gateway pid {state['gateway']}, SuperLink pid {state['superlink']} "
        f"on {state['control_address']}), {len(state['nodes'])} node(s) online:"
    )
    for code, n in state["nodes"].items():
        console.print(f"  {code}: pid {n['pid']}, node id {n['node_id']}")
    console.print(f"submit a task: fedgov task submit configs/tasks/adult-income.toml -C {state['coordinator']}")
    console.print(f"stop: fedgov local-federation down --dir {directory}")


@local_app.command("down")
def local_down(
    directory: Annotated[Path, typer.Option("--dir", "-d", help="The local federation's directory")],
) -> None:
    """Stop the coordinator and every node of a local federation."""
    stopped = local_federation_down(directory)
    console.print(f"stopped {len(stopped)} process(es)")
