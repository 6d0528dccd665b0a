"""End to end, deployed: a coordinator and three nodes as separate processes on loopback,
with TLS and SuperNode authentication (marked ``slow``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedgov.config import load_contract
from fedgov.deploy.coordinator import nodes
from fedgov.deploy.local import local_federation_down, local_federation_up
from fedgov.deploy.node import start_node
from fedgov.nodehome import init_node
from fedgov.deploy.submit import submit_task
from fedgov.reports import load_report
from fedgov.runtime import free_port

from _helpers import ADULT, ADULT_TEST, CONTRACT, flower_processes, write

pytestmark = pytest.mark.slow



def _task(tmp: Path) -> Path:
    fed = write(
        tmp / "fed.toml",
        f"""
        name = "deploy-3"
        seed = 5
        source = "{ADULT}"
        [partition]
        kind = "population"
        skew = "label"
        dirichlet_alpha = 5.0
        min_rows = 200
        [[members]]
        code = "GM0363"
        [[members]]
        code = "GM0344"
        [[members]]
        code = "GM0150"
        """,
    )
    return write(
        tmp / "task.toml",
        f"""
        name = "deploy-e2e"
        contract = "{CONTRACT}"
        federation = "{fed}"
        [model]
        name = "logreg"
        [training]
        rounds = 1
        batch_size = 256
        learning_rate = 0.5
        min_nodes = 3
        seed = 1
        [privacy]
        target_epsilon = 2.0
        delta = 1e-5
        [evaluation]
        centralized = "{ADULT_TEST}"
        """,
    )


def test_local_federation_tls_auth_and_one_round(tmp_path: Path) -> None:
    task = _task(tmp_path)
    fed_dir = tmp_path / "fed"
    # The whole test stays under 3 minutes: every wait takes from one budget.
    deadline = time.monotonic() + 165

    def left(cap: float) -> float:
        return max(5.0, min(cap, deadline - time.monotonic()))
    try:
        state = local_federation_up(fed_dir, nodes=3, task_path=task, connect_timeout=60)
        coord = Path(state["coordinator"])
        assert set(state["nodes"]) == {"GM0363", "GM0344", "GM0150"}
        listed = {n["node-id"]: n["status"] for n in nodes(coord)}
        assert {listed[str(n["node_id"])] for n in state["nodes"].values()} == {"online"}

        # A node whose key the coordinator never admitted is refused.
        stranger = init_node(
            tmp_path / "stranger", node="GM9999", contract=load_contract(CONTRACT),
            data=fed_dir / "data" / "GM0363" / "train.csv", approval="auto",
        )
        proc = start_node(stranger.path, state["address"], Path(state["ca_cert"]), free_port())
        try:
            rc = proc.proc.wait(timeout=left(30))
        finally:
            proc.stop()
        assert rc != 0, proc.tail()
        assert len(nodes(coord)) == 3

        # One round of the task, submitted to the coordinator as `fedgov task submit` does.
        started = time.monotonic()
        events: list[dict] = []
        run_dir = submit_task(task, coord, runs_dir=tmp_path / "runs", on_event=events.append, timeout=left(150))
        elapsed = time.monotonic() - started
        report = load_report(run_dir / "report.json")
        assert report.mode == "deployment"
        assert any(e.get("event") == "round" and e.get("round") == 1 for e in events)
        assert (run_dir / "accuracy.png").is_file() and (run_dir / "model.pt").is_file()
        assert report.status == "completed", report.message
        assert {n.node for n in report.nodes} == {"GM0363", "GM0344", "GM0150"}
        print(f"one round on the deployed federation: {elapsed:.1f} s (task submit wall time)")
        print(json.dumps([n.model_dump(mode='json').get('status') for n in report.nodes]))
    finally:
        local_federation_down(fed_dir)
    time.sleep(0.5)
    assert flower_processes(tmp_path) == []
