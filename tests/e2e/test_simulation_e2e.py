"""End to end: real Flower processes (a simulation SuperLink, Ray), three municipalities.

These are the slow tests (marked ``slow``); each runs a whole federated DP task.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedgov.errors import ConfigError, DataValidationError
from fedgov.reports import load_report
from fedgov.launch.simulation import SimulationOptions, run_simulation

pytestmark = pytest.mark.slow

CONTRACT = Path(__file__).resolve().parents[2] / "configs" / "contracts" / "adult-income.toml"



@pytest.fixture
def sim_task(tmp_path: Path, write_task, adult_test_csv):
    """``sim_task(federation, rounds=2, epsilon=2.0, training={...})``: ``tmp_path / "task.toml"``,
    a logistic regression with DP-SGD on ``federation``; ``training`` adds keys to ``[training]``."""

    def task(federation: Path, rounds: int = 2, epsilon: float = 2.0, training: dict[str, object] | None = None) -> Path:
        return write_task(
            tmp_path / "task.toml", name="e2e", federation=federation,
            training={"rounds": rounds, "batch_size": 256, "learning_rate": 0.5, "min_nodes": 2, "seed": 1, **(training or {})},
            privacy={"target_epsilon": epsilon, "delta": 1e-5},
            evaluation={"centralized": adult_test_csv},
        )

    return task


def test_three_municipalities_two_rounds(tmp_path: Path, sim_task, write_federation, flower_processes) -> None:
    fed = write_federation(
        tmp_path / "fed.toml", name="e2e-3", members=["GM0363", "GM0344", "GM0150"], seed=5, min_rows=200, skew="label", dirichlet_alpha=5.0
    )
    events: list[dict] = []
    seen_running: list[str] = []

    def on_event(ev: dict) -> None:
        events.append(ev)
        if ev.get("event") == "round" and ev.get("round") == 1:
            seen_running.extend(flower_processes(tmp_path))

    run_dir = run_simulation(sim_task(fed), None, SimulationOptions(runs_dir=tmp_path / "runs"), on_event)
    # the check below can see Flower's processes: while the run went on, it did
    assert any("flower-superlink" in c for c in seen_running) and any("ray::" in c or "raylet" in c for c in seen_running)

    report = load_report(run_dir / "report.json")
    assert report.status == "completed"
    assert [r.round for r in report.rounds] == [1, 2]
    assert report.final is not None and report.majority_rate is not None
    assert report.final.accuracy > report.majority_rate + 0.02
    assert {n.node for n in report.nodes} == {"GM0363", "GM0344", "GM0150"}
    for n in report.nodes:
        assert n.status == "accepted" and n.rounds_trained == 2
        assert n.epsilon is not None and 0 < n.epsilon <= 2.0
        assert n.delta == 1e-5
        assert n.federated_accuracy is not None and n.local_only_accuracy is not None
        assert n.gain == pytest.approx(n.federated_accuracy - n.local_only_accuracy)
        assert n.local_only_epsilon is not None and n.local_only_epsilon <= 2.0
        assert n.train_rows > 0  # the node's released (noisy) row count
    # what the nodes spend stays in their ledgers: the coordinator sees no epsilon or loss per round
    assert all(r.max_epsilon is None and r.train_loss is None for r in report.rounds)
    # the nodes evaluate after the final round only (evaluation.at_nodes = "final")
    assert report.rounds[0].federated_accuracy is None and report.rounds[1].federated_accuracy is not None
    for name in ("model.pt", "accuracy.png", "events.jsonl", "manifest.json"):
        assert (run_dir / name).is_file(), name
    assert any(e.get("event") == "round" and e.get("round") == 2 for e in events)
    # nothing left running: no SuperLink, no simulation engine, no Ray
    assert flower_processes(tmp_path) == []
    # the node data lies in per-node directories, as next to a real node
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert len(manifest) == 3


@pytest.fixture
def three_files(tmp_path: Path, write_file, adult_csv):
    """``three_files(third)``: a federation of three members, each with a data file of its own
    (1,500 Adult rows for two, ``third(500 rows)`` for Deventer)."""

    def make(third: "object") -> Path:
        import pandas as pd

        df = pd.read_csv(adult_csv, dtype=str, keep_default_na=False)
        parts = {"a": df.iloc[:1500], "b": df.iloc[1500:3000], "c": third(df.iloc[3000:3500].copy())}
        for name, part in parts.items():
            part.to_csv(tmp_path / f"{name}.csv", index=False)
        return write_file(
            tmp_path / "fed.toml",
            f"""
            name = "e2e-files"
            [partition]
            kind = "files"
            [[members]]
            code = "GM0363"
            data = "{tmp_path / 'a.csv'}"
            [[members]]
            code = "GM0344"
            data = "{tmp_path / 'b.csv'}"
            [[members]]
            code = "GM0150"
            data = "{tmp_path / 'c.csv'}"
            """,
        )

    return make


def test_a_refusing_node_is_reported_and_the_others_go_on(tmp_path: Path, three_files, sim_task, flower_processes) -> None:
    # Deventer's export has 11 rows: 9 for training, under the simulated node's minimum of 50 (limits.min_rows).
    fed = three_files(lambda d: d.iloc[:11])
    run_dir = run_simulation(
        sim_task(fed, rounds=1), None, SimulationOptions(runs_dir=tmp_path / "runs", local_baseline=False)
    )
    report = load_report(run_dir / "report.json")
    assert report.status == "completed"
    by_node = {n.node: n for n in report.nodes}
    assert by_node["GM0150"].status == "refused"
    assert by_node["GM0150"].refusal_code == "too-few-rows"
    # the fixed text: no row count leaves the node
    assert by_node["GM0150"].refusal_reason == "the node's data set has fewer training rows than this node's minimum of 50 (limits.min_rows)"
    assert by_node["GM0363"].status == by_node["GM0344"].status == "accepted"
    assert report.rounds[0].nodes_trained and "GM0150" not in report.rounds[0].nodes_trained
    assert flower_processes(tmp_path) == []


def test_invalid_member_data_below_min_nodes_stops_before_flower_starts(tmp_path: Path, three_files, sim_task, flower_processes) -> None:
    """One member's bad data refuses that member and the others go on (tests/inprocess/test_simulation_steering.py);
    when the members left are fewer than training.min_nodes, nothing starts."""
    def spoil(d: "object") -> "object":
        d.loc[d.index[:3], "age"] = "twelve"  # type: ignore[attr-defined]
        return d

    fed = three_files(spoil)
    with pytest.raises(DataValidationError) as ei:
        run_simulation(sim_task(fed, rounds=1, training={"min_nodes": 3}), None, SimulationOptions(runs_dir=tmp_path / "runs"))
    text = str(ei.value)
    assert "found 'twelve'" in text and "column 'age'" in text and str(tmp_path / "c.csv") in text
    assert flower_processes(tmp_path) == []


def test_missing_federation_is_a_config_error(tmp_path: Path, write_file) -> None:
    task = write_file(tmp_path / "t.toml", f'name = "t"\ncontract = "{CONTRACT}"\n')
    with pytest.raises(ConfigError, match="federation"):
        run_simulation(task, None, SimulationOptions(runs_dir=tmp_path / "runs"))


class _CoordinatorDies(Exception):
    pass


def test_coordinator_killed_after_round_1_then_fedgov_run_resume(
    tmp_path: Path, sim_task, write_federation, flower_processes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole coordinator (SuperLink, simulation engine, ServerApp) is killed right after
    round 1 was saved; ``fedgov run --resume`` runs round 2 on the same node directories.
    The task runs under secure aggregation, so this is also its test on real Flower processes.
    The ServerApp waits after round 1's checkpoint (fault injection) until the kill, so the kill
    cannot fall inside round 2's key exchange, whatever the speed of the machine."""
    from typer.testing import CliRunner

    from fedgov.coordinator.checkpoint import load_checkpoint
    from fedgov.coordinator.run import CRASH_TEST_ENV
    from fedgov.cli import app
    from fedgov.node.home import NodeHome

    fed = write_federation(tmp_path / "fed.toml", name="e2e-crash", members=["GM0363", "GM0344", "GM0150"], seed=5, min_rows=200)
    seen: dict[str, Path] = {}
    monkeypatch.setenv(CRASH_TEST_ENV, "1")

    def on_event(ev: dict) -> None:
        if ev.get("event") == "run-dir":
            seen["run_dir"] = Path(ev["path"])
        if ev.get("event") == "checkpoint" and ev.get("round") == 1:
            raise _CoordinatorDies()  # every Flower process is killed on the way out

    with pytest.raises(_CoordinatorDies):
        run_simulation(
            sim_task(fed, rounds=2, training={"secure_aggregation": True}), None,
            SimulationOptions(runs_dir=tmp_path / "runs", local_baseline=False), on_event,
        )
    run_dir = seen["run_dir"]
    assert flower_processes(tmp_path) == []
    assert load_checkpoint(run_dir)[0].round == 1
    node_dirs = sorted(p for p in (run_dir / "state" / "nodes").iterdir() if p.is_dir())
    for d in node_dirs:  # nobody told the nodes that the task ended: their reservations are open
        assert "release" not in [e.kind for e in NodeHome(d).ledger.events() if not e.task_id.startswith("rows-")]

    monkeypatch.delenv(CRASH_TEST_ENV)
    result = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "--no-baseline"])
    assert result.exit_code == 0, result.output
    assert "Resuming after round 1 of 2" in result.output
    report = load_report(run_dir / "report.json")
    assert report.status == "completed" and [r.round for r in report.rounds] == [1, 2]
    assert all(n.rounds_trained == 2 and n.epsilon is not None and 0 < n.epsilon <= 2.0 for n in report.nodes), (
        [(n.node, n.status, n.rounds_trained, n.epsilon, n.refusal_reason) for n in report.nodes],
        [(r.round, r.nodes_trained) for r in report.rounds],
    )
    assert report.privacy["secure_aggregation"] is True and all(r.discarded is None for r in report.rounds)
    assert report.final is not None and report.final.accuracy > 0.78
    for d in node_dirs:
        sent = [e for e in NodeHome(d).audit.entries() if e.kind == "sent" and e.payload.get("kind") == "train"]
        assert sent and all(list(e.payload["arrays"]) == ["masked"] for e in sent)  # only masked vectors left the node
        events = [e for e in NodeHome(d).ledger.events() if not e.task_id.startswith("rows-")]  # the task's own
        assert [e.kind for e in events if e.kind != "spend"] == ["reserve", "release"]
        training = [e.round for e in events if e.kind == "spend" and e.note != "evaluation"]
        assert sorted(training) == [1, 2]  # each round once
        assert [e.round for e in events if e.kind == "spend" and e.note == "evaluation"] == [2]  # the final evaluation
    assert flower_processes(tmp_path) == []


