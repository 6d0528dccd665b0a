"""Flower's simulation on an existing Ray cluster: ``fedgov run --ray-address HOST:PORT``.

How the attach works, as read in Flower 1.42's and Ray 2.55's source:

* Flower's Ray backend (``flwr/server/superlink/fleet/vce/backend/raybackend.py``,
  ``RayBackend.init_ray``) calls ``ray.init(runtime_env={"env_vars": {"PYTHONPATH": <the
  driver's sys.path>}}, **init_args)`` when Ray is not initialised yet; the init-args that
  ``flwr federation simulation-config --init-args-*`` sets (``flwr/simulation/app.py``,
  ``_run_simulation_settings``) have no address.
* ``ray.init()`` without an address takes it from ``RAY_ADDRESS`` (``ray/_private/worker.py``,
  ``init``), and the process that calls it, ``flwr-simulation``, inherits the SuperLink's
  environment (the SuperLink starts ``flower-superexec``, which starts ``flwr-simulation``,
  both with plain ``subprocess.Popen``). So fedgov puts the address in the SuperLink's
  environment: ``HOST:PORT`` for a cluster, ``local`` for a Ray of the run's own (``local``
  also keeps Ray from joining a cluster that a ``ray start`` on this machine recorded in
  ``/tmp/ray/ray_current_cluster``).
* On a cluster ``ray.init`` refuses ``num_cpus`` ("When connecting to an existing cluster,
  num_cpus and num_gpus must not be provided"): fedgov then passes no ``--init-args-num-cpus``;
  each Ray node offers the CPUs its ``ray start --num-cpus`` gave it, one per ClientApp actor.
* ``flwr-simulation`` installs the app bundle into ``FLWR_HOME/apps`` (``<run dir>/.flower``),
  loads the ClientApp there and sends it to its actors (``ClientAppActor``) pickled; a Ray
  worker imports ``clients.app`` and fedgov again through the PYTHONPATH above, that is from
  the same paths as on the machine that runs ``fedgov run``.

The nodes' data and state: **shared storage**. Every simulated municipality's node directory
(its data, policy, ledger and audit log) lies under the run directory or ``--state-dir``, and
the ClientApp finds it through the manifest whose path is in the run config. A ledger must
persist where the node keeps it, so nothing is shipped with the task: every Ray node that runs
ClientApps must see the run directory (and the state directory) at the same absolute path,
writable. Before a run is submitted, :func:`check_cluster` connects to the cluster (in a
short-lived process of its own, ``python -m fedgov.launch.raycluster``), runs one small task
pinned to each alive Ray node with a CPU, and refuses the run, naming the Ray node and the path,
if a node cannot see the manifest (same path, same SHA-256), cannot write to a node directory,
cannot read a node's data, or runs another Python, fedgov, Flower, torch or Ray than this machine.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import os
import platform
import secrets
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgov.errors import ConfigError, FederationError, Problem
from fedgov.launch.processes import ManagedProcess

__all__ = [
    "CLIENT_NUM_CPUS",
    "RAY_ADDRESS_ENV",
    "RayNode",
    "check_cluster",
    "check_reachable",
    "cluster_verdict",
    "inspect_paths",
    "parse_ray_address",
    "resolve_ray_address",
    "software_versions",
]

RAY_ADDRESS_ENV = "RAY_ADDRESS"
LOCAL_RAY = "local"
"""``RAY_ADDRESS`` for a Ray of the run's own (``ray.init`` then starts a new local instance)."""
CLIENT_NUM_CPUS = 1
"""CPUs per ClientApp actor (``flwr federation simulation-config --client-resources-num-cpus``)."""
CONNECT_TIMEOUT = 45.0
"""Seconds for the check process to start and connect to the cluster (Ray itself retries for minutes)."""
CHECK_TIMEOUT = 180.0
"""Seconds for the whole check: a Ray node that has not answered by then is named in the refusal."""
MAX_PROBLEMS_SHOWN = 5
"""Problems listed per Ray node; the rest are counted."""
_PACKAGES = ("fedgov", "flwr", "torch", "ray")
_GUIDE = (
    "Every Ray node that runs ClientApps must see the run directory (--runs-dir) and the node directories "
    "(--state-dir, when given) at the same absolute path as this machine, on shared storage (NFS, CephFS, ...), "
    "writable, and run the same Python, fedgov, Flower and torch as this machine, installed at the same path "
    "(README: 'Past one machine: a Ray cluster')."
)


