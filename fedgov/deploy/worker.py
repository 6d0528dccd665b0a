"""The node's warm runtime: one long-lived process that runs the ClientApp for every message.

Flower 1.42 starts a fresh ``flwr-clientapp`` process per message; each one imports torch,
Opacus, Flower and fedgov, installs the app bundle and reads, validates and encodes the
node's data again (seconds per message). A fedgov node instead runs this worker beside its
SuperNode (:mod:`fedgov.deploy.noderun` starts it with the node). It has done its imports,
and keeps, between messages, what the node's own process caches keep: the validated and
encoded data (read again only when a file's SHA-256 changes, :func:`fedgov.node.rounds.prepare`),
the parsed tasks and contracts, and the accountant's cached evaluations. The ledger and the
audit log (SQLite, on disk) stay the source of truth: every message reads and writes them as
before, so a worker that dies loses nothing that was committed, and a new one doubles nothing.

Each task's one-time token reaches the worker from the node's process
(:class:`fedgov.deploy.noderun.Dispatcher`, through :func:`fedgov.deploy.relay.relay`) over a
Unix socket that only the node's user can open (``run/`` has mode 0700, the socket 0600, and
the peer's uid is checked). The worker then does what Flower's ``flwr-clientapp`` does
(:func:`run_task`): it pulls the message with the token, **checks the app bundle against the node's policy before
anything of the message is handled** (:func:`fedgov.deploy.clientapp.check_pulled`), runs
the ClientApp and pushes the reply and the node's Flower state.

The ClientApp it runs warm is the node's own fedgov app, the bundle whose hash is the local
one (``FEDGOV_APP_HASH``, what ``"fedgov"`` in ``accept.apps`` stands for). Any other bundle the
policy trusts runs as Flower runs it: installed and loaded in a fresh interpreter, here a
child process the worker starts for that message.

Tasks are pulled and answered in parallel, their ClientApps run one at a time, each for at
most ``FEDGOV_WORKER_MESSAGE_TIMEOUT`` s (3600; past it the worker exits and the next message
starts a new one); a task the SuperNode cancels (its run was stopped) ends without a reply,
and the worker goes on. A worker holds ``run/worker.lock`` for its whole life, so two never
serve one node, and it exits when the node's launcher (``FEDGOV_NODE_LAUNCHER_PID``, checked
with its start time) is gone.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedgov.deploy.relay import LOCK, SOCKET, run_dir

__all__ = ["Worker", "main", "run_task", "socket_path", "warm_up"]

log = logging.getLogger("fedgov.node")


def socket_path(node_dir: Path | str) -> Path:
    return Path(run_dir(str(node_dir))) / SOCKET


def _local_hash() -> str:
    env = os.environ.get("FEDGOV_APP_HASH")
    if env:
        return env
    from fedgov.deploy.trust import local_bundle_hash

    os.environ["FEDGOV_APP_HASH"] = value = local_bundle_hash()
    return value


def warm_up(node_dir: Path) -> dict[str, float]:
    """Import what every message needs and check the node's data once; seconds per step."""
    times: dict[str, float] = {}
    t = time.monotonic()
    import flwr.supernode.runtime.run_clientapp  # noqa: F401
    import opacus  # noqa: F401 - the DP-SGD engine, imported once here rather than per message

    import torch

    import clients.app  # noqa: F401 - torch, fedgov.node and the mods

    # torch imports its compiler stack (torch._dynamo, 0.7 s) when the first optimizer is made.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    times["imports"] = time.monotonic() - t
    t = time.monotonic()
    _local_hash()
    times["bundle hash"] = time.monotonic() - t
    t = time.monotonic()
    from fedgov.node.contracts import check_all
    from fedgov.node.home import NodeHome

    home = NodeHome(node_dir)
    if home.exists():
        try:
            for check, _path in check_all(home):
                if not check.conforms:
                    log.warning("data set '%s' does not conform to %s: tasks on it are refused", check.dataset, check.contract)
        except Exception as exc:  # noqa: BLE001 - a bad policy is reported per message, as without the worker
            log.warning("the node's data could not be checked at start: %s", type(exc).__name__)
    times["data check"] = time.monotonic() - t
    return times


