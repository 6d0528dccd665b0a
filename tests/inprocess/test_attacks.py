"""Poisoned updates: one municipality of 12 sends its update scaled by 100, or with its sign
flipped. With robust aggregation (trimmed mean, median) or the update-norm bound the final
accuracy stays within 1 point of the clean run; with plain FedAvg the report shows the damage.

Every run is a federation of the 12 largest cities (Adult split by population) through fedgov's coordinator and fedgov's ClientApp (in process: ``fedgov/testing.py``),
DP-SGD at every node with reproducible noise, so that runs differ only by the attack and the
aggregation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedgov.reports import TrainingReport

from fedgov.testing import InProcessGrid, prepare, tamper_update

# Six federated runs of 12 nodes: the first test takes over 30 s (the second reuses its runs).
pytestmark = pytest.mark.slow

ATTACKER = 9  # Nijmegen, a mid-sized city

ATTACKS = {
    "scaled-100": lambda local, glob: glob + 100.0 * (local - glob),
    "sign-flipped": lambda local, glob: glob - (local - glob),
}


CITIES = ["GM0363", "GM0599", "GM0518", "GM0344", "GM0772", "GM0014", "GM0855", "GM0034", "GM0758", "GM0268", "GM0200", "GM0392"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, write_federation, write_task, run_task, adult_test_csv) -> dict[str, Any]:
    """The 12 largest cities (Adult split by population, no skew), their node directories made
    once for every run. On demo-12, whose smallest members hold 100 rows, the unweighted robust
    rules learn nothing even without an attacker (the noisy updates of the small nodes count as
    much as Rotterdam's): see the threat model.

    All runs share the node directories: a node releases its noisy row count once per data file,
    so every run weighs the nodes alike (runs differ by the attack and the aggregation only) and
    each node's DP plan, calibrated for that count, is calibrated once (the accountant's cache)."""
    tmp = tmp_path_factory.mktemp("attacks")
    fed = write_federation(tmp / "cities-12.toml", name="cities-12", members=CITIES, seed=4, min_rows=500, skew="none")

    def task(name: str, training: dict[str, Any]) -> Path:
        """A 5-round task with DP-SGD and reproducible noise: runs differ by the attack and the aggregation only."""
        return write_task(
            tmp / f"{name}.toml", name=name,
            training={"rounds": 5, "batch_size": 64, "learning_rate": 0.5, "min_nodes": 2, "seed": 3, "fraction_evaluate": 0.0, **training},
            privacy={"target_epsilon": 4.0, "delta": 1e-5, "reproducible_noise": True},
            evaluation={"centralized": adult_test_csv},
        )

    # six runs of epsilon 4 each on the same nodes: a budget for all of them
    _, _, nodes, manifest = prepare(tmp / "nodes", fed, task("clean", {}), node_budget=100.0)
    return {"tmp": tmp, "nodes": nodes, "manifest": manifest, "task": task, "run_task": run_task}


_RUNS: dict[str, TrainingReport] = {}


def _run(federation: dict[str, Any], name: str, training: dict[str, Any] | None = None, attack: str | None = None) -> TrainingReport:
    key = f"{name}|{sorted((training or {}).items())}|{attack}"
    if key in _RUNS:
        return _RUNS[key]
    task_path = federation["task"](name, training or {})
    faults = {ATTACKER: tamper_update(ATTACKS[attack])} if attack else {}
    run_id = 100 + len(_RUNS)
    grid = InProcessGrid(federation["manifest"], len(federation["nodes"]), run_id=run_id, faults=faults)
    report = federation["run_task"](grid, task_path, federation["tmp"] / f"run-{run_id}", run_id=run_id, federation="cities-12")
    assert report.status == "completed", report.message
    _RUNS[key] = report
    return report


def _acc(r: TrainingReport) -> float:
    assert r.final is not None
    return r.final.accuracy


TRIMMED = {"aggregation": "trimmed-mean", "trim_fraction": 0.1}


def test_scaled_update_damages_fedavg_and_robust_aggregation_holds(federation: dict[str, Any]) -> None:
    clean = _run(federation, "clean")
    attacked = _run(federation, "fedavg", attack="scaled-100")
    trimmed_clean = _run(federation, "trimmed", TRIMMED)
    trimmed = _run(federation, "trimmed", TRIMMED, attack="scaled-100")
    bounded = _run(federation, "bounded", {"max_update_norm": 5.0}, attack="scaled-100")
    print(
        f"\nfinal accuracy: FedAvg clean {_acc(clean):.4f}, attacker x100 {_acc(attacked):.4f}; "
        f"trimmed mean clean {_acc(trimmed_clean):.4f}, attacker x100 {_acc(trimmed):.4f}; "
        f"FedAvg with the norm bound, attacker x100 {_acc(bounded):.4f}"
    )
    # Left random: the nodes' released row counts, FedAvg's weights (the DP noise is reproducible,
    # the robust rules are unweighted). Over 5 draws (one torch thread) clean FedAvg reached 0.8319
    # to 0.8323 and FedAvg with the norm bound 0.8329 to 0.8334: each bound below is more than 20
    # such spreads away from the measured values.
    assert _acc(clean) > 0.80
    assert all(len(r.nodes_trained) == 12 for r in clean.rounds)
    # without a defence the damage shows in the report
    assert _acc(attacked) < _acc(clean) - 0.05
    # with robust aggregation: within 1 point of the clean run (FedAvg, and the same rule without attacker)
    assert abs(_acc(trimmed) - _acc(clean)) <= 0.01
    assert abs(_acc(trimmed) - _acc(trimmed_clean)) <= 0.01
    # with the norm bound the update is left out every round, the report names the node and why
    assert abs(_acc(bounded) - _acc(clean)) <= 0.01
    rejected = [r.nodes_rejected for r in bounded.rounds]
    assert all(len(r) == 1 for r in rejected) and len({k for r in rejected for k in r}) == 1
    why = next(iter(rejected[0].values()))
    assert "update norm" in why and "bound of 5 (training.max_update_norm)" in why


def test_sign_flipped_update_and_robust_aggregation(federation: dict[str, Any]) -> None:
    """One sign-flipped update of 12 barely moves FedAvg (measured: 0.8296 against 0.8307, and
    0.8312 against 0.8314 in another configuration), so no damage is asserted for it; the
    robust rule must hold against it all the same."""
    trimmed_clean = _run(federation, "trimmed", TRIMMED)
    trimmed = _run(federation, "trimmed", TRIMMED, attack="sign-flipped")
    print(f"\nfinal accuracy: trimmed mean clean {_acc(trimmed_clean):.4f}, sign-flipped {_acc(trimmed):.4f}")
    # within 1 point of the clean run with the same rule (against clean FedAvg it was 1.4 points
    # below in the measured run: trimming itself costs a little on these nodes)
    assert abs(_acc(trimmed) - _acc(trimmed_clean)) <= 0.01
    assert all(len(r.nodes_trained) == 12 and not r.nodes_rejected for r in trimmed.rounds)
