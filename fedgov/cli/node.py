"""``fedgov node ...``: the commands of a municipality's node operator and privacy officer.

Every command works on a node directory (``--node-dir``, or ``$FEDGOV_NODE_DIR``, or the
current directory): its policy, privacy-budget ledger, audit log and operator state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from fedgov.cli.console import console, err_console, fail, new_typer, usage_error
from fedgov.cli.daemon import ConsoleHost, ConsolePort, PasswordFile, TlsCert, TlsDev, TlsKey, foreground, serve_console
from fedgov.config import load_contract
from fedgov.errors import ExitCode

if TYPE_CHECKING:
    from fedgov.node.contracts import DataCheck
    from fedgov.node.home import NodeHome

__all__ = ["node_app"]

node_app = new_typer("Operate a municipality's node: budget, audit log, approvals, pause.")
audit_app = new_typer("The node's hash-chained audit log.")
contract_app = new_typer("The data contracts the node holds, pinned in its policy.")
data_app = new_typer("The node's data, checked against the contracts it holds.")
model_app = new_typer("The node's personal models: kept at the node, one per task run (no budget spent using them).")
node_app.add_typer(audit_app, name="audit")
node_app.add_typer(contract_app, name="contract")
node_app.add_typer(data_app, name="data")
node_app.add_typer(model_app, name="model")

NodeDir = Annotated[
    Path | None,
    typer.Option("--node-dir", "-n", help="The node directory (default: $FEDGOV_NODE_DIR or the current directory)"),
]


def _home(node_dir: Path | None) -> NodeHome:
    from fedgov.node.home import NodeHome  # lazy: numpy, through the ledger's accounting (fedgov --help)

    home = NodeHome(node_dir or Path(os.environ.get("FEDGOV_NODE_DIR", ".")))
    if not home.exists():
        usage_error(f"{home.path} is not a node directory (no {NodeHome.POLICY})")
    return home


@node_app.command()
def init(
    node_dir: Annotated[Path, typer.Argument(help="The new node directory")],
    name: Annotated[str, typer.Option("--name", help="The node's name: the municipality's CBS code, e.g. GM0363, or its code in the federation's registry")],
    contract: Annotated[Path, typer.Option("--contract", "-c", help="The data contract the data set follows")],
    data: Annotated[Path, typer.Option("--data", help="The data set (CSV or Parquet), checked against the contract now")],
    test_data: Annotated[Path | None, typer.Option("--test-data", help="A held-out test split (optional)")] = None,
    budget_epsilon: Annotated[float, typer.Option("--budget", help="Total epsilon for the data set per calendar year")] = 10.0,
    approval: Annotated[str, typer.Option(help="auto, manual or deny")] = "manual",
    organisation: Annotated[
        str | None,
        typer.Option("--organisation", help="The organisation's name as reports show it (default: the CBS name of a GM code, else the code)"),
    ] = None,
) -> None:
    """Create a node directory: key pair, policy to edit, privacy ledger and audit log."""
    from fedgov.data import read_table, validate_frame  # lazy: pandas (fedgov --help)
    from fedgov.node.contracts import check_all  # lazy: pydantic models (fedgov --help)
    from fedgov.node.home import init_node  # lazy: numpy, through the ledger's accounting (fedgov --help)

    if approval not in ("auto", "manual", "deny"):
        raise typer.BadParameter("must be auto, manual or deny", param_hint="--approval")
    c = load_contract(contract)
    for f in (data, test_data):
        if f is not None:
            rows = len(validate_frame(read_table(f), c, file=str(f)))
            console.print(f"[green]ok[/] {f}: {rows} rows conform to {c.ref}")
    home = init_node(
        node_dir, node=name, name=organisation, contract=c, data=data, test_data=test_data, budget_epsilon=budget_epsilon,
        approval=approval, contract_path=contract,
    )
    check_all(home)  # the data is registered: its check is recorded for task time
    console.print(f"node directory {home.path} created for {name}:")
    console.print(f"  contract {c.ref} held and pinned: {home.path / 'contracts'}")
    console.print(f"  edit the policy: {home.policy_path}")
    console.print(f"  public key for the coordinator: {home.path / 'node-key.pub'}")


@node_app.command()
def budget(
    node_dir: NodeDir = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Privacy budget per data set: composed spend (PRV), naive sum, remainder, tasks."""
    from fedgov.node.home import budget_of  # lazy: numpy, through the ledger's accounting (fedgov --help)

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
def audit_verify(node_dir: NodeDir = None) -> None:
    """Check the hash chain; exit non-zero naming the first bad entry."""
    home = _home(node_dir)
    v = home.audit.verify()
    if v.ok:
        console.print(f"[green]ok[/] audit log of {home.path}: {v.entries} entries, hash chain intact")
        return
    where = f"entry {v.first_bad_seq}" if v.first_bad_seq is not None else "the log"
    err_console.print(f"[bold red]TAMPERED:[/] {where}: {v.reason}")
    raise typer.Exit(int(ExitCode.AUDIT_TAMPERED))


