"""Node operator state: the pause switch and the manual approval queue, shared through SQLite."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from fedgov.errors import FedgovError
from fedgov.node.state import FILENAME, NodeState
from fedgov.errors import NodeStateError, TaskChanged, UnknownTask

SUMMARY = {
    "task": "adult-income",
    "contract": "adult-income@1.0",
    "dataset": "adult",
    "epsilon": 2.0,
    "delta": 1e-5,
    "rounds": 10,
    "model": "logreg",
    "coordinator": "vng",
}


@pytest.fixture()
def state(tmp_path: Path) -> NodeState:
    return NodeState(tmp_path / "node" / "state.sqlite")


def test_a_node_directory_gets_the_default_file_name(tmp_path: Path) -> None:
    s = NodeState(tmp_path)
    assert s.path == tmp_path / FILENAME and s.path.is_file()
    mode = sqlite3.connect(s.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_pause_and_resume(state: NodeState) -> None:
    assert state.paused() == (False, "")
    state.pause("audit by the privacy officer")
    assert state.paused() == (True, "audit by the privacy officer")
    state.pause()
    assert state.paused() == (True, "")
    state.resume()
    assert state.paused() == (False, "")


def test_a_running_node_sees_a_pause_without_restart(state: NodeState) -> None:
    daemon = NodeState(state.path)  # the node daemon, opened long before
    assert daemon.paused()[0] is False
    operator = NodeState(state.path)  # `fedgov node pause`, another process
    operator.pause("maintenance")
    assert daemon.paused() == (True, "maintenance")
    operator.resume()
    assert daemon.paused() == (False, "")


def test_enqueue_pending_approve(state: NodeState) -> None:
    t = state.enqueue("task-1", summary=SUMMARY)
    assert t.task_id == "task-1" and t.status == "pending" and t.summary == SUMMARY
    assert t.decided_at is None
    assert state.status("task-1") == "pending"
    assert [p.task_id for p in state.pending()] == ["task-1"]
    a = state.approve("task-1", by="fg@gemeente.nl")
    assert a.status == "approved" and a.decided_by == "fg@gemeente.nl" and a.decided_at is not None
    assert state.status("task-1") == "approved"
    assert state.pending() == []
    assert [t.task_id for t in state.tasks("approved")] == ["task-1"]


def test_reject_records_the_reason(state: NodeState) -> None:
    state.enqueue("task-2", summary=SUMMARY)
    r = state.reject("task-2", "epsilon too high for this quarter", by="fg")
    assert r.status == "rejected" and r.reason == "epsilon too high for this quarter"
    assert state.status("task-2") == "rejected"
    assert state.get("task-2") == r


def test_enqueue_is_idempotent_and_keeps_the_decision(state: NodeState) -> None:
    first = state.enqueue("task-3", summary=SUMMARY)
    again = state.enqueue("task-3", summary=dict(reversed(list(SUMMARY.items()))))  # same content
    assert again == first
    assert len(state.pending()) == 1
    state.approve("task-3")
    assert state.enqueue("task-3", summary=SUMMARY).status == "approved"  # not reset to pending


def test_the_same_id_with_another_summary_is_refused(state: NodeState) -> None:
    state.enqueue("task-4", summary=SUMMARY)
    state.approve("task-4")
    with pytest.raises(TaskChanged, match="task-4"):
        state.enqueue("task-4", summary={**SUMMARY, "epsilon": 9.0})
    assert state.get("task-4") is not None and state.get("task-4").summary["epsilon"] == 2.0  # type: ignore[union-attr]


def test_unknown_tasks(state: NodeState) -> None:
    assert state.status("nope") == "none"
    assert state.get("nope") is None
    with pytest.raises(UnknownTask, match="nope"):
        state.approve("nope")
    with pytest.raises(UnknownTask):
        state.reject("nope", "no")
    assert issubclass(UnknownTask, FedgovError)


def test_summaries_hold_no_tables(state: NodeState) -> None:
    with pytest.raises(NodeStateError, match="never data"):
        state.enqueue("t", summary={"rows": [{"age": 39, "income": ">50K"}]})
    state.enqueue("t", summary={"features": ["age", "sex"], "epsilon": 1.0})


def test_concurrent_enqueue_from_threads(state: NodeState) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        try:
            s = NodeState(state.path)
            barrier.wait()
            for j in range(10):
                s.enqueue(f"task-{j}", summary=SUMMARY)  # all threads race on the same ids
                s.enqueue(f"own-{i}-{j}", summary={**SUMMARY, "n": i})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ids = [p.task_id for p in state.pending()]
    assert len(ids) == len(set(ids)) == 10 + 8 * 10


def test_a_corrupted_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "state.sqlite"
    bad.write_bytes(b"this is not a database, just some text " * 200)
    with pytest.raises(NodeStateError) as ei:
        NodeState(bad)
    assert str(bad) in str(ei.value)
    assert "move it aside" in str(ei.value)


def test_a_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "ledger.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE spend (x)")
    conn.close()
    with pytest.raises(NodeStateError, match="another application"):
        NodeState(other)


def test_a_file_corrupted_after_opening_is_reported_at_the_next_call(tmp_path: Path) -> None:
    s = NodeState(tmp_path / "s.sqlite")
    s.pause("x")
    s.path.write_bytes(b"\0garbage" * 1000)
    for suffix in ("-wal", "-shm"):
        Path(str(s.path) + suffix).unlink(missing_ok=True)
    with pytest.raises(NodeStateError, match=str(s.path)):
        s.paused()


def test_a_kept_connection_is_per_thread_and_per_file(tmp_path: Path) -> None:
    """The node's databases keep one connection per thread and file (closing the last one
    checkpoints the log, several ms a call): the same object while the file is the same,
    another thread's own, and a fresh one once the file was replaced; a write through one is
    read through the others at once."""
    import threading

    from fedgov.node import _sqlite

    path = tmp_path / "s.sqlite"
    a = NodeState(path)
    con = _sqlite.pooled(path, "rwc", a.busy_timeout_s)
    assert _sqlite.pooled(path, "rwc", a.busy_timeout_s) is con
    other: list[object] = []
    t = threading.Thread(target=lambda: (other.append(_sqlite.pooled(path, "rwc", a.busy_timeout_s)), NodeState(path).pause("y")))
    t.start()
    t.join()
    assert other and other[0] is not con
    assert a.paused() == (True, "y")  # the other thread's write, read through this thread's connection
    replacement = tmp_path / "new.sqlite"
    NodeState(replacement)
    _sqlite.discard(replacement)
    replacement.replace(path)  # another file under the name
    assert _sqlite.pooled(path, "rwc", a.busy_timeout_s) is not con
