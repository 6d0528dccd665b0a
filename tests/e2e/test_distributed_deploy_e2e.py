"""End to end, deployed, distributed DP: the shipped distributed task on real processes (marked ``slow``).

A coordinator (SuperLink and the Fleet-only gateway) and three SuperNodes with TLS, node keys and
the federation roster, each with its warm worker (:mod:`fedgov.deploy.worker`), all started by
``local_federation_up``. The task is ``configs/tasks/adult-income-distributed.toml`` (DP-FedAvg
with discrete Gaussian noise shares summed under secure aggregation) on the first three members of
``demo-12``, for 2 rounds; three is the fewest nodes secure aggregation runs on with a threshold
(``threshold_for(3) == 3``: every node must answer, the dropout tolerance of 10% allows none).

What is checked, all from outside the processes:

- the report: completed, in deployment, 2 training rounds each with all three nodes and nothing
  discarded, every node accepted with 2 rounds and an epsilon within the task's target; the
  privacy recorded is distributed, under secure aggregation, with the plan's noise multiplier;
- each node's ledger: one reservation, one spend per round (one Gaussian release: ``(z, 1, 1)``),
  then the release; the task's epsilon, from those spends, within the target;
- each node's audit log (verified): the four secure-aggregation stages (keys, shares,
  consistency, unmask) of both rounds, and every training reply it sent carried one masked
  vector (``uint32``-sized) and no row count: the coordinator never received an update in plain;
- each node's ``logs/worker.log``: the warm worker served every message the ClientApp handled
  (as many ``message N handled`` lines as ``received`` entries in the audit log), all exit 0;
- after ``local_federation_down``, no Flower process and no worker of the test is left.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from fedgov.config import load_task
from fedgov.deploy.local import local_federation_down, local_federation_up, read_state
from fedgov.deploy.submit import submit_task
from fedgov.node.home import NodeHome, budget_of
from fedgov.privacy import epsilon_from_history
from fedgov.protocol import task_id_of
from fedgov.reports import load_report

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = ("GM0599", "GM0363", "GM0344")  # the first three of demo-12: Rotterdam, Amsterdam, Utrecht
STAGES = ("keys", "shares", "consistency", "unmask")
ROUNDS = 2


def _derive(tmp: Path) -> Path:
    """The shipped distributed task on a 3-member federation cut from ``demo-12`` (as
    ``benchmarks/bench_deploy.py`` derives its task): 2 rounds, all 3 nodes required, 2 local
    epochs (the shipped 10 only make the test slower), and bounded waits."""
    fed = (ROOT / "configs" / "federations" / "demo-12.toml").read_text("utf-8")
    head, _, members = fed.partition("[[members]]")
    first = "[[members]]" + "[[members]]".join(members.split("[[members]]")[: len(MEMBERS)])
    head = head.replace('source = "../../data/adult/adult.csv"', f'source = "{ROOT / "data" / "adult" / "adult.csv"}"')
    (tmp / "fed3.toml").write_text(head.replace('name = "demo-12"', 'name = "demo-3"') + first, encoding="utf-8")
    task = (ROOT / "configs" / "tasks" / "adult-income-distributed.toml").read_text("utf-8")
    for pattern, value in (
        (r'(?m)^federation = ".*"', f'federation = "{tmp / "fed3.toml"}"'),
        (r'(?m)^contract = ".*"', f'contract = "{ROOT / "configs" / "contracts" / "adult-income.toml"}"'),
        (r'(?m)^centralized = ".*"', f'centralized = "{ROOT / "data" / "adult" / "adult_test.csv"}"'),
        (r"(?m)^rounds = \d+", f"rounds = {ROUNDS}\nnode_wait = 60\nreply_timeout = 120"),
        (r"(?m)^min_nodes = \d+", f"min_nodes = {len(MEMBERS)}"),
        (r"(?m)^local_epochs = \d+", "local_epochs = 2"),
    ):
        task, n = re.subn(pattern, value, task)
        assert n == 1, f"the shipped task has no line {pattern!r}"
    path = tmp / "task.toml"
    path.write_text(task, encoding="utf-8")
    return path


def _workers(flower_processes: Any, under: Path) -> list[str]:
    """Command lines of live warm workers serving a node directory under ``under``."""
    return [c for c in flower_processes(under) if "fedgov.deploy.worker" in c]


def test_distributed_dp_under_secure_aggregation_on_deployed_nodes(tmp_path: Path, flower_processes: Any) -> None:
    task_path = _derive(tmp_path)
    task, contract = load_task(task_path)
    assert task.privacy.mode == "distributed" and task.training.secure_aggregation and task.training.rounds == ROUNDS
    fed_dir, runs = tmp_path / "fed", tmp_path / "runs"
    t0 = time.monotonic()
    try:
        state = local_federation_up(fed_dir, nodes=len(MEMBERS), task_path=task_path, connect_timeout=90)
        assert set(state["nodes"]) == set(MEMBERS) and {n["runtime"] for n in state["nodes"].values()} == {"warm"}
        up_s = time.monotonic() - t0
        events: list[dict[str, Any]] = []
        run_dir = submit_task(task_path, Path(state["coordinator"]), runs_dir=runs, on_event=events.append, timeout=240)
        run_s = time.monotonic() - t0 - up_s

        # --- the report -----------------------------------------------------------------------
        rep = load_report(run_dir / "report.json")
        assert rep.status == "completed" and rep.mode == "deployment", rep.message
        training = [r for r in rep.rounds if r.round > 0]
        assert [r.round for r in training] == [1, 2]
        for r in training:
            assert sorted(r.nodes_trained) == sorted(MEMBERS), r
            assert r.discarded is None and not r.nodes_failed and not r.nodes_absent, r
        assert {n.node for n in rep.nodes} == set(MEMBERS) and {n.status for n in rep.nodes} == {"accepted"}
        for n in rep.nodes:
            assert n.rounds_trained == ROUNDS, n
            assert n.epsilon is not None and 0 < n.epsilon <= task.privacy.target_epsilon, n
        priv = rep.privacy
        assert priv["mode"] == "distributed" and priv["secure_aggregation"] is True
        assert "municipality" in str(priv["unit"]) and "masked update" in str(priv["released_by_nodes"])
        assert priv["dropout_tolerance"] == pytest.approx(0.1)
        z = float(priv["noise_multiplier"])  # type: ignore[arg-type]  # a report value is a union
        assert z > 0 and priv["sample_rate"] == 1.0
        assert rep.final is not None  # the centralized evaluation ran (no accuracy: 3 nodes, large noise)
        assert [e["event"] for e in events if e.get("event") == "checkpoint"] == ["checkpoint"] * ROUNDS

        tid = task_id_of(task, contract, int(rep.flower_run_id or 0))
        dim = int(rep.model_parameters or 0)
        assert dim > 0
        for code, n in state["nodes"].items():
            node_dir = Path(n["node_dir"])
            home = NodeHome(node_dir)

            # --- the ledger: one Gaussian release per round, within the task's epsilon ---------
            ds = home.policy().datasets[0]
            mine = [e for e in home.ledger.events(ds.name) if e.task_id == tid]
            assert [e.kind for e in mine if e.kind != "spend"] == ["reserve", "release"], (code, mine)
            spends = [e for e in mine if e.kind == "spend"]
            assert sorted(e.round for e in spends) == [1, 2], (code, spends)
            history = []
            for e in spends:
                assert e.mechanism is not None and e.mechanism.kind == "dpsgd"
                assert [tuple(h) for h in e.mechanism.history] == [(pytest.approx(z), 1.0, 1)]
                history += e.mechanism.history
            spent = epsilon_from_history(history=history, delta=task.privacy.delta or 1e-5, accountant=task.privacy.accountant)
            assert 0 < spent <= task.privacy.target_epsilon, (code, spent)
            assert 0 < home.ledger.status(ds.name, budget_of(ds)).epsilon_committed <= 10.0

            # --- the audit log: the secure-aggregation stages, and masked replies only -----------
            assert home.audit.verify().ok
            entries = home.audit.entries()
            assert not [e for e in entries if e.kind in ("secagg-stopped", "failed", "refused", "blocked")], code
            stages = sorted(
                (int(e.payload["config"]["server-round"]), str(e.payload["config"]["secagg-stage"]))
                for e in entries
                if e.kind == "received" and e.payload.get("kind") == "secagg"
            )
            assert stages == sorted((r, s) for r in (1, 2) for s in STAGES), (code, stages)
            answered = [e for e in entries if e.kind == "sent" and e.payload.get("kind") == "secagg"]
            assert len(answered) == len(STAGES) * ROUNDS and not [e for e in answered if "error" in e.payload], code
            train_sent = [e for e in entries if e.kind == "sent" and e.payload.get("kind") == "train"]
            assert len(train_sent) == ROUNDS, (code, train_sent)
            for e in train_sent:
                assert "error" not in e.payload, e.payload
                assert list(e.payload["arrays"]) == ["masked"], e.payload  # no model, no update: one masked vector
                # the whole model, masked: 4 bytes a value (uint32 mod 2^32) and the array's .npy header
                assert e.payload["arrays"]["masked"] == [dim], e.payload
                assert 4 * dim <= e.payload["array_bytes"] <= 4 * dim + 128, e.payload
                assert e.payload["metrics"].get("num-examples") == 1.0  # and no row count with it

            # --- the warm worker served every message -------------------------------------------
            log = (node_dir / "logs" / "worker.log").read_text("utf-8")
            assert "warm worker ready" in log, log[-2000:]
            handled = re.findall(r"message (\d+) handled in [\d.]+ s \(exit (-?\d+)\)", log)
            received = [e for e in entries if e.kind == "received"]
            assert [int(i) for i, _ in handled] == list(range(1, len(handled) + 1)), log[-2000:]
            assert {c for _, c in handled} == {"0"}, log[-2000:]
            # every message the ClientApp saw went through the worker (none ran in a cold process)
            assert len(handled) == len(received) >= 1 + (len(STAGES) + 1) * ROUNDS, (code, len(handled), len(received))
        assert len(_workers(flower_processes, tmp_path)) == len(MEMBERS)
        print(json.dumps({"up_s": round(up_s, 1), "run_s": round(run_s, 1),
                          "round_s": [round(float(r.seconds or 0), 1) for r in training]}))
    finally:
        local_federation_down(fed_dir)
    deadline = time.monotonic() + 15  # a worker stops within a second or two of its node's launcher
    while _workers(flower_processes, tmp_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert read_state(fed_dir)["nodes"] == {}
    assert flower_processes(tmp_path) == []
    assert _workers(flower_processes, tmp_path) == []
