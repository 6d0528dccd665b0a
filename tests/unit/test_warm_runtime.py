"""The warm node runtime's parts, without Flower processes: the local channel (socket, lock,
relay), the worker's refusal of a stranger, the shortened waits and the coordinator's reply polling."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

from fedgov.coordinator.grid import PollingGrid, poll_replies
from fedgov.deploy import relay, worker
from fedgov.deploy.clientapp import write_shim
from fedgov.deploy.noderun import Pacer, patch_waits
from fedgov.pacing import FIRST, LONGEST, shorten_object_pulls


# --- the local channel ------------------------------------------------------------------------


def _serve_once(w: worker.Worker, handle: Any, monkeypatch: pytest.MonkeyPatch) -> threading.Thread:
    monkeypatch.setattr(worker, "handle", handle)
    t = threading.Thread(target=w.serve, daemon=True)
    t.start()
    return t


def test_socket_is_private_and_the_relay_gets_the_worker_exit_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rd = Path(relay.run_dir(str(tmp_path)))
    rd.mkdir(mode=0o700)
    w = worker.Worker(tmp_path)
    w.bind()
    path = worker.socket_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_ISSOCK(path.stat().st_mode)
    seen: list[list[str]] = []
    t = _serve_once(w, lambda argv: seen.append(argv) or 7, monkeypatch)
    try:
        argv = ["--runtime-api-address", "127.0.0.1:9", "--token", "secret-token"]
        assert relay.relay(str(tmp_path), argv) == 7
        assert seen == [argv] and w.served == 1
    finally:
        w.stopping.set()
        t.join(5)
    assert not path.exists()  # a stopped worker leaves no socket behind


def test_a_process_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Path(relay.run_dir(str(tmp_path))).mkdir(mode=0o700)
    w = worker.Worker(tmp_path)
    w.bind()
    monkeypatch.setattr(worker, "_peer_uid", lambda conn: os.getuid() + 1)
    called: list[Any] = []
    t = _serve_once(w, lambda argv: called.append(argv) or 0, monkeypatch)
    try:
        # the worker closes the connection without running anything: the relay reports a lost worker
        assert relay.relay(str(tmp_path), ["--token", "x"]) == relay.LOST
        assert called == [] and w.served == 0
    finally:
        w.stopping.set()
        t.join(5)


def test_malformed_requests_are_refused_without_running_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Path(relay.run_dir(str(tmp_path))).mkdir(mode=0o700)
    w = worker.Worker(tmp_path)
    w.bind()
    called: list[Any] = []
    t = _serve_once(w, lambda argv: called.append(argv) or 0, monkeypatch)
    try:
        for payload in (b"not json\n", b'{"no-argv": 1}\n', b'{"argv": 5}\n'):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(worker.socket_path(tmp_path)))
                s.sendall(payload)
                assert json.loads(s.makefile().readline()) == {"exit": 2}
        assert called == []
    finally:
        w.stopping.set()
        t.join(5)


def test_the_lock_says_whether_a_worker_runs(tmp_path: Path) -> None:
    import fcntl

    rd = Path(relay.run_dir(str(tmp_path)))
    assert not relay.worker_running(str(tmp_path))  # no run directory yet
    rd.mkdir(mode=0o700)
    fd = os.open(rd / relay.LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert not relay.worker_running(str(tmp_path))
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert relay.worker_running(str(tmp_path))
    finally:
        os.close(fd)
    assert not relay.worker_running(str(tmp_path))


def test_without_a_worker_the_relay_starts_one_and_then_gives_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Path(relay.run_dir(str(tmp_path))).mkdir(mode=0o700)
    started: list[str] = []
    monkeypatch.setattr(relay, "start_worker", started.append)
    t0 = time.monotonic()
    assert relay.connect(str(tmp_path), timeout=0.3) is None
    assert time.monotonic() - t0 >= 0.3
    assert started == [str(tmp_path)]  # one start, not one per attempt
    # and main() then runs the message cold (Flower's flwr-clientapp with the bundle check)
    monkeypatch.setenv("FEDGOV_NODE_DIR", str(tmp_path))
    monkeypatch.setattr(relay, "relay", lambda node_dir, argv: -1)
    cold: list[list[str]] = []

    def fake_cold(argv: list[str]) -> None:
        cold.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(relay, "cold", fake_cold)
    monkeypatch.setattr(sys, "argv", ["flwr-clientapp", "--token", "t"])
    with pytest.raises(SystemExit):
        relay.main()
    assert cold == [["--token", "t"]]


def test_cold_runtime_skips_the_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGOV_NODE_DIR", str(tmp_path))
    monkeypatch.setenv("FEDGOV_NODE_RUNTIME", "cold")
    monkeypatch.setattr(relay, "relay", lambda *a: pytest.fail("the worker was asked"))
    monkeypatch.setattr(relay, "cold", lambda argv: (_ for _ in ()).throw(SystemExit(0)))
    monkeypatch.setattr(sys, "argv", ["flwr-clientapp", "--token", "t"])
    with pytest.raises(SystemExit):
        relay.main()


def test_bad_arguments_are_an_exit_status_not_a_crash() -> None:
    assert worker.handle(["--no-such-option"]) == 2


def test_the_relay_imports_only_the_standard_library() -> None:
    import ast

    tree = ast.parse(Path(relay.__file__).read_text("utf-8"))
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods - {"__future__"} <= set(sys.stdlib_module_names), mods


def test_the_shim_runs_the_relay_isolated(tmp_path: Path) -> None:
    shim = write_shim(tmp_path / "bin") / "flwr-clientapp"
    text = shim.read_text("utf-8")
    assert f'"{sys.executable}" -I -S "{Path(relay.__file__).resolve()}" "$@"' in text
    assert shim.stat().st_mode & stat.S_IXUSR


# --- shorter waits -----------------------------------------------------------------------------


def test_pacer_replaces_flowers_two_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    p = Pacer(poll_min=0.05, poll_max=0.4, reply_poll=0.02, hot=10.0)
    for _ in range(5):
        p.sleep(3)  # idle: doubling from poll_min to poll_max
    p.sleep(0.5)  # waiting for a reply
    p.sleep(1.25)  # anything else: as asked
    assert slept == [0.05, 0.1, 0.2, 0.4, 0.4, 0.02, 1.25]
    slept.clear()
    p.busy()  # a message arrived: a task runs, the node stays quick
    for _ in range(4):
        p.sleep(3)
    assert slept == [0.05] * 4
    assert p.monotonic() > 0  # everything else is the time module's


def test_patch_waits_installs_the_pacer_only_in_the_loop_it_knows() -> None:
    import inspect

    src = "import time\ndef _pull_and_store_message():\n    return None\ndef loop():\n    time.sleep(3)\n    time.sleep(0.5)\n"
    mod = types.ModuleType("fake_loop")
    exec(compile(src, "fake_loop.py", "exec"), mod.__dict__)  # noqa: S102 - a stand-in for Flower's module
    original = mod._pull_and_store_message
    old_getsource = inspect.getsource
    inspect.getsource = lambda m: src if m is mod else old_getsource(m)  # type: ignore[assignment]
    try:
        pacer = patch_waits(mod)
        assert pacer is not None and mod.time is pacer and mod._pull_and_store_message is not original
        other = types.ModuleType("other")
        other.time = time  # type: ignore[attr-defined]
        assert patch_waits(other) is None and other.time is time  # type: ignore[attr-defined]
    finally:
        inspect.getsource = old_getsource  # type: ignore[assignment]


def test_flowers_supernode_loop_is_the_one_fedgov_shortens() -> None:
    import flwr.supernode.start_client_internal as sci

    before = (sci.time, sci._pull_and_store_message, sci.pull_objects)
    try:
        assert patch_waits(sci) is not None
        assert isinstance(sci.time, Pacer)
        assert sci.pull_objects.keywords == {"initial_backoff": FIRST, "backoff_cap": LONGEST}  # type: ignore[attr-defined]
    finally:
        sci.time, sci._pull_and_store_message, sci.pull_objects = before  # type: ignore[misc]


def test_shorten_object_pulls_passes_flowers_own_parameters() -> None:
    calls: list[dict[str, Any]] = []
    mod = types.ModuleType("m")
    mod.pull_objects = lambda ids, **kw: calls.append(kw) or {}  # type: ignore[attr-defined]
    assert shorten_object_pulls(mod) and shorten_object_pulls(mod)  # twice: wrapped once
    mod.pull_objects(["a"], pull_object_fn=None)  # type: ignore[attr-defined]
    assert calls == [{"initial_backoff": FIRST, "backoff_cap": LONGEST, "pull_object_fn": None}]
    assert not shorten_object_pulls(types.ModuleType("empty"))


# --- the coordinator's wait for replies ---------------------------------------------------------


class _Msg:
    def __init__(self, reply_to: str) -> None:
        self.metadata = types.SimpleNamespace(reply_to_message_id=reply_to)


class _SlowGrid:
    """Replies to message i become available ``delays[i]`` s after the push."""

    def __init__(self, delays: list[float | None]) -> None:
        self.delays = delays
        self.pulls = 0
        self.t0 = 0.0

    def push_messages(self, messages: Any) -> list[str]:
        self.t0 = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids: Any) -> list[_Msg]:
        self.pulls += 1
        now = time.monotonic() - self.t0
        return [_Msg(f"m{i}") for i, d in enumerate(self.delays) if d is not None and f"m{i}" in ids and d <= now]


def test_poll_replies_returns_as_soon_as_all_replies_are_in() -> None:
    g = _SlowGrid([0.0, 0.05, 0.12])
    t0 = time.monotonic()
    replies = poll_replies(g, [1, 2, 3], timeout=30)  # type: ignore[arg-type]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert time.monotonic() - t0 < 5  # bounded far above the 0.12 s + one 0.1 s poll it needs
    assert g.pulls >= 2


def test_poll_replies_gives_up_at_the_timeout_with_what_came() -> None:
    g = _SlowGrid([0.0, None])
    t0 = time.monotonic()
    replies = poll_replies(g, [1, 2], timeout=0.3)  # type: ignore[arg-type]
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert time.monotonic() - t0 >= 0.3


def test_polling_grid_delegates_everything_but_the_wait() -> None:
    inner = types.SimpleNamespace(
        get_node_ids=lambda: [1, 2], run="the-run", push_messages=lambda m: ["m0"],
        pull_messages=lambda ids: [_Msg("m0")], set_run=lambda r: None,
    )
    g = PollingGrid(inner)  # type: ignore[arg-type]
    assert list(g.get_node_ids()) == [1, 2] and g.run == "the-run"
    assert [m.metadata.reply_to_message_id for m in g.send_and_receive([object()], timeout=5)] == ["m0"]  # type: ignore[list-item]


# --- what the attacker review asked for -----------------------------------------------------------


def test_run_dir_that_is_a_link_or_not_ours_stops_the_worker(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    node = tmp_path / "node"
    node.mkdir()
    (node / "run").symlink_to(elsewhere)
    with pytest.raises(SystemExit, match="not a directory of this user"):
        worker._private_run_dir(node)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    rd = worker._private_run_dir(fresh)
    assert stat.S_IMODE(rd.stat().st_mode) == 0o700


def test_a_file_replaced_with_the_same_size_and_mtime_is_hashed_again(tmp_path: Path) -> None:
    from fedgov.node.contracts import file_digest

    f = tmp_path / "data.csv"
    f.write_text("a,b\n1,2\n")
    st = f.stat()
    first = file_digest(f)
    tmp = tmp_path / "new.csv"
    tmp.write_text("a,b\n3,4\n")  # same size
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # same modification time, as cp -p keeps it
    tmp.replace(f)
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert file_digest(f) != first


def test_a_foreign_bundle_runs_in_a_child_whose_failure_is_an_error_not_a_hang(task_identity: None) -> None:
    """A trusted bundle other than the node's own runs in a fresh interpreter; what comes back is
    JSON, never unpickled; a bundle that cannot even be installed gives an error, in bounded time."""
    fab = types.SimpleNamespace(content=b"not a zip", hash_str="0" * 64)
    run = types.SimpleNamespace(fab_id="someone/app", fab_version="1.0.0")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as failed:
        worker.run_foreign(fab, run, {"a": "message"}, {"a": "context"}, timeout=120)
    assert time.monotonic() - t0 < 120
    assert "BadZipFile" in str(failed.value) or "zip" in str(failed.value).lower(), str(failed.value)


def test_the_launcher_check_uses_the_start_time() -> None:
    me = worker._start_time(os.getpid())
    assert me is not None and me == worker._start_time(os.getpid())
    assert worker._start_time(2**22 + 12345) is None  # no such process


def test_a_refused_heartbeat_cancels_only_its_own_task() -> None:
    """Flower raises SIGINT when the SuperNode refuses a task's heartbeat (its run was stopped);
    the worker marks that one task cancelled instead, and its other tasks go on."""
    cancelled = threading.Event()
    refused = types.SimpleNamespace(SendTaskHeartbeat=lambda req: types.SimpleNamespace(success=False))
    accepted = types.SimpleNamespace(SendTaskHeartbeat=lambda req: types.SimpleNamespace(success=True))
    assert worker._heartbeat_fn(accepted, cancelled)() and not cancelled.is_set()
    assert worker._heartbeat_fn(refused, cancelled)() and cancelled.is_set()


def test_a_cancelled_task_stops_waiting_for_its_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """A message whose objects never reach the SuperNode (its run stopped first) is given up as
    soon as the task is cancelled, not after Flower's 500 tries."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError

    cancelled = threading.Event()
    pulls: list[str] = []

    def never_there(object_id: str) -> bytes:
        pulls.append(object_id)
        if len(pulls) == 3:
            cancelled.set()  # the heartbeat came back refused meanwhile
        raise ObjectUnavailableError(object_id)

    import flwr.supercore.inflatable.inflatable_protobuf_utils as ipu

    monkeypatch.setattr(ipu, "make_pull_object_fn_protobuf", lambda *a, **k: never_there)
    tree = types.SimpleNamespace(object_id="o1", children=[])
    client = types.SimpleNamespace(
        PullTaskInput=lambda req: types.SimpleNamespace(task_id=1, run=types.SimpleNamespace(run_id=2), context=None, fab=None),
        PullMessages=lambda req: types.SimpleNamespace(messages_list=[object()], message_object_trees=[tree]),
        PullObject=None, ConfirmMessageReceived=None,
    )
    import flwr.common.serde as serde

    monkeypatch.setattr(serde, "context_from_proto", lambda c: types.SimpleNamespace(node_id=3, run_id=2))
    monkeypatch.setattr(serde, "run_from_proto", lambda r: r)
    monkeypatch.setattr(serde, "fab_from_proto", lambda f: f)
    t0 = time.monotonic()
    with pytest.raises(ObjectPullError, match="cancelled"):
        worker.pull_task_input(client, cancelled)
    assert len(pulls) == 3 and time.monotonic() - t0 < 5


