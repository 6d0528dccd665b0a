"""A whole federation on this machine, as real processes: one coordinator, N nodes.

For trying out deployment and for tests: every process is separate, TLS is on, and every
node authenticates with its own key, admitted by the coordinator before it starts.

::

    <dir>/
      coordinator/        a coordinator directory (:mod:`fedgov.deploy.superlink`)
      data/<code>/        each node's part of the demo federation (train.csv, test.csv)
      nodes/<code>/       each node's directory (key pair, identity key, policy with approval "auto", ledger, audit)
      roster/             the federation roster of the nodes and its authority's key (secure aggregation)
      local-federation.json   the processes started (pids), the address, the nodes

:func:`local_federation_down` stops every process in the state file with all its children.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

from fedgov.errors import ConfigError, FederationError, Problem
from fedgov.launch.processes import ManagedProcess, free_port, kill_tree

__all__ = [
    "STATE_FILE",
    "local_federation_down",
    "local_federation_up",
    "read_state",
    "restart_coordinator",
    "start_local_node",
    "stop_local_node",
]

STATE_FILE = "local-federation.json"


def _default_task() -> Path:
    from fedgov.launch.simulation import app_dir

    return app_dir() / "configs" / "tasks" / "adult-income.toml"


def read_state(directory: Path | str) -> dict[str, Any]:
    p = Path(directory) / STATE_FILE
    if not p.is_file():
        return {}
    data: dict[str, Any] = json.loads(p.read_text("utf-8"))
    return data


def _write_state(directory: Path, state: dict[str, Any]) -> None:
    tmp = directory / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    tmp.replace(directory / STATE_FILE)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def _prepare_nodes(base: Path, n: int, task_path: Path, budget: float) -> list[tuple[str, Path]]:
    """Materialize the task's federation and create the first ``n`` members' node directories."""
    from fedgov.config import load_federation, load_task
    from fedgov.data import materialize
    from fedgov.node.home import NodeHome, init_node

    task, contract = load_task(task_path)
    if task.federation is None:
        raise ConfigError("the task names no federation", [Problem(str(task_path), "federation", "missing")])
    federation = load_federation(task.federation)
    if not 1 <= n <= len(federation.members):
        raise ConfigError(
            f"--nodes must be between 1 and {len(federation.members)}",
            [Problem(str(task.federation), "members", f"{len(federation.members)} members, asked for {n}")],
        )
    data_dir = base / "data"
    if not all((data_dir / m.code / "train.csv").is_file() for m in federation.members[:n]):
        materialize(federation, contract, data_dir)
    out: list[tuple[str, Path]] = []
    for m in federation.members[:n]:
        node_dir = base / "nodes" / m.code
        if not NodeHome(node_dir).exists():
            init_node(
                node_dir, node=m.code, name=federation.policy_name(m.code), contract=contract, data=data_dir / m.code / "train.csv",
                test_data=data_dir / m.code / "test.csv", budget_epsilon=budget, approval="auto",
            )
        out.append((m.code, node_dir.resolve()))
    # The local federation's roster (fedgov.privacy.roster): its own authority, kept in the directory.
    from fedgov.launch.simulation import pin_roster_text
    from fedgov.privacy.roster import federation_roster

    roster, authority = federation_roster(base / "roster", federation.name, {code: d for code, d in out})
    for _, node_dir in out:
        home = NodeHome(node_dir)
        text = home.policy_path.read_text("utf-8")
        pinned = pin_roster_text(text, roster, authority)
        if pinned != text:
            NodeHome.create(node_dir, policy_text=pinned, overwrite=True)
            home.policy()  # the policy written must load
    return out


def local_federation_up(
    directory: Path | str,
    *,
    nodes: int = 3,
    task_path: Path | None = None,
    budget: float = 10.0,
    connect_timeout: float = 90.0,
    runtime: str = "warm",
    superlink_state: Literal["memory", "database"] = "memory",
) -> dict[str, Any]:
    """Create (or reuse) and start a local federation; return its state (also in the state file).

    ``runtime`` is the nodes' ClientApp runtime: ``"warm"`` (a long-lived worker per node,
    :mod:`fedgov.deploy.worker`) or ``"cold"`` (a fresh process per message, as Flower does).
    ``superlink_state`` is a new coordinator's (:class:`~fedgov.deploy.superlink.CoordinatorConfig`);
    a coordinator directory that exists keeps its own.

    Waits until every node is online at the SuperLink. On any failure, everything started
    is stopped again.
    """
    from fedgov.deploy.superlink import (
        admit,
        init_coordinator,
        load_coordinator,
        start_coordinator,
    )
    from fedgov.deploy.supernode import start_node

    base = Path(directory).resolve()
    base.mkdir(parents=True, exist_ok=True)
    old = read_state(base)
    if any(_alive(int(p)) for p in _pids(old)):
        raise FederationError(f"a local federation is already running in {base}; stop it with 'fedgov local-federation down'")
    coord_dir = base / "coordinator"
    if not (coord_dir / "coordinator.toml").is_file():
        init_coordinator(coord_dir, port=free_port(), superlink_port=free_port(), superlink_state=superlink_state)
    _, cfg = load_coordinator(coord_dir)
    ca = cfg.path(coord_dir, cfg.ca_cert)
    members = _prepare_nodes(base, nodes, (task_path or _default_task()).resolve(), budget)

    started: list[ManagedProcess] = []  # in start order: stopped in reverse
    state: dict[str, Any] = {
        "dir": str(base),
        "coordinator": str(coord_dir),
        "address": cfg.address,
        "ca_cert": str(ca),
        "connection": "fedgov",
        "flwr_home": str(cfg.path(coord_dir, cfg.flwr_home)),
        "superlink": None,
        "gateway": None,
        "control_address": cfg.control_address,
        "nodes": {},
        "admitted": dict(old.get("admitted", {})),
    }
    try:
        coordinator = start_coordinator(coord_dir)
        started.extend(coordinator.procs)
        state["superlink"], state["gateway"] = coordinator.superlink.pid, coordinator.gateway.pid
        _write_state(base, state)
        for code, node_dir in members:
            if code not in state["admitted"]:
                res = admit(coord_dir, node_dir / "node-key.pub", code)
                state["admitted"][code] = str(res.get("node-id", ""))
                _write_state(base, state)
        for code, node_dir in members:
            port = free_port()
            proc = start_node(
                node_dir, cfg.address, ca, port, name=code, log_path=base / "logs" / f"supernode-{code}.log", runtime=runtime
            )
            started.append(proc)
            state["nodes"][code] = {
                "pid": proc.pid, "port": port, "node_dir": str(node_dir), "node_id": state["admitted"][code], "runtime": runtime,
            }
            _write_state(base, state)
        _wait_online(coord_dir, {state["admitted"][c] for c, _ in members}, started, connect_timeout)
    except BaseException:
        for p in reversed(started):
            p.stop()
        state["superlink"], state["gateway"], state["nodes"] = None, None, {}
        _write_state(base, state)
        raise
    for p in started:
        p._log.close()  # the processes keep their own handles; they outlive this call
    return state


def _wait_online(coord_dir: Path, ids: set[str], procs: list[ManagedProcess], timeout: float) -> None:
    from fedgov.deploy.superlink import nodes as list_nodes

    deadline = time.monotonic() + timeout
    online: set[str] = set()
    while time.monotonic() < deadline:
        for p in procs:
            if not p.running():
                raise FederationError(f"{p.name} exited (exit {p.proc.returncode}):\n{p.tail()}")
        online = {str(n.get("node-id")) for n in list_nodes(coord_dir) if n.get("status") == "online"}
        if ids <= online:
            return
        time.sleep(1.0)
    raise FederationError(f"nodes not online within {timeout:.0f} s: {sorted(ids - online)}")


def restart_coordinator(directory: Path | str, *, grace: float = 10.0) -> dict[str, Any]:
    """Stop the local federation's coordinator (gateway and SuperLink) and start it again.

    The nodes keep running: they retry until the SuperLink is back and reconnect with the node
    ids their keys were registered under (the coordinator's ``nodes.json`` keeps them,
    :mod:`fedgov.deploy.linkrun`).
    """
    from fedgov.deploy.superlink import start_coordinator

    base = Path(directory).resolve()
    state = read_state(base)
    if not state:
        raise FederationError(f"no local federation in {base}")
    for key in ("gateway", "superlink"):
        pid = state.get(key)
        if pid and _alive(int(pid)) and _is_flower(int(pid)):
            kill_tree(int(pid), grace=grace)
        if pid:
            _reap(int(pid))
    state["superlink"] = state["gateway"] = None
    _write_state(base, state)
    coordinator = start_coordinator(state["coordinator"])
    state["superlink"], state["gateway"] = coordinator.superlink.pid, coordinator.gateway.pid
    _write_state(base, state)
    for p in coordinator.procs:
        p._log.close()
    return state


def stop_local_node(directory: Path | str, code: str, *, grace: float = 10.0) -> None:
    """Stop one node of the local federation (as a crash or a reboot would)."""
    base = Path(directory).resolve()
    state = read_state(base)
    node = state.get("nodes", {}).get(code)
    if node is None:
        raise FederationError(f"node {code} is not running in the local federation in {base}")
    pid = int(node["pid"])
    if _alive(pid) and _is_flower(pid):
        kill_tree(pid, grace=grace)
    _reap(pid)
    node["pid"] = None
    _write_state(base, state)


def start_local_node(directory: Path | str, code: str) -> dict[str, Any]:
    """(Re)start one node of the local federation; it keeps its node id (its key is registered)."""
    from fedgov.deploy.supernode import start_node

    base = Path(directory).resolve()
    state = read_state(base)
    node = state.get("nodes", {}).get(code)
    if node is None:
        raise FederationError(f"node {code} is not part of the local federation in {base}")
    if node.get("pid") and _alive(int(node["pid"])):
        raise FederationError(f"node {code} is already running (pid {node['pid']})")
    port = free_port()
    proc = start_node(
        Path(node["node_dir"]), state["address"], Path(state["ca_cert"]), port, name=code,
        log_path=base / "logs" / f"supernode-{code}.log", runtime=str(node.get("runtime", "warm")),
    )
    node["pid"], node["port"] = proc.pid, port
    _write_state(base, state)
    proc._log.close()
    return state


def _pids(state: dict[str, Any]) -> list[int]:
    pids = [int(n["pid"]) for n in state.get("nodes", {}).values() if n.get("pid")]
    for key in ("gateway", "superlink"):
        if state.get(key):
            pids.append(int(state[key]))
    return pids


def local_federation_down(directory: Path | str, *, grace: float = 10.0) -> list[int]:
    """Stop every process of the local federation (nodes first); return the pids stopped."""
    base = Path(directory).resolve()
    state = read_state(base)
    stopped: list[int] = []
    for pid in _pids(state):
        if _alive(pid) and _is_flower(pid):
            kill_tree(pid, grace=grace)
            stopped.append(pid)
        _reap(pid)
    if state:
        state["superlink"], state["gateway"], state["nodes"] = None, None, {}
        _write_state(base, state)
    return stopped


def _reap(pid: int) -> None:
    """Collect the exit status of a process this one started (no zombie left behind)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _is_flower(pid: int) -> bool:
    """Whether ``pid`` still runs a Flower process (not a recycled pid of something else)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return any(k in cmd for k in ("flower-superlink", "flower-supernode", "fedgov.deploy.gateway", "fedgov.deploy.noderun",
                                  "fedgov.deploy.linkrun"))
