"""A fedgov node's process: Flower's SuperNode, the warm worker beside it, and shorter waits.

``fedgov node start`` runs ``python -P -m fedgov.deploy.noderun <flower-supernode arguments>``.
This process

1. becomes a *child subreaper* (Linux ``prctl``), so that every process of the node (the
   worker, a worker started again, Flower's SuperExec and ClientApps under ``--runtime cold``)
   stays below it, is stopped with it, and is counted in the node's memory;
2. stops a worker an earlier start left behind, and starts the node's warm worker
   (:mod:`fedgov.deploy.worker`) unless ``FEDGOV_NODE_RUNTIME=cold``; a worker that dies is
   started again at the next message (:func:`fedgov.deploy.relay.connect`);
3. in Flower's SuperNode loop (``flwr.supernode.start_client_internal``, Flower 1.42), whose
   waits no option or environment variable of Flower sets:

   * after an empty pull from the SuperLink it waits ``FEDGOV_SUPERNODE_POLL_MIN`` (0.2 s)
     while a task runs (for ``FEDGOV_SUPERNODE_HOT``, 10 s, after the last message), then
     twice as long each time up to ``FEDGOV_SUPERNODE_POLL_MAX`` (1 s) while the node is idle
     (Flower: 3 s);
   * it looks for a reply every ``FEDGOV_SUPERNODE_REPLY_POLL`` (0.02 s; Flower: 0.5 s), and
     pushes a reply as soon as it is ready, also when no new message came (Flower's loop
     pushes only after it pulled one, so a late reply of a stopped run could go out in place
     of the next message's reply);
   * a message object not yet there is asked for again after 20 ms (:mod:`fedgov.pacing`);

   if the loop is not the one this was written for, it stays Flower's and a warning says so;
4. runs Flower's ``flower-supernode`` in this process, with the given arguments; with the warm
   worker, in Flower's ``process`` isolation, with :class:`Dispatcher` (a thread) in place of
   Flower's SuperExec process: each task's token goes straight to the worker's socket.
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
        self.arrived = threading.Event()  # set when a message has arrived (and its objects with it)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def busy(self) -> None:
        """A message arrived: for the next ``hot`` s (a task is running) empty pulls wait the
        shortest time; after that the wait doubles again."""
        self._idle = self.poll_min
        self._last_message = time.monotonic()
        self.arrived.set()

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
        # Flower's loop pushes replies only after it pulled a new message. A reply that became
        # ready while no message came (a ClientApp that finished after its run was stopped)
        # would otherwise wait for the next message, and be sent in place of that message's
        # own reply. Push it now: the loop does when this returns a run id.
        return -1 if _reply_waiting(kwargs.get("state")) else None

    setattr(module, "time", pacer)  # noqa: B010 - the loop looks the name up at call time
    shorten_object_pulls(module)  # the message's objects, pulled from the SuperLink
    setattr(module, "_pull_and_store_message", pull_and_store)  # noqa: B010
    return pacer


def _reply_waiting(state: Any) -> bool:
    """Whether the SuperNode's state holds a reply not yet taken for sending, looked at without
    taking it: Flower's ``get_messages_legacy`` marks what it returns as retrieved, and a reply
    taken here would never be sent (the loop would then wait for it forever). A state that is
    not Flower 1.42's in-memory one: False (Flower's own behaviour)."""
    store, lock = getattr(state, "msg_store", None), getattr(state, "lock_msg_store", None)
    if not isinstance(store, dict) or lock is None:
        return False
    try:
        with lock:
            return any(not e.is_retrieved and e.message.metadata.reply_to_message_id != "" for e in store.values())
    except AttributeError:  # entries of another shape
        return False


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


def _runtime_address(argv: list[str]) -> str:
    """The SuperNode's Runtime API address from its arguments (``--host``, ``--port``)."""
    host, port = "127.0.0.1", "9094"
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--host":
            host = value
        elif flag == "--port":
            port = value
    return f"{host}:{port}"


