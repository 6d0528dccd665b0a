"""``fedgov node ...``: the commands of a municipality's node operator and privacy officer.

Every command works on a node directory (``--node-dir``, or ``$FEDGOV_NODE_DIR``, or the
current directory): its policy, privacy-budget ledger, audit log and operator state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedgov.errors import ExitCode, FedgovError

node_app = typer.Typer(help="Operate a municipality's node: budget, audit log, approvals, pause.", no_args_is_help=True)
audit_app = typer.Typer(help="The node's hash-chained audit log.", no_args_is_help=True)
node_app.add_typer(audit_app, name="audit")

NodeDir = Annotated[
    Path,
    typer.Option("--node-dir", "-n", help="The node directory (default: $FEDGOV_NODE_DIR or the current directory)"),
]


def _default_dir() -> Path:
    return Path(os.environ.get("FEDGOV_NODE_DIR", "."))


def _home(node_dir: Path | None):  # type: ignore[no-untyped-def]
    from fedgov.cli.commands import err_console
    from fedgov.node.home import NodeHome

    home = NodeHome(node_dir or _default_dir())
    if not home.exists():
        err_console.print(f"[bold red]error:[/] {home.path} is not a node directory (no {NodeHome.POLICY})")
        raise typer.Exit(int(ExitCode.USAGE))
    return home


def _guard(fn):  # type: ignore[no-untyped-def]
    """FedgovErrors end in a message and their exit code."""
    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
        from fedgov.cli.commands import _fail

        try:
            return fn(*args, **kwargs)
        except FedgovError as exc:
            _fail(exc)

    return wrapped


@node_app.command()
@_guard
def init(
    node_dir: Annotated[Path, typer.Argument(help="The new node directory")],
    name: Annotated[str, typer.Option("--name", help="The node's name: the municipality's CBS code, e.g. GM0363")],
    contract: Annotated[Path, typer.Option("--contract", "-c", help="The data contract the data set follows")],
    data: Annotated[Path, typer.Option("--data", help="The data set (CSV or Parquet), checked against the contract now")],
    test_data: Annotated[Path | None, typer.Option("--test-data", help="A held-out test split (optional)")] = None,
    budget_epsilon: Annotated[float, typer.Option("--budget", help="Total epsilon for the data set per calendar year")] = 10.0,
    approval: Annotated[str, typer.Option(help="auto, manual or deny")] = "manual",
) -> None:
    """Create a node directory: key pair, policy to edit, privacy ledger and audit log."""
    from fedgov.cli.commands import console
    from fedgov.config import load_contract
    from fedgov.data import read_table, validate_frame
    from fedgov.node.home import init_node

    if approval not in ("auto", "manual", "deny"):
        raise typer.BadParameter("must be auto, manual or deny", param_hint="--approval")
    c = load_contract(contract)
    for f in (data, test_data):
        if f is not None:
            rows = len(validate_frame(read_table(f), c, file=str(f)))
            console.print(f"[green]ok[/] {f}: {rows} rows conform to {c.ref}")
    home = init_node(
        node_dir, node=name, contract=c, data=data, test_data=test_data, budget_epsilon=budget_epsilon,
        approval=approval, contract_path=contract,
    )
    from fedgov.node.contracts import check_all

    check_all(home)  # the data is registered: its check is recorded for task time
    console.print(f"node directory {home.path} created for {name}:")
    console.print(f"  contract {c.ref} held and pinned: {home.path / 'contracts'}")
    console.print(f"  edit the policy: {home.policy_path}")
    console.print(f"  public key for the coordinator: {home.path / 'node-key.pub'}")


@node_app.command()
@_guard
def budget(
    node_dir: NodeDir = None,  # type: ignore[assignment]
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Privacy budget per data set: composed spend (PRV), naive sum, remainder, tasks."""
    from fedgov.cli.commands import console
    from fedgov.node.home import budget_of

    home = _home(node_dir)
    policy = home.policy()
    statuses = [home.ledger.status(ds.name, budget_of(ds)) for ds in policy.datasets]
    if json_out:
        print(json.dumps([s.model_dump(mode="json") for s in statuses], indent=2))
        return
    t = Table(title=f"privacy budget of node {policy.node}")
    for col in ("data set", "period", "budget (eps, delta)", "spent (composed)", "naive sum", "remaining", "open tasks", "closed tasks"):
        t.add_column(col)
    for s in statuses:
        t.add_row(
            s.dataset, str(s.year or "for ever"), f"{s.budget.epsilon:g}, {s.budget.delta:g}",
            f"{s.epsilon_committed:.3f}", f"{s.epsilon_naive:.3f}", f"{s.remaining:.3f}",
            str(len(s.open_tasks)), str(len(s.closed_tasks)),
        )
    console.print(t)


