"""A municipality's node as a real process: a SuperNode with TLS and key authentication.

The node connects to the coordinator's SuperLink over TLS (trusting ``ca_cert``) and signs
its requests with ``<node-dir>/node-key`` (the key pair ``fedgov node init`` made; only the
public half, ``node-key.pub``, is given to the coordinator for admission). Its ClientApp
finds its directory, policy and data through ``--node-config node-name=... node-dir=...``.
Every app bundle the coordinator sends is checked against the policy's ``accept.apps``
before it is installed (:mod:`fedgov.deploy.clientapp`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fedgov.errors import ConfigError, Problem
from fedgov.node.home import NodeHome
from fedgov.launch.processes import ManagedProcess, flower_env

__all__ = ["start_node", "node_args", "node_env", "check_before_start"]


def check_before_start(home: NodeHome) -> list[str]:
    """The data check at start (:func:`fedgov.node.contracts.check_all`): a policy or contract
    error raises (the node does not start); data that does not conform gives a warning naming
    its report (the node starts, and refuses tasks on that data set with ``data-invalid``)."""
    from fedgov.node.contracts import check_all

    warnings = []
    for check, path in check_all(home):
        if not check.conforms:
            warnings.append(
                f"data set '{check.dataset}' does not conform to contract {check.contract}: tasks on it are refused "
                f"(data-invalid); details in {path}"
            )
    return warnings


def node_env(node_dir: Path, *, runtime: str = "warm") -> dict[str, str]:
    """The SuperNode's environment: fedgov's ``flwr-clientapp`` relay (with the bundle check)
    first on PATH, the warm worker on (``runtime="warm"``) or off (``"cold"``: a fresh process
    per message, as Flower does), and SuperExec's poll for tasks at 0.1 s instead of 1 s."""
    if runtime not in ("warm", "cold"):
        raise ConfigError("unknown node runtime", [Problem("--runtime", "", f"'warm' or 'cold', not {runtime!r}")])
    from fedgov.deploy.clientapp import write_shim
    from fedgov.deploy.trust import local_bundle_hash

    env = flower_env(node_dir / "flwr-home")
    shim_dir = write_shim(node_dir / "bin")
    env["PATH"] = str(shim_dir) + os.pathsep + env["PATH"]
    env["FEDGOV_NODE_DIR"] = str(node_dir)
    # What "fedgov" in accept.apps stands for: the bundle this installation builds.
    env["FEDGOV_APP_HASH"] = local_bundle_hash()
    env["FEDGOV_NODE_RUNTIME"] = runtime
    env["FEDGOV_PYTHON"] = sys.executable
    # SuperExec asks the SuperNode for new tasks every 1 s by default (Flower's own variable).
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    return env


def node_args(node_dir: Path, name: str, superlink_address: str, ca_cert: Path, port: int) -> list[str]:
    from fedgov.deploy.superlink import flwr_bin

    for s in (name, str(node_dir)):
        if "'" in s or '"' in s:
            raise ConfigError("node name or directory holds a quote", [Problem(s, "", "quotes are not allowed")])
    flwr_bin("flower-supernode")  # checks that Flower's SuperNode is installed
    return [
        # Flower's flower-supernode, in fedgov's launcher: the warm worker beside it, shorter waits.
        sys.executable, "-P", "-m", "fedgov.deploy.noderun",
        "--root-certificates", str(ca_cert),
        "--auth-supernode-private-key", str(node_dir / "node-key"),
        "--superlink", superlink_address,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--node-config", f"node-name='{name}' node-dir='{node_dir}'",
        # Runtime dependency installation (uv sync) is off unless --allow-... is given.
    ]


def start_node(
    node_dir: Path | str,
    superlink_address: str,
    ca_cert: Path | str,
    port: int,
    *,
    name: str | None = None,
    log_path: Path | None = None,
    check: bool = True,
    runtime: str = "warm",
) -> ManagedProcess:
    """Start ``flower-supernode`` for the node directory; its ClientAppIO API on ``127.0.0.1:port``.

    With ``check`` the data is checked against the pinned contracts first
    (:func:`check_before_start`): a policy or contract error stops the start, data that does
    not conform is logged as a warning. ``runtime="warm"`` (the default) runs the node's warm
    worker beside the SuperNode (:mod:`fedgov.deploy.worker`); ``"cold"`` starts a fresh process
    per message, as Flower does."""
    home = NodeHome(node_dir)
    key = home.path / "node-key"
    if not home.exists() or not key.is_file():
        raise ConfigError(
            f"{home.path} is not a node directory with a key",
            [Problem(str(home.path), "", "needs policy.toml and node-key ('fedgov node init')")],
        )
    node_name = name or home.policy().node
    if check:
        import logging

        for warning in check_before_start(home):
            logging.getLogger("fedgov.node").warning("%s", warning)
    flwr_home = home.path / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    return ManagedProcess(
        node_args(home.path, node_name, superlink_address, Path(ca_cert).resolve(), port),
        env=node_env(home.path, runtime=runtime),
        log_path=log_path or home.path / "logs" / "supernode.log",
        cwd=home.path,
        name=f"flower-supernode {node_name}",
    )