def test_distributed_dp_under_hardened_secure_aggregation(
    tmp_path: Path, write_federation, write_task, adult_test_csv, flower_processes
) -> None:
    """Four municipalities, two rounds of distributed DP on real Flower processes, under the
    secure aggregation that holds against a deviating coordinator (issue 15): signed keys from
    the simulation's roster, the consistency stage, the reveal record at each node."""
    import sqlite3

    from fedgov.node.home import NodeHome

    fed = write_federation(tmp_path / "fed.toml", name="e2e-dd", members=["GM0363", "GM0344", "GM0150", "GM0599"], seed=5, min_rows=300)
    task = write_task(
        tmp_path / "task.toml", name="e2e-dd", federation=fed,
        training={"rounds": 2, "batch_size": 64, "learning_rate": 0.5, "min_nodes": 2, "seed": 1, "fraction_evaluate": 0.0,
                  "secure_aggregation": True},
        privacy={"mode": "distributed", "target_epsilon": 8.0, "delta": 1e-5, "update_clip": 2.0, "dropout_tolerance": 0.25,
                 "accountant": "rdp"},
        evaluation={"centralized": adult_test_csv},
    )
    run_dir = run_simulation(task, None, SimulationOptions(runs_dir=tmp_path / "runs", local_baseline=False), lambda e: None)
    report = load_report(run_dir / "report.json")
    assert report.status == "completed", report.message
    assert [r.round for r in report.rounds] == [1, 2] and all(r.discarded is None for r in report.rounds)
    assert all(len(r.nodes_trained) == 4 for r in report.rounds)
    for d in sorted(p for p in (run_dir / "state" / "nodes").iterdir() if p.is_dir()):
        home = NodeHome(d)
        assert not [e for e in home.audit.entries() if e.kind == "secagg-stopped"]
        with sqlite3.connect(d / NodeHome.STATE) as conn:
            signed = conn.execute("SELECT round FROM secagg_consistency ORDER BY round").fetchall()
            kinds = conn.execute("SELECT DISTINCT kind FROM secagg_reveals").fetchall()
        assert [r for (r,) in signed] == [1, 2] and kinds == [("self-mask",)]  # no dropout: self-masks only
    assert flower_processes(tmp_path) == []


def test_a_terminated_run_stops_everything_it_started(tmp_path: Path, sim_task, write_federation, flower_processes) -> None:
    """``fedgov run`` stopped with SIGTERM (a scheduler, ``timeout``, ``kill``) stops Flower's
    SuperLink, the simulation process and Ray with it, as Ctrl-C does: nothing outlives it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    fed = write_federation(tmp_path / "fed.toml", name="e2e-term", members=["GM0363", "GM0344"], seed=5, min_rows=200)
    task = sim_task(fed, rounds=30)
    fedgov = str(Path(sys.executable).parent / "fedgov")
    proc = subprocess.Popen([fedgov, "run", str(task), "--no-baseline", "--runs-dir", str(tmp_path / "runs")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("ray::" in c for c in flower_processes(tmp_path)):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        assert any("flwr-simulation" in c for c in flower_processes(tmp_path)), "the simulation did not start"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted; managed processes were stopped" in err and "Traceback" not in err
    deadline = time.monotonic() + 30
    while flower_processes(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert flower_processes(tmp_path) == []