def _foreign_child(conn: Any, fab_content: bytes, fab_id: str, fab_version: str, fab_hash: str,
                   ids: tuple[int, int, int], message: Any, context: Any) -> None:
    """In a fresh interpreter: install a trusted bundle that is not this node's own fedgov and
    run it, as Flower would. Sends back JSON (protobuf bytes in base64): nothing of the bundle's
    own types reaches the worker, which never unpickles what this process says."""
    import base64

    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.serde import context_to_proto, recorddict_to_proto
    from flwr.supercore.task_identity import TaskIdentity

    out: dict[str, Any]
    try:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = ids
        installed = install_from_fab(fab_content, skip_prompt=True)
        app = get_load_client_app_fn(default_app_ref="", app_path=str(installed), multi_app=True)(fab_id, fab_version, fab_hash)
        reply = app(message=message, context=context)
        out = {"context": base64.b64encode(context_to_proto(context).SerializeToString()).decode()}
        if reply.has_error():
            out["error"] = [int(reply.error.code), str(reply.error.reason)]
        else:
            out["content"] = base64.b64encode(recorddict_to_proto(reply.content).SerializeToString()).decode()
    except Exception as ex:  # noqa: BLE001 - reported as Flower reports a ClientApp's exception
        out = {"exception": str(type(ex)) + ":<'" + str(ex) + "'>"}
    conn.send_bytes(json.dumps(out).encode())
    conn.close()


def run_foreign(fab: Any, run: Any, message: Any, context: Any, timeout: float) -> tuple[Any, Any]:
    """Run a trusted bundle other than this node's own in a child interpreter; (reply, context).

    The child gets ``timeout`` s; a child that dies, hangs or answers garbage gives an error
    reply, and the worker goes on."""
    import base64
    import multiprocessing

    from flwr.app import Error, Message
    from flwr.common.serde import context_from_proto, recorddict_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
    from flwr.supercore.task_identity import TaskIdentity

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    ids = (TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id)
    proc = ctx.Process(target=_foreign_child, args=(child, fab.content, run.fab_id, run.fab_version, fab.hash_str, ids, message, context),
                       daemon=True)
    proc.start()
    child.close()
    reason = "the app bundle's process ended without an answer"
    try:
        if parent.poll(timeout):
            answer = json.loads(parent.recv_bytes(64 << 20))
            if "exception" in answer:
                reason = str(answer["exception"])
            else:
                ctx_proto = ProtoContext()
                ctx_proto.ParseFromString(base64.b64decode(answer["context"]))
                new_context = context_from_proto(ctx_proto)
                if "error" in answer:
                    code, text = answer["error"]
                    return Message(Error(code=int(code), reason=str(text)), reply_to=message), new_context
                content = ProtoRecordDict()
                content.ParseFromString(base64.b64decode(answer["content"]))
                return Message(recorddict_from_proto(content), reply_to=message), new_context
        else:
            reason = f"the app bundle's process gave no answer within {timeout:.0f} s"
    except (EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        reason = f"the app bundle's process answered what is not a reply ({type(exc).__name__})"
    finally:
        proc.join(1.0)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)
        parent.close()
    raise RuntimeError(reason) from None


PULL_TIMEOUT = float(os.environ.get("FEDGOV_WORKER_PULL_TIMEOUT", "120"))
"""Seconds a message's objects may take to reach the SuperNode (Flower's own limit: 2 hours)."""