# --- the dispatcher that takes the place of Flower's SuperExec -------------------------------------


def test_runtime_address_comes_from_the_supernode_arguments() -> None:
    from fedgov.deploy.noderun import _runtime_address

    assert _runtime_address(["--superlink", "x:1", "--host", "127.0.0.1", "--port", "9321"]) == "127.0.0.1:9321"
    assert _runtime_address(["--superlink", "x:1"]) == "127.0.0.1:9094"


class _FakeRuntime:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.asked = 0

    def AcquireTask(self, request: Any) -> Any:  # noqa: N802 - Flower's method name
        self.asked += 1
        token = self.tokens.pop(0) if self.tokens else ""
        return types.SimpleNamespace(token=token, HasField=lambda name: bool(token))


def test_dispatcher_hands_each_task_to_the_worker_when_a_message_arrives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedgov.deploy.noderun import Dispatcher

    handed: list[list[str]] = []
    monkeypatch.setattr(relay, "relay", lambda node_dir, argv: handed.append(argv) or 0)
    fake = _FakeRuntime(["tok-1"])
    d = Dispatcher("127.0.0.1:9", str(tmp_path), interval=60.0)  # no polling to speak of: only the wake-up
    monkeypatch.setattr(d, "_client", lambda: fake)
    d.start()
    try:
        deadline = time.monotonic() + 10
        while not handed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handed == [["--runtime-api-address", "127.0.0.1:9", "--token", "tok-1", "--insecure"]]
        asked = fake.asked
        fake.tokens.append("tok-2")
        d.arrived.set()  # the SuperNode stored a message: asked at once, not after 60 s
        while len(handed) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [a[3] for a in handed] == ["tok-1", "tok-2"] and fake.asked > asked
    finally:
        d.stop.set()
        d.arrived.set()


