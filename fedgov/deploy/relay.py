"""The node's ``flwr-clientapp``: hand Flower's ClientApp task to the node's warm worker.

Flower's SuperExec starts ``flwr-clientapp --runtime-api-address ... --token ...`` for every
message a SuperNode receives. fedgov puts this relay first on the SuperNode's ``PATH`` (see
:func:`fedgov.deploy.clientapp.write_shim`). It runs with ``python -I -S`` (the standard
library only, about 20 ms) and passes its arguments, over the worker's Unix socket
(``<node-dir>/run/worker.sock``: a directory of mode 0700, a socket of mode 0600, and the
worker checks the caller's uid), to the node's long-lived worker
(:mod:`fedgov.deploy.worker`). The worker pulls the message with the token, checks the app
bundle against the node's policy before anything else, runs the ClientApp and pushes the
reply; the relay exits with the worker's exit status.

If no worker answers, the relay starts one (one at a time: the worker holds
``run/worker.lock`` for its whole life) and waits for it. If that fails too, or
``FEDGOV_NODE_RUNTIME=cold``, it runs Flower's own ``flwr-clientapp`` with the bundle check
(:mod:`fedgov.deploy.clientapp`) in its place: slower, never unchecked.

This file imports nothing outside Python's standard library, on purpose.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time

SOCKET = "worker.sock"
LOCK = "worker.lock"
START_TIMEOUT = float(os.environ.get("FEDGOV_WORKER_START_TIMEOUT", "90"))
# The exit status when the worker's connection broke before it answered (the worker died).
LOST = 75


def _python() -> str:
    return os.environ.get("FEDGOV_PYTHON") or sys.executable


def run_dir(node_dir: str) -> str:
    return os.path.join(node_dir, "run")


def worker_running(node_dir: str) -> bool:
    """Whether a worker holds the node's worker lock (it may still be importing)."""
    path = os.path.join(run_dir(node_dir), LOCK)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def start_worker(node_dir: str) -> None:
    """Start a worker for ``node_dir`` in the background (it exits at once if one runs)."""
    os.makedirs(os.path.join(node_dir, "logs"), mode=0o700, exist_ok=True)
    log = open(os.path.join(node_dir, "logs", "worker.log"), "ab")  # noqa: SIM115 - handed to the child
    try:
        subprocess.Popen(  # noqa: S603 - our own interpreter and module
            # -P: the node directory (the working directory) is not put on the module path
            [_python(), "-P", "-m", "fedgov.deploy.worker", "--node-dir", node_dir],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=node_dir, close_fds=True,
        )
    finally:
        log.close()


def connect(node_dir: str, timeout: float) -> socket.socket | None:
    """A connection to the node's worker, starting one if none runs; ``None`` after ``timeout`` s."""
    path = os.path.join(run_dir(node_dir), SOCKET)
    deadline = time.monotonic() + timeout
    started = False
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
        if time.monotonic() >= deadline:
            return None
        if not started and not worker_running(node_dir):
            start_worker(node_dir)
            started = True
        time.sleep(0.05)


def relay(node_dir: str, argv: list[str]) -> int:
    """Hand ``argv`` to the worker: its exit status; :data:`LOST` when the worker went away
    before it answered; -1 when no worker answers at all."""
    s = connect(node_dir, START_TIMEOUT)
    if s is None:
        return -1
    buf = b""
    with s:
        try:
            s.sendall(json.dumps({"argv": argv, "pid": os.getpid()}).encode() + b"\n")
            while not buf.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    return LOST
                buf += chunk
        except OSError:  # the worker went away (or refused this caller)
            return LOST
    try:
        return int(json.loads(buf)["exit"])
    except (ValueError, KeyError, TypeError):
        return LOST


def cold(argv: list[str]) -> None:
    """Flower's ``flwr-clientapp`` with fedgov's bundle check, in this process."""
    py = _python()
    os.execv(py, [py, "-P", "-m", "fedgov.deploy.clientapp", *argv])


def main() -> None:
    argv = sys.argv[1:]
    node_dir = os.environ.get("FEDGOV_NODE_DIR", "")
    if not node_dir or os.environ.get("FEDGOV_NODE_RUNTIME", "warm") == "cold":
        cold(argv)
    code = relay(node_dir, argv)
    if code < 0:
        sys.stderr.write("fedgov: no warm worker answered; running this message in a fresh process\n")
        cold(argv)
    sys.exit(code)


if __name__ == "__main__":
    main()
