"""Node autonomy end to end: budgets across runs, pause, approval.

Each test runs small federations (3 municipalities) on one state directory, as a
municipality's node directory persists between tasks. The pause runs on real Flower
processes; budgets and approval, which need two runs each, run the same coordinator and
ClientApp (with its mods) in process (``fedgov/testing.py``), to keep the suite fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedgov.node.refusals import refusal_text
from fedgov.node.home import NodeHome, budget_of
from fedgov.reports import load_report
from fedgov.launch.simulation import SimulationOptions, run_simulation

pytestmark = pytest.mark.slow

CODES = ["GM0363", "GM0344", "GM0150"]


@pytest.fixture
def autonomy_task(tmp_path: Path, write_federation, write_task):
    """``autonomy_task(rounds=)``: the federation ``auto-3`` and a task on it (DP at epsilon 1)."""

    def task(rounds: int) -> Path:
        fed = write_federation(tmp_path / "fed.toml", name="auto-3", members=CODES, seed=3, min_rows=300)
        return write_task(
            tmp_path / "task.toml", name="autonomy", federation=fed, model=None,
            training={"rounds": rounds, "learning_rate": 0.5, "min_nodes": 2},
            privacy={"target_epsilon": 1.0, "delta": 1e-5},
        )

    return task


def _opts(tmp: Path, **kw: Any) -> SimulationOptions:
    return SimulationOptions(runs_dir=tmp / "runs", state_dir=tmp / "state", local_baseline=False, **kw)


def _home(tmp: Path, code: str) -> NodeHome:
    return NodeHome(tmp / "state" / "nodes" / code)


def _task_ids(ids: list[str]) -> list[str]:
    """Ledger task ids of tasks, without the node's row-count releases (``rows-<data set>-<sha>``)."""
    return [t for t in ids if not t.startswith("rows-")]


def _in_process(tmp: Path, task: Path, run_id: int, **opts: Any) -> Any:
    """One run of ``task`` on the state directory's nodes, in process (the nodes' directories,
    policies, ledgers and audit logs persist between calls, as with ``--state-dir``)."""
    from fedgov.config import load_task
    from fedgov.coordinator.run import run_training

    from fedgov.testing import InProcessGrid, prepare

    t, contract, nodes, manifest = prepare(tmp / f"run-{run_id}", tmp / "fed.toml", task, state_dir=tmp / "state", local_baseline=False, **opts)
    t, contract = load_task(task)
    return run_training(
        InProcessGrid(manifest, len(nodes), run_id=run_id), t, contract, run_dir=tmp / f"run-{run_id}" / "out",
        expected_nodes=len(nodes), task_file=str(task), federation="auto-3", local_baseline=False, flower_run_id=run_id,
        connect_timeout=5,
    )


def test_a_budget_for_one_task_refuses_the_second(tmp_path: Path, autonomy_task) -> None:
    task = autonomy_task(rounds=2)
    first = _in_process(tmp_path, task, 1, node_budget=1.0)
    assert first.status == "completed"
    assert all(n.status == "accepted" and n.epsilon is not None and n.epsilon <= 1.0 for n in first.nodes)
    st_first: dict[str, list[str]] = {}
    for code in CODES:
        home = _home(tmp_path, code)
        ds = home.policy().datasets[0]
        st = home.ledger.status(ds.name, budget_of(ds))
        st_first[code] = list(st.closed_tasks)
        # the task's reservation and the node's one row-count release (``rows-...``), both closed
        assert len(_task_ids(st.closed_tasks)) == 1 and not st.open_tasks  # released at the end
        assert len([t for t in st.closed_tasks if t.startswith("rows-")]) == 1
        assert 0 < st.epsilon_committed <= 1.0
        assert home.audit.verify().ok

    second = _in_process(tmp_path, task, 2, node_budget=1.0)
    assert second.status == "failed"
    assert {n.node for n in second.nodes} == set(CODES)
    for n in second.nodes:
        assert n.status == "refused"
        assert n.refusal_code == "budget-exhausted"
        assert n.refusal_reason == refusal_text("budget-exhausted", setting="datasets.budget")
    for code in CODES:  # the refusal spent nothing and is in the audit log
        home = _home(tmp_path, code)
        ds = home.policy().datasets[0]
        # no new task, and no second row-count release (the data file did not change)
        assert sorted(home.ledger.status(ds.name, budget_of(ds)).closed_tasks) == sorted(st_first[code])
        decisions = [e for e in home.audit.entries() if e.kind == "decision"]
        assert [d.payload["accepted"] for d in decisions] == [True, False]
        assert decisions[-1].payload["code"] == "budget-exhausted"


def test_pause_takes_effect_at_the_next_round(tmp_path: Path, autonomy_task) -> None:
    task = autonomy_task(rounds=3)
    paused: list[int] = []

    def on_event(ev: dict[str, Any]) -> None:
        if ev.get("event") == "round" and ev.get("round") == 1 and not paused:
            _home(tmp_path, "GM0150").state.pause("maintenance")
            paused.append(1)

    report = load_report(run_simulation(task, None, _opts(tmp_path), on_event) / "report.json")
    assert paused and report.status == "completed"
    rounds = {r.round: r for r in report.rounds}
    assert "GM0150" in rounds[1].nodes_trained
    # the pause lands between rounds: at the latest from round 3 on the node no longer trains
    assert "GM0150" not in rounds[3].nodes_trained
    assert "paused" in rounds[3].nodes_failed["GM0150"]
    assert {"GM0363", "GM0344"} <= set(rounds[3].nodes_trained)


def test_manual_approval_queues_and_approve_releases(tmp_path: Path, autonomy_task) -> None:
    task = autonomy_task(rounds=1)
    report = _in_process(tmp_path, task, 1, approval="manual")
    assert report.status == "failed"
    assert all(n.refusal_code == "pending-approval" for n in report.nodes)
    queued = {code: _home(tmp_path, code).state.pending() for code in CODES}
    assert all(len(q) == 1 for q in queued.values())
    task_key = queued["GM0363"][0].task_id
    assert queued["GM0363"][0].summary["epsilon"] == 1.0
    for code in ("GM0363", "GM0344"):
        _home(tmp_path, code).state.approve(task_key, by="test")

    again = _in_process(tmp_path, task, 2, approval="manual")
    assert again.status == "completed", again.message
    by = {n.node: n for n in again.nodes}
    assert by["GM0363"].status == by["GM0344"].status == "accepted"
    assert by["GM0150"].refusal_code == "pending-approval"