def pull_task_input(client: Any, cancelled: threading.Event | None = None) -> tuple[Any, Any, Any, Any, tuple[int, int, int]]:
    """Flower's ``pull_task_input`` (1.42), asking again for a message object that is not
    there yet after 20 ms rather than 1 s (:mod:`fedgov.pacing`), for at most
    :data:`PULL_TIMEOUT` s, and giving up as soon as the task is ``cancelled`` (the message of
    a run stopped before its objects arrived would otherwise be waited for)."""
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.app import Message
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, pull_and_inflate_object_from_tree

    from fedgov.pacing import FIRST, LONGEST

    res = client.PullTaskInput(PullTaskInputRequest())
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    pull = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)

    def pull_unless_cancelled(object_id: str) -> bytes:
        if cancelled is not None and cancelled.is_set():
            raise ObjectPullError(object_id, "the task was cancelled")
        return pull(object_id)

    message = pull_and_inflate_object_from_tree(
        tree,
        pull_unless_cancelled,
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        max_time=PULL_TIMEOUT,
        initial_backoff=FIRST,
        backoff_cap=LONGEST,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab, (int(res.task_id), int(res.run.run_id), int(res.context.node_id))


MESSAGE_TIMEOUT = float(os.environ.get("FEDGOV_WORKER_MESSAGE_TIMEOUT", "3600"))
"""Seconds one message may take; a worker past it exits (the next message starts a new one)."""


class TaskCancelled(Exception):
    """The SuperNode refused the task's heartbeat (its run was stopped): stop handling it."""


_APP_LOCK = threading.Lock()
"""One ClientApp at a time: pulls and pushes of several tasks overlap, their work does not."""
_APP_SINCE: list[float] = []
"""When the ClientApp now running started (empty when none runs): for the watchdog."""


def _heartbeat_fn(client: Any, cancelled: threading.Event) -> Any:
    """Flower's task heartbeat (``make_task_heartbeat_fn_http``, 1.42), except that a refused
    heartbeat (the task's run was stopped) marks this task ``cancelled`` instead of raising
    SIGINT, which ends a fresh ``flwr-clientapp`` but would reach the worker's other tasks."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    request = SendTaskHeartbeatRequest()

    def fn() -> bool:
        try:
            res = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT):
                return False
            raise
        if not res.success:
            cancelled.set()
        return True

    return fn


def run_task(runtime_api_address: str, token: str, insecure: bool, certificates: bytes | None) -> int:
    """Flower's ``run_clientapp`` (1.42) for one task, in this warm process: pull, check the
    bundle, run, push. Returns the exit status ``flwr-clientapp`` would have had."""
    import flwr.supernode.runtime.run_clientapp as rc
    from flwr.app import Message
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
    from flwr.app.error import Error
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.exit import ExitCode

    from fedgov.deploy.clientapp import check_pulled

    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=certificates,
        interceptors=[
            RuntimeTracingInterceptor(),
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retry_invoker,
    )
    heartbeat = None
    message = reply = context = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    exit_code = ExitCode.SUCCESS
    cancelled = threading.Event()
    try:
        heartbeat = HeartbeatSender(_heartbeat_fn(client, cancelled))
        heartbeat.start()
        message, context, run, fab, ids = pull_task_input(client, cancelled)
        # Before anything of the message is handled: is this bundle one the policy trusts?
        check_pulled(message, context, run, fab.content)
        with _APP_LOCK:
            if cancelled.is_set():
                raise TaskCancelled
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = ids
            _APP_SINCE.append(time.monotonic())
            try:
                if hashlib.sha256(fab.content).hexdigest() == _local_hash():
                    from clients.app import app

                    reply = app(message=message, context=context)
                else:
                    reply, context = run_foreign(fab, run, message, context, MESSAGE_TIMEOUT)
            finally:
                _APP_SINCE.clear()
        if cancelled.is_set():
            raise TaskCancelled
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - as Flower's flwr-clientapp: an error reply, the node goes on
        if isinstance(ex, TaskCancelled) or cancelled.is_set():
            # The SuperNode said the task is over (its run was stopped): as Flower's own
            # flwr-clientapp, which exits then, no reply is sent; the worker goes on.
            log.info("task cancelled by the SuperNode (its run was stopped)")
            sub_status, details, reply = SubStatus.FAILED, "ClientApp task cancelled", None
            return _finish(client, retry_invoker, heartbeat, context, sub_status, details, int(ExitCode.TASK_PROC_EXCEPTION))
        e_code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        reason = str(type(ex)) + ":<'" + str(ex) + "'>"
        if isinstance(ex, LoadClientAppError):
            reason, e_code = "An exception was raised when attempting to load `ClientApp`", ErrorCode.LOAD_CLIENT_APP_EXCEPTION
        log.error("ClientApp raised %s", type(ex).__name__)
        sub_status, details = SubStatus.FAILED, reason
        if message is not None:
            reply = Message(Error(code=e_code, reason=reason), reply_to=message)
        exit_code = ExitCode.COMMON_APP_IMPORT_ERROR if isinstance(ex, ImportError) else ExitCode.TASK_PROC_EXCEPTION
    if reply is not None and context is not None:
        try:
            rc.push_message(client, reply, context)
        except Exception as ex:  # noqa: BLE001
            log.error("failed to push the reply: %s", type(ex).__name__)
            exit_code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
    return _finish(client, retry_invoker, heartbeat, context, sub_status, details, int(exit_code))


def _finish(client: Any, retry_invoker: Any, heartbeat: Any, context: Any, sub_status: str, details: str, code: int) -> int:
    """Tell the SuperNode the task ended (and its Flower state), stop its heartbeat."""
    import flwr.supernode.runtime.run_clientapp as rc

    retry_invoker.max_tries = 1
    try:
        rc.push_task_output(client=client, context=context, sub_status=sub_status, details=details)
    finally:
        if heartbeat is not None and heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return code


def handle(argv: list[str]) -> int:
    """One ``flwr-clientapp`` command line, as the relay received it."""
    from flwr.common.args import try_obtain_flwr_app_token
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.cli.flwr_clientapp import _parse_args_run_flwr_clientapp

    try:
        args = _parse_args_run_flwr_clientapp().parse_args(argv)
        token = try_obtain_flwr_app_token(args)
        certs = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
    except SystemExit as exc:
        log.error("flwr-clientapp arguments not understood")
        return int(exc.code) if isinstance(exc.code, int) else 2
    return run_task(args.runtime_api_address, token, bool(args.insecure), certs)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class Worker:
    """The serving loop: a thread per connection (one task each). Pulling a task's message and
    pushing its reply overlap between tasks; their ClientApps run one at a time
    (:data:`_APP_LOCK`), so a message that never arrives (its run was stopped) holds up no other."""

    def __init__(self, node_dir: Path) -> None:
        self.node_dir = node_dir
        self.stopping = threading.Event()
        self.served = 0
        self._count = threading.Lock()
        self._sock: socket.socket | None = None

    def bind(self) -> socket.socket:
        path = socket_path(self.node_dir)
        path.unlink(missing_ok=True)  # a stale socket of a dead worker: the lock says none runs
        old = os.umask(0o177)
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        s.listen(16)
        s.settimeout(0.5)
        self._sock = s
        return s

    def serve(self) -> None:
        s = self._sock or self.bind()
        while not self.stopping.is_set():
            try:
                conn, _ = s.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            threading.Thread(target=self._connection, args=(conn,), name="fedgov-task", daemon=True).start()
        s.close()
        socket_path(self.node_dir).unlink(missing_ok=True)

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10.0)  # the request line comes at once, or not at all
            try:
                if _peer_uid(conn) != os.getuid():
                    log.error("a process of another user connected to the worker's socket: refused")
                    return
                code = self._one(conn)
                conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
            except OSError:
                return

    def _one(self, conn: socket.socket) -> int:
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                return 2
            buf += chunk
            if len(buf) > 1 << 20:
                return 2
        try:
            argv = [str(a) for a in json.loads(buf)["argv"]]
        except (ValueError, KeyError, TypeError):
            return 2
        conn.settimeout(None)
        t = time.monotonic()
        code = self._handle(argv)
        with self._count:
            self.served += 1
            n = self.served
        _trim()
        log.info("message %d handled in %.3f s (exit %d)", n, time.monotonic() - t, code)
        return code

    def _handle(self, argv: list[str]) -> int:
        profile = os.environ.get("FEDGOV_WORKER_PROFILE")
        if profile:  # where a message's time goes: one cProfile file per message, <prefix>.<pid>.<n>
            import cProfile

            prof = cProfile.Profile()
            code = prof.runcall(handle, argv)
            prof.dump_stats(f"{profile}.{os.getpid()}.{self.served + 1}")
            return int(code)
        return handle(argv)


def _trim() -> None:
    """Give the memory a message freed back to the system (glibc keeps it otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _start_time(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/<pid>/stat), which a reused pid does not share."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[19]


def _watch(worker: Worker) -> None:
    """The worker ends (at once, even mid-message) when the node's launcher is gone, and when
    one message has run longer than :data:`MESSAGE_TIMEOUT` (the next message starts a new
    worker). What a message committed to the ledger and the audit log stays; SQLite rolls back
    what it had not."""
    pid = int(os.environ.get("FEDGOV_NODE_LAUNCHER_PID", "0") or 0)
    born = _start_time(pid) if pid > 0 else None

    def watch() -> None:
        while True:
            if pid > 0 and _start_time(pid) != born:
                log.info("the node's launcher (pid %d) is gone: the worker stops", pid)
                os._exit(0)
            since = _APP_SINCE[0] if _APP_SINCE else None
            if since is not None and time.monotonic() - since > MESSAGE_TIMEOUT:
                log.error("a message has run for more than %.0f s: the worker stops, the next message starts a new one", MESSAGE_TIMEOUT)
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, name="fedgov-worker-watch", daemon=True).start()


def _private_run_dir(node_dir: Path) -> Path:
    """``<node-dir>/run``: a real directory of this user, mode 0700 (made if missing)."""
    rd = Path(run_dir(str(node_dir)))
    try:
        rd.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    st = os.lstat(rd)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise SystemExit(f"{rd} is not a directory of this user (a link, or another owner): the worker does not start")
    os.chmod(rd, 0o700)
    return rd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedgov.deploy.worker", description="a fedgov node's warm ClientApp runtime")
    ap.add_argument("--node-dir", required=True)
    args = ap.parse_args(argv)
    node_dir = Path(args.node_dir).resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    rd = _private_run_dir(node_dir)
    lock_fd = os.open(rd / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log.info("a worker already serves %s", node_dir)
        return 0
    os.environ["FEDGOV_NODE_DIR"] = str(node_dir)
    worker = Worker(node_dir)
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stopping.set())
    _watch(worker)
    (rd / "worker.pid").write_text(str(os.getpid()), encoding="utf-8")
    t = time.monotonic()
    times = warm_up(node_dir)
    worker.bind()
    log.info("warm worker ready in %.1f s (%s), pid %d", time.monotonic() - t,
             ", ".join(f"{k} {v:.2f} s" for k, v in times.items()), os.getpid())
    worker.serve()
    (rd / "worker.pid").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