# --------------------------------------------------------------------------- the address


def resolve_ray_address(option: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The cluster to attach to: ``option`` when given, else ``RAY_ADDRESS`` from ``environ``;
    None (a Ray of the run's own) for an empty value, no variable, or ``local``."""
    env = os.environ if environ is None else environ
    value = (option if option is not None else env.get(RAY_ADDRESS_ENV, "")).strip()
    return None if value in ("", LOCAL_RAY) else value


def parse_ray_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address) of a Ray head's GCS; ConfigError otherwise."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"Not a Ray cluster address: {address!r}", [Problem("--ray-address / RAY_ADDRESS", "", why)])

    if "://" in address:
        raise bad("Ray Client addresses (ray://) are not supported: give the head's GCS address HOST:PORT "
                  "(the port of 'ray start --head --port', 6379 by default)")
    host, sep, port_text = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise bad("expected HOST:PORT, the head's address and the port of 'ray start --head --port' (6379 by default)")
    return host, int(port_text)


def check_reachable(host: str, port: int, *, timeout: float = 5.0) -> None:
    """FederationError unless something accepts TCP connections at ``host:port``.

    ``ray.init`` itself retries an unreachable address for minutes; this answers in seconds.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise FederationError(
            f"cannot reach the Ray cluster at {host}:{port} ({why}): is a Ray head running there "
            f"('ray start --head --port {port}'), and is the port open from this machine?"
        ) from None


# --------------------------------------------------------------------------- on each Ray node


def software_versions() -> dict[str, str]:
    """Python's version and that of the packages a ClientApp needs, on this machine."""
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inspect_paths(request: Mapping[str, Any]) -> dict[str, Any]:
    """What this machine sees of a run's files: run on each Ray node by :func:`check_cluster`.

    ``request``: ``shared_file`` and its ``sha256`` (the manifest as the launcher wrote it),
    ``node_dirs`` (each must be a writable directory: a probe file is made and removed),
    ``data_files`` (each must be readable) and ``token`` (names the probe files). Returns the
    problems found (text, each naming a path and what is expected), the software versions, the
    Python executable and the host name.
    """
    problems: list[str] = []
    shared = Path(request["shared_file"])
    try:
        digest = _sha256(shared)
    except FileNotFoundError:
        problems.append(f"{shared}: not found (expected: the file this machine wrote, at the same path)")
    except OSError as exc:
        problems.append(f"{shared}: cannot be read ({exc.strerror or exc}; expected: readable)")
    else:
        if digest != request["sha256"]:
            problems.append(
                f"{shared}: another file (SHA-256 {digest[:16]}, expected {str(request['sha256'])[:16]}): "
                "this Ray node sees other storage at this path"
            )
    missing: set[Path] = set()
    for d in request.get("node_dirs", []):
        node_dir = Path(d)
        if not node_dir.is_dir():
            problems.append(f"{node_dir}: no such directory (expected: the node directory, writable)")
            missing.add(node_dir)
            continue
        probe = node_dir / f".fedgov-ray-check-{request.get('token', 'probe')}"
        try:
            fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
            probe.unlink()
        except OSError as exc:
            problems.append(f"{node_dir}: not writable ({exc.strerror or exc}; expected: the node writes its ledger and audit log here)")
    for f in request.get("data_files", []):
        if Path(f).parent not in missing and not os.access(f, os.R_OK):
            problems.append(f"{f}: not readable (expected: the node's data)")
    return {
        "problems": problems,
        "versions": software_versions(),
        "executable": sys.executable,
        "hostname": socket.gethostname(),
    }


# --------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class RayNode:
    """One Ray node as the check saw it."""

    node_id: str
    address: str
    hostname: str
    cpus: float
    head: bool
    checked: bool

    def describe(self) -> str:
        role = "head, " if self.head else ""
        return f"Ray node {self.address} ({role}host {self.hostname}, node id {self.node_id[:12]})"


def _version_problems(mine: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    return [
        f"{pkg} {theirs.get(pkg, 'unknown')} (expected {mine[pkg]}, as on this machine)"
        for pkg in mine
        if theirs.get(pkg) != mine[pkg]
    ]


def cluster_verdict(address: str, result: Mapping[str, Any], local_versions: Mapping[str, str]) -> list[RayNode]:
    """The Ray nodes of the check's ``result`` (what ``python -m fedgov.launch.raycluster`` wrote);
    FederationError naming every Ray node that cannot run the simulation's ClientApps, with
    its problems (the paths and what is expected)."""
    nodes: list[RayNode] = []
    failures: list[str] = []
    for entry in result.get("nodes", []):
        node = RayNode(
            node_id=str(entry["node_id"]), address=str(entry["address"]), hostname=str(entry.get("hostname", "?")),
            cpus=float(entry.get("cpus", 0)), head=bool(entry.get("head")), checked=not entry.get("skipped"),
        )
        nodes.append(node)
        if not node.checked:
            continue
        problems: list[str]
        if "error" in entry:
            problems = [str(entry["error"])]
        else:
            seen = entry.get("result") or {}
            problems = list(seen.get("problems", [])) + _version_problems(local_versions, seen.get("versions", {}))
        if problems:
            shown = problems[:MAX_PROBLEMS_SHOWN]
            more = len(problems) - len(shown)
            failures.append(
                f"  - {node.describe()}:\n"
                + "\n".join(f"      {p}" for p in shown)
                + (f"\n      ... and {more} more" if more else "")
            )
    if not any(n.checked for n in nodes):
        raise FederationError(
            f"the Ray cluster at {address} has no alive node with a CPU for a ClientApp "
            f"(each needs {CLIENT_NUM_CPUS}; give nodes CPUs with 'ray start --num-cpus N')"
        )
    if failures:
        raise FederationError(
            f"the Ray cluster at {address} cannot run this simulation: "
            f"{len(failures)} of {sum(n.checked for n in nodes)} Ray node(s) cannot run its ClientApps\n"
            + "\n".join(failures)
            + "\n" + _GUIDE
        )
    return nodes


# --------------------------------------------------------------------------- the check


def _request(address: str, run_dir: Path, manifest: Path | None) -> dict[str, Any]:
    """What each Ray node must see: the manifest (or, without one, the run config) and the
    node directories and data files it lists."""
    shared = manifest if manifest is not None else run_dir / "run-config.toml"
    node_dirs: list[str] = []
    data_files: list[str] = []
    if manifest is not None:
        for entry in json.loads(manifest.read_text("utf-8")):
            train, test = Path(entry["train_path"]), Path(entry["test_path"])
            node_dirs.append(str(train.parent))
            data_files += [str(train), str(test)]
    return {
        "address": address,
        "shared_file": str(shared.resolve()),
        "sha256": _sha256(shared),
        "node_dirs": list(dict.fromkeys(node_dirs)),
        "data_files": list(dict.fromkeys(data_files)),
        "token": secrets.token_hex(8),
        "client_cpus": CLIENT_NUM_CPUS,
        "timeout": CHECK_TIMEOUT - CONNECT_TIMEOUT,
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def check_cluster(
    address: str,
    run_dir: Path,
    *,
    manifest: Path | None,
    env: Mapping[str, str],
    connect_timeout: float = CONNECT_TIMEOUT,
    timeout: float = CHECK_TIMEOUT,
) -> list[RayNode]:
    """Check that the Ray cluster at ``address`` can run this run's ClientApps; return its nodes.

    Raises ConfigError for an address that is not ``HOST:PORT``, FederationError when the
    address cannot be reached, no Ray cluster answers there, or a Ray node cannot see the run's
    files (:func:`cluster_verdict`). The check runs in a process of its own (its log:
    ``<run dir>/logs/ray-check.log``), so that this one never becomes a Ray driver.
    """
    host, port = parse_ray_address(address)
    check_reachable(host, port)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    request_path, result_path = logs / "ray-check-request.json", logs / "ray-check.json"
    request_path.write_text(json.dumps(_request(address, run_dir, manifest)), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    # Ray looks for a Ray node on this machine for 60 s by default; 20 s tells "not a node" in time.
    env = {**env, RAY_ADDRESS_ENV: address, "RAY_gcs_server_request_timeout_seconds": "20"}
    started = time.monotonic()
    with ManagedProcess(
        [sys.executable, "-m", "fedgov.launch.raycluster", str(request_path), str(result_path)],
        env=env, log_path=logs / "ray-check.log", cwd=run_dir, name="Ray cluster check",
    ) as proc:
        while proc.running():
            result = _read_json(result_path)
            waited = time.monotonic() - started
            if result is None and waited > connect_timeout:
                raise FederationError(
                    f"no Ray cluster answered at {address} within {connect_timeout:.0f} s: is it the port of the "
                    f"head's 'ray start --head --port', with the same Ray version as here ({software_versions()['ray']})? "
                    f"See {proc.log_path}"
                )
            if waited > timeout:
                raise FederationError(f"the check of the Ray cluster at {address} did not finish within {timeout:.0f} s; see {proc.log_path}")
            time.sleep(0.1)
    result = _read_json(result_path)
    if result is None or "error" in result or not result.get("done"):
        why = result.get("error") if result else None
        if why and "No node info found" in why:
            why = (f"this machine is not a node of that cluster (Ray says: {why}). A Ray driver runs on a Ray node: run "
                   f"fedgov on the head, or on a machine that joined the cluster with 'ray start --address {address}'")
        tail = proc.tail(12).strip()
        raise FederationError(
            f"cannot use the Ray cluster at {address}: {why or 'the check process ended without a result'}\n"
            + (f"{tail}\n" if tail else "") + f"(see {proc.log_path})"
        )
    return cluster_verdict(address, result, software_versions())


# --------------------------------------------------------------------------- the check process


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value), encoding="utf-8")
    os.replace(tmp, path)


def _cause(exc: BaseException) -> str:
    """The last line of an error's text: a task's error ends with its cause."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _chain(exc: BaseException) -> str:
    """An error and what caused it (``ray.init`` wraps the reason in a ConnectionError)."""
    parts: list[str] = []
    cur: BaseException | None = exc
    while cur is not None and len(parts) < 3:
        parts.append(f"{type(cur).__name__}: {_cause(cur)}")
        cur = cur.__cause__ or cur.__context__
    return "; because ".join(parts)


def _probe(request: Mapping[str, Any], result_path: Path) -> None:
    """Connect to the cluster, run :func:`inspect_paths` on each alive Ray node with a CPU for a
    ClientApp, and write what came back to ``result_path``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        # As Flower's Ray backend does: the workers import fedgov from this process's paths.
        ray.init(
            address=request["address"], include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
        )
    except Exception as exc:  # noqa: BLE001 - version mismatch, not a Ray GCS, authentication, ...
        _write_json(result_path, {"error": _chain(exc)})
        return
    try:
        _write_json(result_path, {"connected": True})
        # By its module's name (this file runs as __main__): a worker that cannot import fedgov fails here.
        from fedgov.launch.raycluster import inspect_paths as check

        remote = ray.remote(num_cpus=0, max_retries=0)(check)
        entries: list[dict[str, Any]] = []
        refs: dict[Any, dict[str, Any]] = {}
        for n in ray.nodes():  # type: ignore[no-untyped-call]
            if not n.get("Alive"):
                continue
            resources = n.get("Resources") or {}
            entry: dict[str, Any] = {
                "node_id": n["NodeID"], "address": n.get("NodeManagerAddress", "?"), "hostname": n.get("NodeManagerHostname", "?"),
                "cpus": resources.get("CPU", 0), "head": "node:__internal_head__" in resources,
            }
            entries.append(entry)
            if entry["cpus"] < request["client_cpus"]:
                entry["skipped"] = "no CPU for a ClientApp: Flower places no actor here"
                continue
            strategy = NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
            refs[remote.options(scheduling_strategy=strategy).remote(request)] = entry
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=float(request["timeout"])) if refs else ([], [])
        for ref, entry in refs.items():
            if ref not in ready:
                entry["error"] = f"did not answer within {request['timeout']:.0f} s (expected: a Ray worker that runs fedgov's check)"
                continue
            try:
                entry["result"] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the task failed there: fedgov missing, ...
                entry["error"] = f"the check could not run there: {_cause(exc)} (expected: fedgov installed as on this machine)"
        _write_json(result_path, {"connected": True, "done": True, "nodes": entries})
    finally:
        ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedgov.launch.raycluster REQUEST.json RESULT.json`` (run by :func:`check_cluster`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m fedgov.launch.raycluster REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    request = json.loads(Path(args[0]).read_text("utf-8"))
    _probe(request, Path(args[1]))
    return 0


if __name__ == "__main__":  # pragma: no cover - the check process
    sys.exit(main())
