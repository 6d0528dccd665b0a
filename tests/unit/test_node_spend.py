"""What a round or an evaluation may spend at the node (:mod:`fedgov.node.spend`), without Flower:
a round is charged once, resent (never retrained) after a coordinator's restart, and its update
does not leave when its spend cannot be recorded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedgov import protocol as P
from fedgov.config import Contract, Task, load_task
from fedgov.node.admission import admit
from fedgov.node.home import NodeHome
from fedgov.node.refusals import Refusal
from fedgov.node.spend import Resend, after_train, before_evaluation, before_train, end_task
from fedgov.protocol import task_id_of

ROOT = Path(__file__).resolve().parents[2]
SIGMA, Q = 1.5, 1 / 26
ROUND = {"noise-multiplier": SIGMA, "sample-rate": Q, "steps": 26.0, "epsilon": 0.4, "num-examples": 6590.0}


@pytest.fixture()
def admitted(node_home: Callable[..., NodeHome]) -> tuple[NodeHome, Task, Contract, str]:
    task, contract = load_task(ROOT / "configs" / "tasks" / "adult-income.toml")
    home = node_home(approval="auto")
    tid = task_id_of(task, contract, "7")
    hello = P.NodeHello(node="GM0363", accepted=True, train_rows=6590, test_rows=0, delta=1e-5, noise_multiplier=SIGMA)
    assert admit(home, task, contract, hello, task_id=tid, history=[(SIGMA, Q, 260)]).accepted
    return home, task, contract, tid


def _spends(home: NodeHome) -> list[int | None]:
    return [e.round for e in home.ledger.events() if e.kind == "spend" and not e.task_id.startswith("rows-")]


def test_a_round_is_charged_once_and_resent_after_a_restart(admitted: tuple[NodeHome, Task, Contract, str]) -> None:
    home, task, contract, tid = admitted
    update = {"w": np.arange(6, dtype=np.float32)}
    assert before_train(home, contract, task, task_id=tid, server_round=1, digest="g1") is None
    assert after_train(home, contract, task, task_id=tid, server_round=1, digest="g1", update=update, metrics=ROUND) is None
    assert _spends(home) == [1]
    again = before_train(home, contract, task, task_id=tid, server_round=1, digest="g1")
    assert isinstance(again, Resend)
    assert np.array_equal(again.arrays["w"], update["w"]) and again.metrics == ROUND
    assert _spends(home) == [1]  # no new spend
    assert [e.kind for e in home.audit.entries()][-1] == "resent"


def test_a_spent_round_from_another_model_or_under_distributed_dp_is_refused(
    admitted: tuple[NodeHome, Task, Contract, str],
) -> None:
    home, task, contract, tid = admitted
    after_train(home, contract, task, task_id=tid, server_round=1, digest="g1", update={"w": np.zeros(2)}, metrics=ROUND)
    other = before_train(home, contract, task, task_id=tid, server_round=1, digest="another")
    assert other == Refusal("round-spent", {"round": 1, "task_id": tid})
    distributed = task.model_copy(update={"privacy": task.privacy.model_copy(update={"mode": "distributed"})})
    refused = before_train(home, contract, distributed, task_id=tid, server_round=1, digest="g1")
    assert isinstance(refused, Refusal) and refused.code == "round-spent"
    assert refused.reason().startswith("round-spent: round 1 of task ")


def test_an_update_whose_spend_cannot_be_recorded_does_not_leave(admitted: tuple[NodeHome, Task, Contract, str]) -> None:
    home, task, contract, tid = admitted
    beyond = {**ROUND, "steps": 261.0}  # more than the reservation
    refused = after_train(home, contract, task, task_id=tid, server_round=1, digest="g1", update={"w": np.zeros(2)}, metrics=beyond)
    assert refused == Refusal("spend-not-recorded")
    assert _spends(home) == []
    assert before_train(home, contract, task, task_id=tid, server_round=1, digest="g1") is None  # nothing kept to resend


def test_the_end_of_a_task_releases_its_reservation_and_drops_the_copy(admitted: tuple[NodeHome, Task, Contract, str]) -> None:
    home, task, contract, tid = admitted
    after_train(home, contract, task, task_id=tid, server_round=1, digest="g1", update={"w": np.zeros(2)}, metrics=ROUND)
    end_task(home, contract, task, task_id=tid)
    assert home.ledger.task_state(tid) == "closed"
    assert not any((home.path / "sent").iterdir())
    assert [e.kind for e in home.audit.entries()][-1] == "release"


def test_an_evaluation_the_node_did_not_plan_is_refused(admitted: tuple[NodeHome, Task, Contract, str]) -> None:
    home, task, contract, tid = admitted
    assert before_evaluation(home, contract, task, task_id=tid, server_round=1, dp=None) == Refusal("evaluation-not-offered")
    no_dp = task.model_copy(update={"privacy": task.privacy.model_copy(update={"enabled": False})})
    assert before_evaluation(home, contract, no_dp, task_id=tid, server_round=1, dp=None) is None
