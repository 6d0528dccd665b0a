"""End to end, deployed: each node's warm worker (marked ``slow``).

Three nodes on loopback (TLS, node keys), each with its worker beside the SuperNode:

1. the local channel is private (``run/`` 0700, the socket 0600) and the worker lives in the
   node's process tree;
2. a 2-round task runs on the workers (every message is handled warm, none cold);
3. one node's worker is killed (SIGKILL) between tasks: the next task's first message starts a
   new worker, the task completes on all three nodes, and every ledger holds each round's spend
   exactly once (nothing lost, nothing doubled); the audit logs still verify;
4. ``local-federation down`` leaves no worker behind.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import pytest

from fedgov.deploy.local import local_federation_down, local_federation_up
from fedgov.deploy.submit import submit_task
from fedgov.deploy.worker import socket_path
from fedgov.launch.processes import _alive, descendants
from fedgov.node.home import NodeHome
from fedgov.reports import load_report

pytestmark = pytest.mark.slow

MEMBERS = ("GM0363", "GM0344", "GM0518")  # Amsterdam, Utrecht, 's-Gravenhage
VICTIM = "GM0344"


def _worker_pid(node_dir: Path) -> int:
    return int((node_dir / "run" / "worker.pid").read_text("utf-8"))


def _wait_for_worker(node_dir: Path, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if socket_path(node_dir).exists() and (node_dir / "run" / "worker.pid").is_file():
            return _worker_pid(node_dir)
        time.sleep(0.1)
    raise AssertionError(f"no worker came up for {node_dir}")


def _handled(node_dir: Path) -> int:
    log = node_dir / "logs" / "worker.log"
    return sum("handled in" in line for line in log.read_text("utf-8").splitlines()) if log.is_file() else 0


def _spends(home: NodeHome, prefix: str) -> list[int]:
    ds = home.policy().datasets[0]
    return sorted(e.round for e in home.ledger.events(ds.name) if e.task_id.startswith(prefix) and e.kind == "spend" and e.note != "evaluation")


def test_warm_workers_serve_survive_a_kill_and_stop_with_the_node(
    tmp_path: Path, write_federation, write_task, adult_test_csv, flower_processes
) -> None:
    fed = write_federation(tmp_path / "fed.toml", name="warm-3", members=MEMBERS, seed=5, min_rows=200)

    def task(name: str, rounds: int) -> Path:
        return write_task(
            tmp_path / f"{name}.toml", name=name, federation=fed,
            training={"rounds": rounds, "batch_size": 256, "learning_rate": 0.5, "min_nodes": 3, "node_wait": 30.0,
                      "reply_timeout": 120, "seed": 1},
            privacy={"target_epsilon": 2.0, "delta": 1e-5},
            evaluation={"centralized": adult_test_csv},
        )

    fed_dir, runs = tmp_path / "fed", tmp_path / "runs"
    try:
        state = local_federation_up(fed_dir, nodes=3, task_path=task("up", 1), connect_timeout=90)
        dirs = {code: Path(n["node_dir"]) for code, n in state["nodes"].items()}
        # --- 1. a private channel, in the node's process tree ---------------------------------
        for code, d in dirs.items():
            pid = _wait_for_worker(d)
            assert stat.S_IMODE((d / "run").stat().st_mode) == 0o700
            assert stat.S_IMODE(socket_path(d).stat().st_mode) == 0o600
            assert pid in descendants(int(state["nodes"][code]["pid"])), "the worker is not below its node's launcher"

        # --- 2. a task on the warm workers ------------------------------------------------------
        first = submit_task(task("warm-a", 2), Path(state["coordinator"]), runs_dir=runs, timeout=240)
        rep = load_report(first / "report.json")
        assert rep.status == "completed" and {n.node for n in rep.nodes if n.rounds_trained == 2} == set(MEMBERS), rep.message
        for d in dirs.values():
            # hello, 2 x train, the final evaluation, end: all handled by the worker
            assert _handled(d) >= 5, (d / "logs" / "worker.log").read_text("utf-8")[-2000:]
            assert "no warm worker answered" not in (fed_dir / "logs" / f"supernode-{d.name}.log").read_text("utf-8")

        # --- 3. a worker killed between tasks ---------------------------------------------------
        victim = dirs[VICTIM]
        old = _worker_pid(victim)
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(old) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(old)
        second = submit_task(task("warm-b", 1), Path(state["coordinator"]), runs_dir=runs, timeout=240)
        rep_b = load_report(second / "report.json")
        assert rep_b.status == "completed" and {n.node for n in rep_b.nodes if n.rounds_trained == 1} == set(MEMBERS), rep_b.message
        new = _worker_pid(victim)
        assert new != old and _alive(new)
        assert new in descendants(int(state["nodes"][VICTIM]["pid"]))  # re-parented to the node's launcher
        for d in dirs.values():
            home = NodeHome(d)
            assert _spends(home, "warm-a-") == [1, 2] and _spends(home, "warm-b-") == [1]
            assert home.audit.verify().ok
    finally:
        local_federation_down(fed_dir)
    # --- 4. nothing left running --------------------------------------------------------------
    time.sleep(0.5)
    assert flower_processes(tmp_path) == []
