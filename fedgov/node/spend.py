"""What a train or evaluate message may spend at the node: decided before, recorded before it leaves.

The node's budget mod (``clients.mods.budget_mod``) parses a message, calls one function here
and builds the reply or the refusal:

* :func:`before_train`: a round is trained and charged once. After a coordinator's restart
  it may ask for a round this node already trained and spent: the node then resends the very
  update it sent (it left the node already, so resending releases nothing new), or refuses
  when it kept no copy, or under distributed DP (the noise share is drawn when the update is
  masked: a second one would be a second release of the same update).
* :func:`after_train`: the round's DP-SGD steps go into the ledger before the update leaves;
  if they cannot be recorded, the update does not leave.
* :func:`before_evaluation`: an evaluation of the global model only when the node planned it
  at admission (local DP), once per round, within the task's epsilon; its spend goes into the
  ledger and the node's accountant before the counts are computed.
* :func:`end_task`: what the task reserved and did not spend goes back to the budget.
"""

from __future__ import annotations

import logging

import numpy as np

from fedgov.config import Contract, Task
from fedgov.node import admission
from fedgov.node.audit import as_finite
from fedgov.node.home import NodeHome
from fedgov.node.refusals import Refusal
from fedgov.node.rounds import DPState, SentUpdates

__all__ = ["Resend", "after_train", "before_evaluation", "before_train", "end_task"]

log = logging.getLogger(__name__)


class Resend:
    """The update this node sent for a round before, to send again without training or spending."""

    __slots__ = ("arrays", "metrics")

    def __init__(self, arrays: dict[str, np.ndarray], metrics: dict[str, float]) -> None:
        self.arrays = arrays
        self.metrics = metrics  # what the round left for the mods (rows, the round's steps)


def _sent(home: NodeHome) -> SentUpdates:
    return SentUpdates(home.path / "sent")


def before_train(
    home: NodeHome, contract: Contract, task: Task, *, task_id: str, server_round: int, digest: str
) -> Refusal | Resend | None:
    """None: train the round. A :class:`Resend` when the round was trained and spent before from
    the same global model (``digest``: :func:`~fedgov.node.rounds.model_digest`) and this node
    kept what it sent; else ``round-spent``."""
    if server_round not in admission.spent(home, contract, task, task_id=task_id):
        return None
    # This round was trained and spent before (the coordinator restarted in the middle of it).
    if task.privacy.mode == "distributed":
        # The noise share is drawn when the update is masked: a second one would be a second
        # release of the same update. The round goes on without this node.
        return Refusal("round-spent", {"round": server_round, "task_id": task_id})
    again = _sent(home).load(task_id, server_round, digest)
    if again is None:
        return Refusal("round-spent", {"round": server_round, "task_id": task_id})
    home.audit.append("resent", task_id=task_id, payload={"round": server_round, "ledger": "no new spend"})
    return Resend(*again)


def after_train(
    home: NodeHome,
    contract: Contract,
    task: Task,
    *,
    task_id: str,
    server_round: int,
    digest: str,
    update: dict[str, np.ndarray],
    metrics: dict[str, float],
) -> Refusal | None:
    """Record the round's spend (``metrics``: what the handler left, :func:`clients.mods.stash`)
    before the reply with ``update`` leaves; keep a copy of it for a resend. None: send it."""
    entry = (float(metrics["noise-multiplier"]), float(metrics["sample-rate"]), int(metrics["steps"]))
    try:
        admission.record_spend(home, contract, task, task_id=task_id, entries=[entry], server_round=server_round)
    except Exception as exc:  # the spend could not be recorded: the update must not leave
        log.error("node: recording the spend failed (%s); withholding the update", type(exc).__name__)
        return Refusal("spend-not-recorded")
    home.audit.append(
        "spend", task_id=task_id,
        payload={"round": server_round, "mechanism": list(entry), "epsilon_task": as_finite(metrics["epsilon"])},
    )
    try:
        _sent(home).save(task_id, server_round, digest, update, metrics)
    except OSError:  # without the copy, a resumed round is refused rather than charged twice
        log.warning("node: could not keep a copy of the sent update")
    return None


def before_evaluation(
    home: NodeHome, contract: Contract, task: Task, *, task_id: str, server_round: int, dp: DPState | None
) -> Refusal | DPState | None:
    """An evaluation of the global model in round ``server_round``: refused unless planned at
    admission (local DP, ``dp`` the node's accountant), for a round of the task not evaluated
    yet (the final round when only that one is planned), within the task's planned epsilon.
    Its spend goes into the ledger first. Returns the refusal, or the accountant with the
    evaluation in it (to keep), or None for a task without DP (nothing to charge)."""
    if not task.privacy.enabled:
        return None
    plan = dp.fixed_plan(task) if dp is not None and dp.plan_json and task.privacy.mode == "local" else None
    if dp is None or plan is None or not getattr(plan, "evaluations", 0) or plan.evaluation_noise is None:
        return Refusal("evaluation-not-offered")
    repeated = Refusal("evaluation-repeated", {"round": server_round, "task_id": task_id})
    if not 1 <= server_round <= task.training.rounds or (plan.evaluations == 1 and server_round != task.training.rounds):
        return repeated
    if server_round in admission.evaluated_rounds(home, contract, task, task_id=task_id):
        return repeated
    from fedgov.privacy import epsilon_from_history, merge_history

    entry = plan.evaluation_entry()
    history = merge_history(list(dp.history) + [entry])
    if epsilon_from_history(history=history, delta=plan.delta, accountant=plan.accountant) > plan.target_epsilon:
        return Refusal("privacy-cap")
    try:
        admission.record_evaluation(home, contract, task, task_id=task_id, entry=entry, server_round=server_round)
    except Exception as exc:  # noqa: BLE001 - not recorded: nothing is computed or sent
        log.error("node: recording the evaluation's spend failed (%s)", type(exc).__name__)
        return Refusal("spend-not-recorded")
    dp.history = list(history)
    home.audit.append("spend", task_id=task_id, payload={"round": server_round, "mechanism": list(entry), "evaluation": True})
    return dp


def end_task(home: NodeHome, contract: Contract, task: Task, *, task_id: str) -> None:
    """The task ended: release what it reserved and did not spend, drop the kept update."""
    admission.release(home, contract, task, task_id=task_id, note="task ended")
    _sent(home).drop(task_id)
    home.audit.append("release", task_id=task_id, payload={"ledger": "released what was reserved and not spent"})
