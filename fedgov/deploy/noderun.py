"""A fedgov node's process: Flower's SuperNode, the warm worker beside it, and shorter waits.

``fedgov node start`` runs ``python -m fedgov.deploy.noderun <flower-supernode arguments>``.
This process

1. becomes a *child subreaper* (Linux ``prctl``), so that every process of the node (Flower's
   SuperExec, the relays, a worker a relay restarted) stays below it, is stopped with it, and
   is counted in the node's memory;
2. starts the node's warm worker (:mod:`fedgov.deploy.worker`) unless
   ``FEDGOV_NODE_RUNTIME=cold``; a worker that dies is started again by the next message's
   relay (:mod:`fedgov.deploy.relay`);
3. shortens the two fixed waits of Flower's SuperNode loop (``flwr.supernode.start_client_internal``
   in Flower 1.42: 3 s after every empty pull from the SuperLink, 0.5 s between looks for a
   reply), which no option or environment variable of Flower sets, and its wait for a message's
   objects (:mod:`fedgov.pacing`): an empty pull is followed
   by a wait of ``FEDGOV_SUPERNODE_POLL_MIN`` (0.2 s) while a task runs (for
   ``FEDGOV_SUPERNODE_HOT``, 10 s, after the last message), which then doubles to at most
   ``FEDGOV_SUPERNODE_POLL_MAX`` (1 s) while the node is idle; a
   reply is looked for every ``FEDGOV_SUPERNODE_REPLY_POLL`` (0.02 s). If Flower's loop is not
   the one this was written for, the waits stay Flower's and a warning says so;
4. runs Flower's ``flower-supernode`` in this process, with the given arguments.
"""

from __future__ import annotations

import ctypes
import inspect
import logging
import os
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

from fedgov.deploy import relay
from fedgov.pacing import shorten_object_pulls

__all__ = ["Pacer", "main", "patch_waits"]

log = logging.getLogger("fedgov.node")
PR_SET_CHILD_SUBREAPER = 36


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class Pacer:
    """Stands in for the ``time`` module in Flower's SuperNode loop: the same module, with its
    two fixed sleeps replaced by a backoff (idle pulls) and a short poll (replies)."""

    def __init__(self, *, poll_min: float = 0.2, poll_max: float = 1.0, reply_poll: float = 0.02, hot: float = 10.0) -> None:
        self.poll_min, self.poll_max, self.reply_poll, self.hot = poll_min, poll_max, reply_poll, hot
        self._idle = poll_min
        self._last_message = -float("inf")

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def busy(self) -> None:
        """A message arrived: for the next ``hot`` s (a task is running) empty pulls wait the
        shortest time; after that the wait doubles again."""
        self._idle = self.poll_min
        self._last_message = time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds == 3:  # an empty pull from the SuperLink
            if time.monotonic() - self._last_message < self.hot:
                time.sleep(self.poll_min)
                return
            wait, self._idle = self._idle, min(self.poll_max, self._idle * 2)
            time.sleep(wait)
        elif seconds == 0.5:  # waiting for the ClientApp's reply
            time.sleep(self.reply_poll)
        else:
            time.sleep(seconds)


def patch_waits(module: types.ModuleType | None = None, pacer: Pacer | None = None) -> Pacer | None:
    """Install a :class:`Pacer` in Flower's SuperNode loop; ``None`` (and a warning) if the
    loop is not Flower 1.42's."""
    if module is None:
        import flwr.supernode.start_client_internal as sci

        module = sci
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        source = ""
    pull = getattr(module, "_pull_and_store_message", None)
    if getattr(module, "time", None) is not time or "time.sleep(3)" not in source or "time.sleep(0.5)" not in source or not callable(pull):
        log.warning("Flower's SuperNode loop is not the one fedgov shortens (Flower 1.42): its waits stay 3 s and 0.5 s")
        return None
    pacer = pacer or Pacer(
        poll_min=_env_float("FEDGOV_SUPERNODE_POLL_MIN", 0.2),
        poll_max=_env_float("FEDGOV_SUPERNODE_POLL_MAX", 1.0),
        reply_poll=_env_float("FEDGOV_SUPERNODE_REPLY_POLL", 0.02),
        hot=_env_float("FEDGOV_SUPERNODE_HOT", 10.0),
    )

    def pull_and_store(*args: Any, **kwargs: Any) -> Any:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            pacer.busy()
        return run_id

    setattr(module, "time", pacer)  # noqa: B010 - the loop looks the name up at call time
    shorten_object_pulls(module)  # the message's objects, pulled from the SuperLink
    setattr(module, "_pull_and_store_message", pull_and_store)  # noqa: B010
    return pacer


def _subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _reap_orphans() -> None:
    """Collect the exit status of orphans re-parented to this subreaper (no zombies)."""

    def reap() -> None:
        while True:
            time.sleep(2.0)
            try:
                while True:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                    if pid == 0:
                        break
            except ChildProcessError:
                pass

    threading.Thread(target=reap, name="fedgov-reaper", daemon=True).start()


def stop_stale_worker(node_dir: str) -> int | None:
    """Stop a worker an earlier run of this node left behind (its pid in ``run/worker.pid``,
    its command line checked), so that this node's worker runs this installation's code."""
    import signal

    try:
        pid = int((Path(relay.run_dir(node_dir)) / "worker.pid").read_text("utf-8").strip())
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return None
    if "fedgov.deploy.worker" not in cmd or node_dir not in cmd or pid == os.getpid():
        return None
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and relay.worker_running(node_dir):
        time.sleep(0.05)
    log.warning("stopped a worker an earlier start of this node left running (pid %d)", pid)
    return pid


def _logging() -> None:
    """fedgov's lines and Flower's, once each, with timestamps, without colour codes."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
    fedgov_log = logging.getLogger("fedgov")
    fedgov_log.addHandler(handler)
    fedgov_log.setLevel(logging.INFO)
    fedgov_log.propagate = False
    import flwr.common.logger  # noqa: F401 - sets up Flower's console handler

    for h in logging.getLogger("flwr").handlers:
        if hasattr(h, "timestamps"):
            setattr(h, "timestamps", True)  # noqa: B010 - Flower's ConsoleHandler
            setattr(h, "colored", False)  # noqa: B010


def main() -> None:
    _logging()
    if _subreaper():
        _reap_orphans()
    os.environ["FEDGOV_NODE_LAUNCHER_PID"] = str(os.getpid())
    node_dir = os.environ.get("FEDGOV_NODE_DIR", "")
    if node_dir:
        stop_stale_worker(node_dir)
    if node_dir and os.environ.get("FEDGOV_NODE_RUNTIME", "warm") != "cold":
        relay.start_worker(node_dir)
    patch_waits()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *sys.argv[1:]]
    flower_supernode()


if __name__ == "__main__":
    main()