@audit_app.command("show")
def audit_show(
    node_dir: NodeDir = None,
    task: Annotated[str | None, typer.Option("--task", help="Only this task id")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    last: Annotated[int, typer.Option(help="Only the last N entries (0: all)")] = 0,
) -> None:
    """Print the audit log for a privacy officer: what came in, what was decided, what left."""
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
        t.add_row(str(e.seq), e.time.strftime("%Y-%m-%d %H:%M:%S"), _shown(e.kind), _shown(e.task_id or "-"), _shown(details[:400]))
    console.print(t)


def _shown(text: str) -> str:
    """Text the coordinator may have chosen (a message kind, a task's name, an error text) as a
    table cell: no Rich markup, no control characters (an escape sequence could hide or forge
    lines of what the privacy officer reads)."""
    from rich.markup import escape  # lazy: rich.markup (fedgov --help)

    from fedgov.protocol import plain_text  # lazy: pydantic models (fedgov --help)

    return escape(plain_text(text))


@node_app.command()
def pending(node_dir: NodeDir = None) -> None:
    """Tasks waiting for an operator's approval, with what they would spend and send."""
    home = _home(node_dir)
    items = home.state.pending()
    if not items:
        console.print("no task waits for approval")
        return
    t = Table(title="tasks waiting for approval (fedgov node approve TASK_ID)")
    for col in ("task id", "queued (UTC)", "what it would spend and send"):
        t.add_column(col, overflow="fold")
    for p in items:
        t.add_row(_shown(p.task_id), p.queued_at.strftime("%Y-%m-%d %H:%M:%S"), _shown(", ".join(f"{k}={v}" for k, v in p.summary.items())))
    console.print(t)


@node_app.command()
def approve(
    task_id: Annotated[str, typer.Argument(help="The id `fedgov node pending` shows")],
    node_dir: NodeDir = None,
    by: Annotated[str, typer.Option(help="Who approves (recorded)")] = "",
) -> None:
    """Approve a queued task: the next time the coordinator asks, the node takes part."""
    home = _home(node_dir)
    home.approve(task_id, by=by or os.environ.get("USER", ""))
    console.print(f"approved task {task_id}")


@node_app.command()
def reject(
    task_id: Annotated[str, typer.Argument(help="The id `fedgov node pending` shows")],
    reason: Annotated[str, typer.Option(help="Why (recorded)")] = "",
    node_dir: NodeDir = None,
) -> None:
    """Reject a queued task."""
    home = _home(node_dir)
    home.reject(task_id, reason, by=os.environ.get("USER", ""))
    console.print(f"rejected task {task_id}")


@node_app.command()
def pause(
    node_dir: NodeDir = None,
    reason: Annotated[str, typer.Option(help="Why (shown to the coordinator)")] = "",
) -> None:
    """Stop taking part from the next message on (no restart needed)."""
    home = _home(node_dir)
    home.pause(reason, by=os.environ.get("USER", ""))
    console.print(f"node {home.path.name} paused")


@node_app.command()
def resume(node_dir: NodeDir = None) -> None:
    """Take part again."""
    home = _home(node_dir)
    home.resume(by=os.environ.get("USER", ""))
    console.print(f"node {home.path.name} resumed")


@node_app.command("start")
def start(
    node_dir: Annotated[Path, typer.Argument(help="The node directory ('fedgov node init')")],
    coordinator: Annotated[str, typer.Option("--coordinator", help="The coordinator's address, host:port")],
    ca: Annotated[Path, typer.Option("--ca", help="The coordinator's CA certificate (ca.crt)")],
    port: Annotated[int, typer.Option(help="Local port of the node's ClientApp API (127.0.0.1 only)")] = 9094,
    runtime: Annotated[str, typer.Option("--runtime", help="'warm': a long-lived worker beside the SuperNode runs every message; 'cold': a fresh process per message, as Flower does")] = "warm",
) -> None:
    """Run the node's SuperNode in the foreground until Ctrl-C (TLS, authenticated with node-key),
    with the node's warm worker beside it (its log: logs/worker.log in the node directory)."""
    from fedgov.deploy.supernode import check_before_start, start_node  # lazy: numpy, Flower (fedgov --help)
    from fedgov.node.home import NodeHome  # lazy: numpy, through the ledger's accounting (fedgov --help)

    home = NodeHome(node_dir)
    if home.exists():  # the data against the pinned contracts: a policy or contract error stops here
        for warning in check_before_start(home):
            err_console.print(f"[bold yellow]warning:[/] {warning}")
    proc = start_node(node_dir, coordinator, ca, port, check=False, runtime=runtime)
    console.print(f"SuperNode running for {node_dir} (pid {proc.pid}), coordinator {coordinator}; log: {proc.log_path}. Ctrl-C stops it.")
    foreground(proc, "SuperNode")


@node_app.command("console")
def node_console(
    node_dir: NodeDir = None,
    host: ConsoleHost = "127.0.0.1",
    port: ConsolePort = 8765,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_dev: TlsDev = None,
    password_file: PasswordFile = None,
) -> None:
    """The node's web console until Ctrl-C: budget, ledger, audit log, approvals, pause, policy,
    what left the node. Prints a login token (or use --password-file)."""
    from fedgov.console.node import node_console as make  # lazy: Starlette, Jinja2 (fedgov --help)

    home = _home(node_dir)
    serve_console(
        lambda guard, hosts: make(home, guard, allowed_hosts=hosts), what=f"node console of {home.path}",
        host=host, port=port, tls_cert=tls_cert, tls_key=tls_key, tls_dev=tls_dev, password_file=password_file,
    )


@contract_app.command("add")
def contract_add(
    contract_file: Annotated[Path, typer.Argument(help="The contract file (TOML) to hold and pin")],
    node_dir: NodeDir = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="The data set to serve it for (default: the one under its name)")] = None,
) -> None:
    """Copy a contract (a new version) into the node directory and pin it in the policy by SHA-256."""
    from fedgov.node.contracts import add_contract  # lazy: pydantic models (fedgov --help)

    home = _home(node_dir)
    ds, contract, sha = add_contract(home, contract_file, dataset=dataset)
    console.print(f"data set '{ds}' now served under contract {contract.ref} (sha256 {sha})")
    console.print(f"  check the data against it: fedgov node data check --node-dir {home.path}")