def test_dispatcher_without_a_worker_runs_the_checking_clientapp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from fedgov.deploy.noderun import Dispatcher

    monkeypatch.setattr(relay, "relay", lambda node_dir, argv: -1)
    ran: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append(cmd) or types.SimpleNamespace(returncode=0))
    assert Dispatcher("127.0.0.1:9", str(tmp_path)).dispatch("tok") == 0
    assert ran and ran[0][1:4] == ["-P", "-m", "fedgov.deploy.clientapp"] and "tok" in ran[0]


def test_a_reply_that_is_ready_goes_out_without_waiting_for_the_next_message() -> None:
    """Flower's SuperNode loop pushes replies only after pulling a new message: a late reply (a
    ClientApp that finished after its run was stopped) would go out in place of the next
    message's own reply. With fedgov's loop, a pending reply makes the loop push at once."""
    import inspect

    src = "import time\ndef _pull_and_store_message(**kw):\n    return None\ndef loop():\n    time.sleep(3)\n    time.sleep(0.5)\n"
    mod = types.ModuleType("fake_loop2")
    exec(compile(src, "fake_loop2.py", "exec"), mod.__dict__)  # noqa: S102 - a stand-in for Flower's module
    old_getsource = inspect.getsource
    inspect.getsource = lambda m: src if m is mod else old_getsource(m)  # type: ignore[assignment]
    try:
        assert patch_waits(mod) is not None
    finally:
        inspect.getsource = old_getsource  # type: ignore[assignment]

    # Flower's own node state: a reply waiting is seen, and NOT taken (get_messages_legacy marks
    # what it returns as retrieved: a reply taken by the check was never sent, and the loop then
    # waited for it forever, deaf to every later message: seen after a stopped run)
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 5, 1, 9
    state = InMemoryNodeState(ObjectStoreFactory().store())
    assert mod._pull_and_store_message(state=state) is None  # nothing to push: the loop waits
    ins = Message(RecordDict({"c": ConfigRecord({"i": 1})}), dst_node_id=2, message_type="query")
    ins.metadata.__dict__["_message_id"] = ins.object_id
    late = Message(RecordDict({"c": ConfigRecord({"i": 2})}), reply_to=ins)
    late.metadata.__dict__["_message_id"] = late.object_id
    state.store_message(late)
    assert mod._pull_and_store_message(state=state) is not None  # the loop pushes now
    assert mod._pull_and_store_message(state=state) is not None  # still there: the check took nothing
    assert [m.metadata.message_id for m in state.get_messages_legacy(is_reply=True)] == [late.metadata.message_id]
    assert mod._pull_and_store_message(state=state) is None  # taken by the loop's push: nothing waits
