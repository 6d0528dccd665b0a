"""The coordinator: a SuperLink with TLS and SuperNode authentication, as a real process.

::

    <coordinator-dir>/
      coordinator.toml     host, port, database, certificate paths (:class:`CoordinatorConfig`)
      pki/                 ca.crt (given to the nodes), ca.key, server.pem, server.key (0600)
      nodes.json           the admitted nodes: node id, public key, name (mode 0600; :mod:`fedgov.deploy.linkrun`)
      state.db             Flower's SQLite state, with superlink_state = "database" only
      flwr-home/           FLWR_HOME for the ``flwr`` CLI: a connection with ``root-certificates``
      logs/

Only nodes whose public key was admitted (:func:`admit`, ``flwr supernode register``) can
connect; any other key is refused by the SuperLink.

Flower 1.42 serves the Fleet, Control and Runtime APIs on one HTTPS port, and the Control API
has no authentication in open-source Flower: whoever reaches the port can submit runs. So the
coordinator is two processes (:class:`Coordinator`): the SuperLink, bound to
``127.0.0.1:superlink_port`` and reached only from this host (``flwr``, ``fedgov task ...``),
and fedgov's gateway (:mod:`fedgov.deploy.gateway`) on ``host:port``, the one port the nodes
use, which serves the Fleet API and ``/health`` and answers everything else with 403.
"""

from __future__ import annotations

import json
import ssl
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedgov.deploy.pki import create_dev_pki
from fedgov.errors import ConfigError, FederationError, Problem
from fedgov.launch.processes import ManagedProcess, flower_bin, flower_env
from fedgov.launch.processes import wait_healthy as runtime_wait_healthy

__all__ = [
    "CONFIG_FILE",
    "CONNECTION",
    "Coordinator",
    "CoordinatorConfig",
    "admit",
    "flwr_bin",
    "gateway_args",
    "init_coordinator",
    "load_coordinator",
    "nodes",
    "run_flwr",
    "start_coordinator",
    "superlink_args",
    "wait_healthy",
]

CONFIG_FILE = "coordinator.toml"
CONNECTION = "fedgov"


class CoordinatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=9092, ge=1, le=65535, description="the gateway's port: the nodes connect here")
    superlink_port: int = Field(
        default=9093, ge=1, le=65535, description="the SuperLink's own port, on 127.0.0.1 only (Control API)"
    )
    superlink_state: Literal["memory", "database"] = Field(
        default="memory",
        description="the SuperLink's state: in memory with the admitted nodes in nodes.json (fast), or Flower's SQLite "
        "database file (runs kept across restarts; about twice the time per deployed round)",
    )
    nodes_file: str = Field(default="nodes.json", description="the admitted nodes (superlink_state = \"memory\")")
    database: str = Field(default="state.db", description="Flower's SQLite state (superlink_state = \"database\")")
    ca_cert: str = "pki/ca.crt"
    server_cert: str = "pki/server.pem"
    server_key: str = "pki/server.key"
    flwr_home: str = "flwr-home"
    logs: str = "logs"

    def path(self, base: Path, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else (base / p).resolve()

    @property
    def address(self) -> str:
        """Where nodes connect (the gateway), as seen from this host."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port}"

    @property
    def control_address(self) -> str:
        """The SuperLink itself (all APIs, Control included): reachable from this host only."""
        return f"127.0.0.1:{self.superlink_port}"


flwr_bin = flower_bin  # the name the deploy modules and tests use


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return json.dumps(str(v))


def load_coordinator(directory: Path | str) -> tuple[Path, CoordinatorConfig]:
    base = Path(directory).resolve()
    cfg_path = base / CONFIG_FILE
    if not cfg_path.is_file():
        raise ConfigError(
            f"{base} is not a coordinator directory",
            [Problem(str(cfg_path), "", "not found; create it with 'fedgov coordinator init'")],
        )
    try:
        cfg = CoordinatorConfig.model_validate(tomllib.loads(cfg_path.read_text("utf-8")))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ConfigError(f"{cfg_path} is not a valid coordinator configuration", [Problem(str(cfg_path), "", str(exc))]) from exc
    return base, cfg


def _write_flwr_home(base: Path, cfg: CoordinatorConfig) -> Path:
    home = cfg.path(base, cfg.flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f"address = {json.dumps(cfg.control_address)}\n"
        f"root-certificates = {json.dumps(str(cfg.path(base, cfg.ca_cert)))}\n",
        encoding="utf-8",
    )
    return home


def init_coordinator(
    directory: Path | str,
    *,
    host: str = "127.0.0.1",
    port: int = 9092,
    superlink_port: int | None = None,
    hosts: tuple[str, ...] = (),
    superlink_state: Literal["memory", "database"] = "memory",
) -> CoordinatorConfig:
    """Create a coordinator directory: development PKI, ``coordinator.toml``, ``flwr`` config."""
    base = Path(directory).resolve()
    cfg_path = base / CONFIG_FILE
    if cfg_path.exists():
        raise ConfigError(
            f"{base} is already a coordinator directory",
            [Problem(str(cfg_path), "", "exists; fedgov never overwrites a coordinator's keys or state")],
        )
    base.mkdir(parents=True, exist_ok=True)
    internal = superlink_port if superlink_port is not None else (port + 1 if port < 65535 else port - 1)
    if internal == port:
        raise ConfigError(
            "the SuperLink's port must differ from the gateway's",
            [Problem(str(cfg_path), "superlink_port", f"{internal} is also the public port")],
        )
    cfg = CoordinatorConfig(host=host, port=port, superlink_port=internal, superlink_state=superlink_state)
    extra = tuple(h for h in (host, *hosts) if h not in ("0.0.0.0", "::", ""))
    create_dev_pki(cfg.path(base, "pki"), hosts=extra)
    cfg_path.write_text(
        "# fedgov coordinator (Flower SuperLink with TLS and SuperNode authentication)\n"
        + "".join(f"{k} = {_toml_value(v)}\n" for k, v in cfg.model_dump().items()),
        encoding="utf-8",
    )
    _write_flwr_home(base, cfg)
    return cfg


def _ssl_context(ca_cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_cert))


def wait_healthy(address: str, ca_cert: Path, proc: ManagedProcess, timeout: float = 60.0) -> None:
    """Wait until the SuperLink answers ``/health`` over HTTPS (verified against ``ca_cert``)."""
    runtime_wait_healthy(f"https://{address}/health", proc, verify=_ssl_context(ca_cert), timeout=timeout)


class Coordinator:
    """The coordinator's two processes: the SuperLink (127.0.0.1) and the Fleet-only gateway."""

    def __init__(self, superlink: ManagedProcess, gateway: ManagedProcess) -> None:
        self.superlink = superlink
        self.gateway = gateway

    @property
    def procs(self) -> list[ManagedProcess]:
        return [self.superlink, self.gateway]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def running(self) -> bool:
        return all(p.running() for p in self.procs)

    def stop(self) -> None:
        for p in (self.gateway, self.superlink):
            p.stop()


def superlink_args(base: Path, cfg: CoordinatorConfig) -> list[str]:
    """The SuperLink's command line: TLS, node authentication, state, and 127.0.0.1 only.

    With ``superlink_state = "memory"`` (the default) Flower's SuperLink runs in
    :mod:`fedgov.deploy.linkrun`: Flower's in-memory state, the admitted nodes kept in
    ``nodes_file``; with ``"database"``, Flower's own ``flower-superlink`` on ``database``."""
    from fedgov.deploy.linkrun import ARG, MIGRATE_ARG

    flower = [
        "--ssl-ca-certfile", str(cfg.path(base, cfg.ca_cert)),
        "--ssl-certfile", str(cfg.path(base, cfg.server_cert)),
        "--ssl-keyfile", str(cfg.path(base, cfg.server_key)),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        # Never on the network: the Control API behind this port has no authentication.
        "--host", "127.0.0.1",
        "--port", str(cfg.superlink_port),
    ]
    if cfg.superlink_state == "database":
        return [flwr_bin("flower-superlink"), *flower, "--database", str(cfg.path(base, cfg.database))]
    return [
        sys.executable, "-P", "-m", "fedgov.deploy.linkrun",
        ARG, str(cfg.path(base, cfg.nodes_file)), MIGRATE_ARG, str(cfg.path(base, cfg.database)), *flower,
    ]


def gateway_args(base: Path, cfg: CoordinatorConfig) -> list[str]:
    """The gateway's command line: the public host and port, forwarding to the SuperLink."""
    return [
        sys.executable, "-m", "fedgov.deploy.gateway",
        "--host", cfg.host,
        "--port", str(cfg.port),
        "--upstream", f"https://{cfg.control_address}",
        "--ca-cert", str(cfg.path(base, cfg.ca_cert)),
        "--certfile", str(cfg.path(base, cfg.server_cert)),
        "--keyfile", str(cfg.path(base, cfg.server_key)),
    ]


def _superlink_proc(base: Path, cfg: CoordinatorConfig, home: Path) -> ManagedProcess:
    return ManagedProcess(
        superlink_args(base, cfg),
        env=flower_env(home),
        log_path=cfg.path(base, cfg.logs) / "superlink.log",
        cwd=base,
        name="flower-superlink",
    )


def _gateway_proc(base: Path, cfg: CoordinatorConfig, home: Path) -> ManagedProcess:
    return ManagedProcess(
        gateway_args(base, cfg),
        env=flower_env(home),
        log_path=cfg.path(base, cfg.logs) / "gateway.log",
        cwd=base,
        name="fedgov gateway",
    )


def start_coordinator(directory: Path | str, *, timeout: float = 60.0) -> Coordinator:
    """Start the SuperLink (TLS, SuperNode authentication, the admitted nodes kept) and the gateway.

    Waits until both answer ``/health``: the SuperLink on its local port, the gateway on the
    public one. On failure both are stopped.
    """
    base, cfg = load_coordinator(directory)
    if cfg.superlink_port == cfg.port:
        raise ConfigError(
            "the SuperLink's port must differ from the gateway's",
            [Problem(str(base / CONFIG_FILE), "superlink_port", f"{cfg.superlink_port} is also 'port'")],
        )
    home = _write_flwr_home(base, cfg)
    ca = cfg.path(base, cfg.ca_cert)
    link = _superlink_proc(base, cfg, home)
    started = [link]
    try:
        wait_healthy(cfg.control_address, ca, link, timeout)
        gateway = _gateway_proc(base, cfg, home)
        started.append(gateway)
        wait_healthy(cfg.address, ca, gateway, timeout)
    except BaseException:
        for p in reversed(started):
            p.stop()
        raise
    return Coordinator(link, gateway)


def run_flwr(directory: Path | str, args: list[str], *, timeout: float = 60.0) -> str:
    """Run ``flwr <args>`` with the coordinator's ``FLWR_HOME``; return its output."""
    import subprocess

    base, cfg = load_coordinator(directory)
    home = _write_flwr_home(base, cfg)
    try:
        res = subprocess.run(  # noqa: S603 - arguments are ours
            [flwr_bin("flwr"), *args], env=flower_env(home), capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise FederationError(f"flwr {' '.join(args[:2])} did not finish within {timeout:.0f} s") from exc
    if res.returncode != 0:
        raise FederationError(f"flwr {' '.join(args[:2])} failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-2000:]}")
    return res.stdout


def _json_out(text: str) -> Any:
    start = text.find("{")
    if start < 0:
        raise FederationError(f"no JSON in flwr's output:\n{text[-2000:]}")
    out = json.loads(text[start:])
    # With --format json, flwr reports a failure as {"success": false, ...} and exits 0.
    if isinstance(out, dict) and out.get("success") is False:
        raise FederationError(f"flwr failed: {out.get('error-message', out)}")
    return out


def admit(directory: Path | str, pubkey: Path | str, name: str) -> dict[str, Any]:
    """Register a node's public key (OpenSSH ECDSA) with the running SuperLink."""
    key = Path(pubkey).resolve()
    if not key.is_file():
        raise ConfigError(f"public key {key} not found", [Problem(str(key), "", "not found")])
    out: dict[str, Any] = _json_out(
        run_flwr(directory, ["supernode", "register", str(key), CONNECTION, "--name", name, "--format", "json"])
    )
    return out


def nodes(directory: Path | str) -> list[dict[str, Any]]:
    """The SuperNodes the running SuperLink knows: registered ones, online or not."""
    out = _json_out(run_flwr(directory, ["supernode", "list", CONNECTION, "--format", "json"]))
    rows = out.get("nodes", out) if isinstance(out, dict) else out
    return list(rows) if isinstance(rows, list) else [out]