@audit_app.command("verify")
@_guard
def audit_verify(node_dir: NodeDir = None) -> None:  # type: ignore[assignment]
    """Check the hash chain; exit non-zero naming the first bad entry."""
    from fedgov.cli.commands import console, err_console

    home = _home(node_dir)
    v = home.audit.verify()
    if v.ok:
        console.print(f"[green]ok[/] audit log of {home.path}: {v.entries} entries, hash chain intact")
        return
    where = f"entry {v.first_bad_seq}" if v.first_bad_seq is not None else "the log"
    err_console.print(f"[bold red]TAMPERED:[/] {where}: {v.reason}")
    raise typer.Exit(int(ExitCode.AUDIT_TAMPERED))


@audit_app.command("show")
@_guard
def audit_show(
    node_dir: NodeDir = None,  # type: ignore[assignment]
    task: Annotated[str | None, typer.Option("--task", help="Only this task id")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    last: Annotated[int, typer.Option(help="Only the last N entries (0: all)")] = 0,
) -> None:
    """Print the audit log for a privacy officer: what came in, what was decided, what left."""
    from fedgov.cli.commands import console

    home = _home(node_dir)
    entries = home.audit.entries(task_id=task)
    if last:
        entries = entries[-last:]
    if json_out:
        print(json.dumps([e.model_dump(mode="json") for e in entries], indent=2))
        return
    t = Table(title=f"audit log of {home.path.name}")
    for col in ("#", "time (UTC)", "what", "task", "details"):
        t.add_column(col, overflow="fold")
    for e in entries:
        p = dict(e.payload)
        details = ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in p.items() if k not in ("config",))
        t.add_row(str(e.seq), e.time.strftime("%Y-%m-%d %H:%M:%S"), e.kind, e.task_id or "-", details[:400])
    console.print(t)


@node_app.command()
@_guard
def pending(node_dir: NodeDir = None) -> None:  # type: ignore[assignment]
    """Tasks waiting for an operator's approval, with what they would spend and send."""
    from fedgov.cli.commands import console

    home = _home(node_dir)
    items = home.state.pending()
    if not items:
        console.print("no task waits for approval")
        return
    t = Table(title="tasks waiting for approval (fedgov node approve TASK_ID)")
    for col in ("task id", "queued (UTC)", "what it would spend and send"):
        t.add_column(col, overflow="fold")
    for p in items:
        t.add_row(p.task_id, p.queued_at.strftime("%Y-%m-%d %H:%M:%S"), ", ".join(f"{k}={v}" for k, v in p.summary.items()))
    console.print(t)


@node_app.command()
@_guard
def approve(
    task_id: Annotated[str, typer.Argument(help="The id `fedgov node pending` shows")],
    node_dir: NodeDir = None,  # type: ignore[assignment]
    by: Annotated[str, typer.Option(help="Who approves (recorded)")] = "",
) -> None:
    """Approve a queued task: the next time the coordinator asks, the node takes part."""
    from fedgov.cli.commands import console

    home = _home(node_dir)
    p = home.state.approve(task_id, by=by or os.environ.get("USER", ""))
    home.audit.append("approved", task_id=task_id, payload={"by": p.decided_by, "summary": p.summary})
    console.print(f"approved task {task_id}")


