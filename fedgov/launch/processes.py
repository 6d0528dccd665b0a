"""Start Flower's processes with fedgov's environment and stop them, with all their children.

Flower's local SuperLink outlives the run that started it, and Ray starts helper processes
of its own; a command that returns must leave nothing running. Every process started here
runs in its own session, and :func:`kill_tree` stops it together with every descendant it
has at the time (read from ``/proc``), first politely, then with SIGKILL.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["flower_env", "flower_bin", "free_port", "kill_tree", "descendants", "wait_healthy", "ManagedProcess"]

log = logging.getLogger(__name__)

FLOWER_QUIET_ENV = {
    # No telemetry, no update check, no `uv sync` at run time: a node installs nothing
    # it was not installed with, and nothing leaves the machine but what fedgov sends.
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "PYTHONUNBUFFERED": "1",
}


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: quiet, and with its own ``FLWR_HOME``."""
    env = dict(os.environ)
    env.update(FLOWER_QUIET_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    # Flower starts its helpers (flower-superexec, flwr-serverapp, ...) by name: they must be
    # this environment's, also when fedgov runs as .venv/bin/fedgov without an activated venv.
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    # Each Ray worker is one thread of torch: two actors on two cores, not four threads each.
    env.setdefault("OMP_NUM_THREADS", "1")
    if extra:
        env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) > 1:
            children.setdefault(int(rest[1]), []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren, ...)."""
    children = _children_map()
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def kill_tree(pid: int, *, grace: float = 5.0, extra: Sequence[int] = ()) -> None:
    """Stop ``pid`` and all its descendants: SIGTERM, wait up to ``grace`` s, then SIGKILL."""
    targets = [pid, *descendants(pid), *extra]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in targets:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
            except PermissionError:  # pragma: no cover - not ours
                log.warning("cannot signal process %s", p)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline and any(_alive(p) for p in targets):
            time.sleep(0.1)
        # Children may have forked while we waited: take them in for the next signal.
        targets = list(dict.fromkeys(targets + [d for p in targets if _alive(p) for d in descendants(p)]))
        if not any(_alive(p) for p in targets):
            return


class ManagedProcess:
    """A child process in its own session whose whole tree is stopped on :meth:`stop`."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
        name: str | None = None,
    ) -> None:
        self.args = list(args)
        self.name = name or Path(self.args[0]).name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = log_path.open("ab")
        self._seen: set[int] = set()
        self.proc = subprocess.Popen(  # noqa: S603 - arguments are ours
            self.args,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.debug("started %s (pid %s)", self.name, self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def remember_descendants(self) -> None:
        """Note the current descendants, so that :meth:`stop` finds re-parented ones too."""
        if self.running():
            self._seen.update(descendants(self.pid))

    def stop(self, grace: float = 5.0) -> None:
        seen = [p for p in self._seen if _alive(p)]
        if self.running() or seen:
            kill_tree(self.pid, grace=grace, extra=seen)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - after SIGKILL
            log.warning("%s (pid %s) did not exit", self.name, self.pid)
        self._log.close()

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def flower_bin(name: str) -> str:
    """A Flower executable from this Python's environment (not some other one on PATH)."""
    from fedgov.errors import FederationError

    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise FederationError(f"'{name}' not found: is flwr installed in this environment?")
    return found


def wait_healthy(url: str, proc: ManagedProcess, *, verify: Any = True, timeout: float = 60.0) -> None:
    """Wait until ``url`` (a SuperLink's ``/health``) answers, while ``proc`` keeps running."""
    import httpx

    from fedgov.errors import FederationError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running():
            raise FederationError(f"the {proc.name} exited at start-up (exit {proc.proc.returncode}):\n{proc.tail()}")
        try:
            if httpx.get(url, timeout=1.0, verify=verify).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise FederationError(f"the {proc.name} did not become ready within {timeout:.0f} s:\n{proc.tail()}")