def _print_checks(checks: list[tuple[DataCheck, Path]]) -> bool:
    """A per-data-set summary on the operator's own terminal; True when everything conforms."""
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
def data_check(node_dir: NodeDir = None) -> None:
    """Check every data set against the contracts it is pinned to; details in reports/ (mode 0600)."""
    from fedgov.node.contracts import check_all  # lazy: pydantic models (fedgov --help)

    home = _home(node_dir)
    if not _print_checks(check_all(home)):
        err_console.print(
            "[bold yellow]warning:[/] data that does not conform is refused at task time (data-invalid); "
            "the rows, columns and values are in the report files above, readable only by this user"
        )
        raise typer.Exit(int(ExitCode.DATA_VALIDATION))


def _acc(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


@model_app.command("list")
def model_list(
    node_dir: NodeDir = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """The personal models this node keeps, newest first: task, run, chosen variant, validation
    accuracy (known only here: none of it left the node) and the weights' file."""
    from fedgov.node.personal import PersonalModels  # lazy: numpy (fedgov --help)

    home = _home(node_dir)
    recs = PersonalModels(home.path).records()
    if json_out:
        print(json.dumps([r.model_dump(mode="json") for r in recs], indent=2))
        return
    if not recs:
        console.print(f"no personal models in {home.path / PersonalModels.DIR} (one is kept after each training task's final round)")
        return
    t = Table(title=f"personal models of node {home.policy().node} (kept here; nothing about them was sent)")
    for col in ("key", "task", "run", "created (UTC)", "variant", "val. acc. global", "val. acc. personal", "val. rows", "file"):
        t.add_column(col, overflow="fold")
    for r in recs:
        t.add_row(
            r.key, r.task, r.run, r.created.strftime("%Y-%m-%d %H:%M"), r.variant + (f" ({r.epochs} ep.)" if r.epochs else ""),
            _acc(r.val_accuracy_global), _acc(r.val_accuracy), str(r.val_rows), r.path,
        )
    console.print(t)


@model_app.command("show")
def model_show(
    ref: Annotated[str, typer.Argument(help="The model's key, its task id, or a task name (its newest run)")],
    node_dir: NodeDir = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """One personal model's provenance: task, run, contract, data file, the global model it was
    made from, the variant chosen and why."""
    from fedgov.errors import FedgovError  # lazy: with the store below
    from fedgov.node.personal import PersonalModels  # lazy: numpy (fedgov --help)

    home = _home(node_dir)
    try:
        rec = PersonalModels(home.path).find(ref)
    except FedgovError as exc:
        fail(exc)
    if json_out:
        print(rec.model_dump_json(indent=2))
        return
    for k, v in rec.model_dump(mode="json").items():
        console.print(f"[bold]{k}[/]: {v}", highlight=False)


@model_app.command("export")
def model_export(
    ref: Annotated[str, typer.Argument(help="The model's key, its task id, or a task name (its newest run)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The file to write: .pt (PyTorch state dict) or .npz")],
    node_dir: NodeDir = None,
) -> None:
    """Write a personal model's weights (and its provenance beside it, OUT.json) for use at the
    municipality. The model was fitted on the node's rows without differential privacy: it is as
    confidential as those rows, and must not leave the municipality."""
    import numpy as np  # lazy: numpy (fedgov --help)

    from fedgov.data.io import atomic_write_bytes  # lazy: pandas, through the data package (fedgov --help)
    from fedgov.errors import FedgovError  # lazy: with the store below
    from fedgov.node.personal import PersonalModels  # lazy: numpy (fedgov --help)

    home = _home(node_dir)
    store = PersonalModels(home.path)
    try:
        rec = store.find(ref)
    except FedgovError as exc:
        fail(exc)
    if out.suffix not in (".pt", ".npz"):
        usage_error(f"--out {out}: expected a file name ending in .pt (PyTorch) or .npz (NumPy)")
    if out.exists():
        usage_error(f"--out {out}: the file exists; fedgov does not overwrite it")
    weights = store.weights(rec)
    import io  # lazy: only here

    buf = io.BytesIO()
    if out.suffix == ".pt":
        import torch  # lazy: PyTorch (fedgov --help)

        torch.save({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, buf)
    else:
        arrays: dict[str, Any] = dict(weights)
        np.savez(buf, **arrays)
    atomic_write_bytes(out, buf.getvalue())  # mode 0600
    atomic_write_bytes(out.with_name(out.name + ".json"), rec.model_dump_json(indent=2, exclude={"path"}).encode())
    home.audit.append("personal-model-exported", task_id=rec.task_id, payload={"key": rec.key, "file": str(out.resolve())})
    console.print(f"wrote {out} ({rec.variant} model of task {rec.task}, run {rec.run}) and {out.name}.json; "
                  "it was fitted without DP on this node's rows: keep it inside the municipality")
