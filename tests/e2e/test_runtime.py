"""Managed processes leave nothing behind; progress events are read whole."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from fedgov.coordinator.events import EventReader, EventWriter
from fedgov.launch.processes import ManagedProcess, flower_env, free_port
from fedgov.launch.processes import _alive, descendants

SPAWNER = """
import subprocess, sys, time
# a child in its own session, like Ray's helpers: it would survive a plain kill of the parent
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print("ready", flush=True)
time.sleep(60)
"""


def test_stop_kills_the_whole_tree(tmp_path: Path) -> None:
    proc = ManagedProcess([sys.executable, "-c", SPAWNER], env=dict(os.environ), log_path=tmp_path / "p.log")
    deadline = time.monotonic() + 20
    while "ready" not in proc.tail() and time.monotonic() < deadline:
        time.sleep(0.05)
    kids = descendants(proc.pid)
    assert len(kids) == 1 and _alive(kids[0])
    proc.stop(grace=2)
    assert not proc.running()
    assert not any(_alive(k) for k in kids)


def test_stop_also_kills_remembered_orphans(tmp_path: Path) -> None:
    # The parent exits at once; its child is re-parented and is found only because it was remembered.
    code = SPAWNER.rsplit("time.sleep(60)", 1)[0] + "time.sleep(1.5)\n"
    proc = ManagedProcess([sys.executable, "-c", code], env=dict(os.environ), log_path=tmp_path / "p.log")
    deadline = time.monotonic() + 20
    while "ready" not in proc.tail() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.remember_descendants()
    kids = list(proc._seen)
    assert kids
    proc.proc.wait(timeout=20)
    assert any(_alive(k) for k in kids), "the orphan should outlive its parent"
    proc.stop(grace=2)
    assert not any(_alive(k) for k in kids)


def test_flower_env_turns_off_telemetry_and_runtime_installs(tmp_path: Path) -> None:
    env = flower_env(tmp_path)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_HOME"] == str(tmp_path)


def test_free_port_is_a_port() -> None:
    assert 1024 < free_port() < 65536


def test_event_reader_returns_complete_lines_once(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    reader = EventReader(path)
    assert reader.read_new() == []
    w = EventWriter(path)
    w.emit("round", round=1)
    with path.open("a") as fh:
        fh.write('{"event": "partial"')  # a line still being written
    assert [e["round"] for e in reader.read_new()] == [1]
    with path.open("a") as fh:
        fh.write(', "x": 2}\n')
    w.emit("round", round=2)
    got = reader.read_new()
    assert [e["event"] for e in got] == ["partial", "round"]
    assert reader.read_new() == []
