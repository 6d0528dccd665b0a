"""Admission control at the node, without Flower: policy, pause, approval, ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedgov import protocol as P
from fedgov.node.admission import admit, is_admitted, precheck, record_spend, release
from fedgov.protocol import fingerprint, task_id_of
from fedgov.config import load_task
from fedgov.node.refusals import is_allowed, refusal_text
from fedgov.node.home import NodeHome, budget_of

ROOT = Path(__file__).resolve().parents[2]
HISTORY = [(1.5, 1 / 26, 260)]  # a demo-like node's whole task: sigma, q, steps


@pytest.fixture()
def task_contract():  # type: ignore[no-untyped-def]
    return load_task(ROOT / "configs" / "tasks" / "adult-income.toml")


def _hello(rows: int = 6590, sigma: float = 1.5) -> P.NodeHello:
    return P.NodeHello(node="GM0363", accepted=True, train_rows=rows, test_rows=100, delta=1e-5, noise_multiplier=sigma, planned_epsilon=1.96)


def test_no_policy_takes_part_in_nothing(tmp_path: Path, task_contract) -> None:  # type: ignore[no-untyped-def]
    task, contract = task_contract
    r = precheck(NodeHome(tmp_path / "empty"), task, contract, node="GM0363")
    assert r is not None and r.code == "no-policy" and not r.accepted


def test_task_above_the_per_task_maximum_is_refused_before_data(tmp_path: Path, task_contract, node_home) -> None:  # type: ignore[no-untyped-def]
    task, contract = task_contract
    home = node_home(approval="auto", max_epsilon_per_task=1.5)
    r = precheck(home, task, contract, node="GM0363")
    assert r is not None and r.code == "epsilon-above-max"
    # the public text is the fixed template: the task's stated epsilon and the policy's limit
    assert is_allowed(r.code, r.reason)
    assert r.reason == refusal_text("epsilon-above-max", value=2.0, limit=1.5, setting="limits.max_epsilon_per_task")
    assert r.node_name == "Amsterdam"


def test_pause_refuses_and_resume_allows(tmp_path: Path, task_contract, node_home) -> None:  # type: ignore[no-untyped-def]
    task, contract = task_contract
    home = node_home(approval="auto")
    home.state.pause("update")
    r = precheck(home, task, contract, node="GM0363")
    assert r is not None and r.code == "paused" and not r.accepted
    # the operator's own reason stays at the node: the reply is the fixed template
    assert r.reason == refusal_text("paused") and "update" not in r.reason
    home.state.resume()
    assert precheck(home, task, contract, node="GM0363") is None


def test_reservation_spend_release(tmp_path: Path, task_contract, node_home) -> None:  # type: ignore[no-untyped-def]
    task, contract = task_contract
    home = node_home(approval="auto")
    tid = task_id_of(task, contract, 1)
    assert not is_admitted(home, contract, tid, task)
    out = admit(home, task, contract, _hello(), task_id=tid, history=HISTORY)
    assert out.accepted
    assert is_admitted(home, contract, tid, task)
    ds = home.policy().datasets[0]
    reserved = home.ledger.status(ds.name, budget_of(ds)).epsilon_committed
    record_spend(home, contract, task, task_id=tid, entries=[(1.5, 1 / 26, 26)], server_round=1)
    # an open task counts in full, whatever it spent so far (a crash never hands budget back)
    assert home.ledger.status(ds.name, budget_of(ds)).epsilon_committed == pytest.approx(reserved)
    release(home, contract, task, task_id=tid)
    after = home.ledger.status(ds.name, budget_of(ds)).epsilon_committed
    assert 0 < after < reserved
    assert not is_admitted(home, contract, tid, task)


def test_budget_for_two_tasks_refuses_the_third(tmp_path: Path, task_contract, node_home) -> None:  # type: ignore[no-untyped-def]
    from fedgov.node.ledger import Mechanism, compose

    task, contract = task_contract
    two = compose([Mechanism.dpsgd(HISTORY), Mechanism.dpsgd(HISTORY)], delta=1e-5)
    home = node_home(budget=two + 0.01, approval="auto", max_epsilon_per_task=2.0)
    results = [admit(home, task, contract, _hello(), task_id=task_id_of(task, contract, run), history=HISTORY) for run in (1, 2, 3)]
    assert [r.accepted for r in results] == [True, True, False]
    assert results[2].code == "budget-exhausted"
    assert is_allowed("budget-exhausted", results[2].reason)


def test_manual_approval(tmp_path: Path, task_contract, node_home) -> None:  # type: ignore[no-untyped-def]
    task, contract = task_contract
    home = node_home(approval="manual")
    tid = task_id_of(task, contract, 7)
    first = admit(home, task, contract, _hello(), task_id=tid, history=HISTORY)
    assert first.code == "pending-approval" and fingerprint(task, contract) in first.reason
    [pending] = home.state.pending()
    assert pending.task_id == fingerprint(task, contract)
    assert pending.summary["dataset"] == "adult" and pending.summary["rounds"] == task.training.rounds
    assert not is_admitted(home, contract, tid, task)  # nothing reserved while it waits
    home.state.approve(pending.task_id, by="privacy officer")
    assert admit(home, task, contract, _hello(), task_id=tid, history=HISTORY).accepted
    assert is_admitted(home, contract, tid, task)


def test_low_noise_after_the_data_is_read(tmp_path: Path, task_contract, node_home) -> None:  # type: ignore[no-untyped-def]
    task, contract = task_contract
    home = node_home(approval="auto")
    # hello.train_rows is the released, noisy count: it decides nothing against min_rows (the true
    # count met that fixed threshold at hello, fedgov.node.hello)
    assert admit(home, task, contract, _hello(rows=20), task_id="a", history=HISTORY).code != "too-few-rows"
    assert admit(home, task, contract, _hello(sigma=0.1), task_id="b", history=HISTORY).code == "noise-below-min"