class Dispatcher:
    """Flower's SuperExec, for a node with a warm worker, as a thread of the node's process.

    Flower's SuperExec (a process of its own, ~120 MiB) asks the SuperNode for tasks and starts a
    ``flwr-clientapp`` process per task. This thread asks the same Runtime API
    (``AcquireTask``) as soon as the SuperNode's loop has stored a message (and every
    ``FEDGOV_DISPATCH_POLL`` s, 1 s, besides) and hands each task's one-time token straight to the worker over its
    socket (:func:`fedgov.deploy.relay.relay`), in a thread per task; the worker pulls the task,
    checks the bundle and runs it. Without a worker it runs Flower's ``flwr-clientapp`` with the
    bundle check (:mod:`fedgov.deploy.clientapp`) for that task, as the SuperExec would."""

    def __init__(self, runtime_address: str, node_dir: str, *, interval: float = 1.0, arrived: threading.Event | None = None) -> None:
        self.runtime_address, self.node_dir, self.interval = runtime_address, node_dir, interval
        # The SuperNode's loop sets ``arrived`` once a message and its objects are stored
        # (:class:`Pacer`): the task is asked for then, at once; otherwise every ``interval`` s.
        self.arrived = arrived or threading.Event()
        self.stop = threading.Event()
        self.dispatched = 0

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self._loop, name="fedgov-dispatcher", daemon=True)
        t.start()
        return t

    def _client(self) -> Any:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def _loop(self) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        client = None
        request = AcquireTaskRequest(supported_task_types=[str(TaskType.CLIENT_APP)], agentapp_fab_hashes=[])
        while not self.stop.is_set():
            self.arrived.clear()
            try:
                client = client or self._client()
                res = client.AcquireTask(request)
            except Exception as exc:  # noqa: BLE001 - the SuperNode's API is not up yet, or restarts
                log.debug("no task from the SuperNode (%s)", type(exc).__name__)
                client = None
                self.stop.wait(0.5)
                continue
            if res.HasField("task") and res.token:
                self.dispatched += 1
                threading.Thread(target=self.dispatch, args=(str(res.token),), name="fedgov-task", daemon=True).start()
                continue  # another task may be waiting
            self.arrived.wait(self.interval)

    def dispatch(self, token: str) -> int:
        argv = ["--runtime-api-address", self.runtime_address, "--token", token, "--insecure"]
        code = relay.relay(self.node_dir, argv)
        if code >= 0:
            return code
        log.warning("no warm worker answered: this message runs in a fresh process")
        import subprocess

        py = os.environ.get("FEDGOV_PYTHON") or sys.executable
        return subprocess.run([py, "-P", "-m", "fedgov.deploy.clientapp", *argv], check=False, cwd=self.node_dir).returncode


def _dispatcher_available() -> bool:
    try:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor  # noqa: F401
        from flwr.supercore.runtime import RuntimeHttpClient

        return callable(getattr(RuntimeHttpClient, "AcquireTask", None)) and bool(TaskType.CLIENT_APP) and bool(AcquireTaskRequest)
    except ImportError:
        return False


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
    pacer = patch_waits()
    argv = sys.argv[1:]
    warm = bool(node_dir) and os.environ.get("FEDGOV_NODE_RUNTIME", "warm") != "cold"
    if warm and "--isolation" not in argv and _dispatcher_available():
        # The SuperNode starts no SuperExec; this process's dispatcher takes its place.
        argv = [*argv, "--isolation", "process"]
        # Woken by the SuperNode's loop when a message arrived; polling only as a fallback
        # (every 1 s, or every 0.1 s where Flower's loop could not be hooked).
        poll = _env_float("FEDGOV_DISPATCH_POLL", 1.0 if pacer is not None else 0.1)
        Dispatcher(_runtime_address(argv), node_dir, interval=poll, arrived=pacer.arrived if pacer is not None else None).start()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main()