@node_app.command()
@_guard
def reject(
    task_id: Annotated[str, typer.Argument(help="The id `fedgov node pending` shows")],
    reason: Annotated[str, typer.Option(help="Why (recorded)")] = "",
    node_dir: NodeDir = None,  # type: ignore[assignment]
) -> None:
    """Reject a queued task."""
    from fedgov.cli.commands import console

    home = _home(node_dir)
    home.state.reject(task_id, reason, by=os.environ.get("USER", ""))
    home.audit.append("rejected", task_id=task_id, payload={"reason": reason})
    console.print(f"rejected task {task_id}")


@node_app.command()
@_guard
def pause(
    node_dir: NodeDir = None,  # type: ignore[assignment]
    reason: Annotated[str, typer.Option(help="Why (shown to the coordinator)")] = "",
) -> None:
    """Stop taking part from the next message on (no restart needed)."""
    from fedgov.cli.commands import console

    home = _home(node_dir)
    home.state.pause(reason)
    home.audit.append("paused", payload={"reason": reason})
    console.print(f"node {home.path.name} paused")


@node_app.command()
@_guard
def resume(node_dir: NodeDir = None) -> None:  # type: ignore[assignment]
    """Take part again."""
    from fedgov.cli.commands import console

    home = _home(node_dir)
    home.state.resume()
    home.audit.append("resumed", payload={})
    console.print(f"node {home.path.name} resumed")


contract_app = typer.Typer(help="The data contracts the node holds, pinned in its policy.", no_args_is_help=True)
data_app = typer.Typer(help="The node's data, checked against the contracts it holds.", no_args_is_help=True)
node_app.add_typer(contract_app, name="contract")
node_app.add_typer(data_app, name="data")


@contract_app.command("add")
@_guard
def contract_add(
    contract_file: Annotated[Path, typer.Argument(help="The contract file (TOML) to hold and pin")],
    node_dir: NodeDir = None,  # type: ignore[assignment]
    dataset: Annotated[str | None, typer.Option("--dataset", help="The data set to serve it for (default: the one under its name)")] = None,
) -> None:
    """Copy a contract (a new version) into the node directory and pin it in the policy by SHA-256."""
    from fedgov.cli.commands import console
    from fedgov.node.contracts import add_contract

    home = _home(node_dir)
    ds, contract, sha = add_contract(home, contract_file, dataset=dataset)
    console.print(f"data set '{ds}' now served under contract {contract.ref} (sha256 {sha})")
    console.print(f"  check the data against it: fedgov node data check --node-dir {home.path}")


def _print_checks(checks) -> bool:  # type: ignore[no-untyped-def]
    """A per-data-set summary on the operator's own terminal; True when everything conforms."""
    from fedgov.cli.commands import console

    t = Table(title="data checked against the contracts this node holds")
    for col in ("data set", "contract", "conforms", "problems", "columns", "report"):
        t.add_column(col, overflow="fold")
    ok = True
    for check, path in checks:
        ok = ok and check.conforms
        conforms = "[green]yes[/]" if check.conforms else ("[red]no (missing)[/]" if check.missing else "[red]no[/]")
        columns = ", ".join(check.columns) or ("-" if check.conforms else "(file level)")
        t.add_row(check.dataset, check.contract, conforms, str(check.n_problems), columns, str(path))
    console.print(t)
    return ok


@data_app.command("check")
@_guard
def data_check(node_dir: NodeDir = None) -> None:  # type: ignore[assignment]
    """Check every data set against the contracts it is pinned to; details in reports/ (mode 0600)."""
    from fedgov.cli.commands import err_console
    from fedgov.node.contracts import check_all

    home = _home(node_dir)
    if not _print_checks(check_all(home)):
        err_console.print(
            "[bold yellow]warning:[/] data that does not conform is refused at task time (data-invalid); "
            "the rows, columns and values are in the report files above, readable only by this user"
        )
        raise typer.Exit(int(ExitCode.DATA_VALIDATION))
