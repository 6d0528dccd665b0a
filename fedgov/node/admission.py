"""Admission control at the node: policy, approval, pause and the privacy-budget ledger.

The node decides; the coordinator only asks. For every task the node

1. before it touches any data: checks the task against its policy (every rule that does
   not need the data: kind, coordinator, contract served, model, strategy, privacy required,
   epsilon and delta per task) and its pause switch;
2. after reading and validating its data and planning its DP-SGD: checks the rules that need
   them (rows, noise multiplier), asks for an operator's approval when the policy says
   ``manual``, and **reserves the task's whole planned epsilon** in its ledger, atomically;
3. each round: trains only a task it admitted, and records the round's spend before the
   reply leaves;
4. at the end: releases what the task reserved but did not use. If the task never ends (a
   crash, a coordinator that disappears), the reservation keeps counting in full.

Refusals carry a machine-readable code and a text, never a data value. The Flower mods in
``clients/mods.py`` call these functions in a documented order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fedgov import protocol as P
from fedgov.protocol import fingerprint, task_id_of
from fedgov.config import Contract, Task
from fedgov.node.ledger import Mechanism
from fedgov.errors import BudgetExceeded
from fedgov.node.home import NodeHome, budget_of
from fedgov.node.policy import check_task

__all__ = [
    "precheck",
    "admit",
    "dataset_name",
    "record_spend",
    "release",
    "is_admitted",
    "spent",
    "spent_history",
    "evaluated_rounds",
    "record_evaluation",
    "public_reason",
]

log = logging.getLogger(__name__)


def _refusal(node: str, code: str, reason: str) -> P.NodeHello:
    """A refusal to send; ``reason`` must be a text of :mod:`fedgov.node.refusals` (the release
    gate refuses any other)."""
    from fedgov.config.municipalities import display_name

    return P.NodeHello(node=node, node_name=display_name(node), accepted=False, code=code, reason=reason)


# The setting each policy rule is about, for its public refusal text.
_RULE_SETTING = {
    "kind-not-allowed": "accept.kinds",
    "coordinator-not-allowed": "accept.coordinators",
    "submitter-not-allowed": "accept.submitters",
    "model-not-allowed": "accept.models",
    "strategy-not-allowed": "accept.strategies",
    "privacy-required": "limits.require_privacy",
    "secure-aggregation-required": "limits.require_secure_aggregation",
    "distributed-dp-required": "limits.require_distributed",
    "epsilon-above-max": "limits.max_epsilon_per_task",
    "delta-above-max": "limits.max_delta_per_task",
    "noise-below-min": "limits.min_noise_multiplier",
    "too-few-rows": "limits.min_rows",
    "evaluation-epsilon-above-max": "limits.max_evaluation_epsilon",
    "budget-exhausted": "datasets.budget",
}


def public_reason(code: str, *, task: Any = None, contract: Contract | None = None, policy: Any = None, kind: str = "training") -> str:
    """The text that leaves the node for a refusal of ``code`` (:mod:`fedgov.node.refusals`):
    only the task's own values, the contract's name and the policy's limits; the detailed
    reason stays at the node."""
    from fedgov.node.refusals import refusal_text

    lim = getattr(policy, "limits", None)
    values: dict[str, Any] = {"setting": _RULE_SETTING.get(code, "policy"), "contract": contract.ref if contract else "-"}
    if code == "kind-not-allowed":
        values["value"] = kind
    elif code in ("model-not-allowed", "model-rejected"):
        values["value"] = task.model.name
    elif code == "strategy-not-allowed":
        values["value"] = task.training.strategy
    elif code == "epsilon-above-max":
        eps = getattr(task.privacy, "target_epsilon", None) or getattr(task.privacy, "epsilon", "-")
        values.update(value=eps, limit=lim.max_epsilon_per_task if lim else "-")
    elif code == "evaluation-epsilon-above-max":
        values.update(value=task.evaluation.epsilon, limit=lim.max_evaluation_epsilon if lim else "-")
    elif code == "delta-above-max":
        values["limit"] = lim.max_delta_per_task if lim else "-"
    elif code == "noise-below-min":
        values["limit"] = lim.min_noise_multiplier if lim else "-"
    return refusal_text(code, **values)


def _policy_refusal(node: str, decision: Any, task: Any, contract: Contract, policy: Any, kind: str = "training") -> P.NodeHello:
    code = str(decision.code.value if decision.code else "policy")
    return _refusal(node, code, public_reason(code, task=task, contract=contract, policy=policy, kind=kind))


def dataset_name(home: NodeHome, contract: Contract) -> str | None:
    ds = home.policy().dataset_for(contract)
    return ds.name if ds is not None else None


def precheck(
    home: NodeHome, task: Task, contract: Contract, *, node: str, coordinator: str | None = None, simulated: bool = False
) -> P.NodeHello | None:
    """The checks that need no data. None: go on; else the refusal to send.

    ``simulated``: the node is a virtual node of a simulation. Only there may a task ask for
    ``privacy.reproducible_noise`` (noise derived from the task's seed, which whoever knows the
    seed can subtract); a deployed node refuses it and draws its noise from its own generator.
    """
    from fedgov.node.refusals import refusal_text

    if not home.exists():
        return _refusal(node, P.RefusalCode.NO_POLICY.value, refusal_text("no-policy"))
    paused, _ = home.state.paused()
    if paused:
        return _refusal(node, P.RefusalCode.PAUSED.value, refusal_text("paused"))
    if task.privacy.enabled and task.privacy.reproducible_noise and not simulated:
        return _refusal(node, P.RefusalCode.REPRODUCIBLE_NOISE.value, refusal_text("reproducible-noise"))
    policy = home.policy()
    decision = check_task(policy, task=task, contract=contract, rows=None, noise_multiplier=None, coordinator=coordinator)
    if not decision.accepted:
        return _policy_refusal(node, decision, task, contract, policy)
    return None


def _summary(task: Task, contract: Contract, dataset: str, hello: P.NodeHello) -> dict[str, Any]:
    """What an operator sees before approving: what the task would spend and send. No data."""
    return {
        "task": task.name,
        "contract": contract.ref,
        "dataset": dataset,
        "model": task.model.name,
        "rounds": task.training.rounds,
        "strategy": task.training.strategy,
        "epsilon": task.privacy.target_epsilon if task.privacy.enabled else "no DP",
        "delta": hello.delta if hello.delta is not None else "-",
        "noise_multiplier": hello.noise_multiplier if hello.noise_multiplier is not None else "-",
        "sends": _sends(task),
    }


def _sends(task: Task) -> str:
    """What the task makes this node send, in words (the release gate's rules)."""
    from fedgov.privacy.plans import node_evaluations

    rounds = task.training.rounds
    update = "its masked update (secure aggregation)" if task.training.secure_aggregation else "its DP-SGD model update"
    if task.privacy.mode == "distributed" and task.privacy.enabled:
        update = "its clipped update with a distributed-DP noise share, masked (secure aggregation)"
    evals = node_evaluations(task)
    text = f"{update} in each of {rounds} rounds; no row counts, losses or metrics"
    if evals:
        text += f"; {evals} evaluation(s) as noisy correct and total counts (epsilon {task.evaluation.epsilon} of the task's)"
    return text


def admit(
    home: NodeHome,
    task: Task,
    contract: Contract,
    hello: P.NodeHello,
    *,
    task_id: str,
    history: list[tuple[float, float, int]],
    coordinator: str | None = None,
) -> P.NodeHello:
    """After the data is read and DP-SGD planned: the remaining rules, approval, reservation.

    ``history`` is the task's whole planned DP-SGD spend (all rounds), as accountant entries.
    """
    if not hello.accepted:
        return hello
    node = hello.node
    policy = home.policy()
    # rows=None: the policy's min_rows was checked on the true count at hello (a fixed threshold);
    # hello.train_rows is the released, noisy count, which decides nothing against it
    decision = check_task(
        policy, task=task, contract=contract, rows=None, noise_multiplier=hello.noise_multiplier, coordinator=coordinator
    )
    if not decision.accepted:
        return _policy_refusal(node, decision, task, contract, policy)
    ds = policy.dataset_for(contract)
    assert ds is not None  # check_task refuses a contract no data set serves
    if policy.approval == "manual":
        fp = fingerprint(task, contract)
        waiting = awaiting_approval(home, fp, lambda: _summary(task, contract, ds.name, hello), what="task")
        if waiting is not None:
            from fedgov.node.refusals import refusal_text

            rejected = home.state.status(fp) == "rejected"
            code = "approval-rejected" if rejected else P.RefusalCode.PENDING_APPROVAL.value
            return _refusal(node, code, refusal_text(code, key=fp))
    if task.privacy.enabled:
        state = home.ledger.task_state(task_id, dataset=ds.name)
        if state == "open":
            # A resumed run (the coordinator restarted): the reservation made when the task was
            # first admitted still holds; nothing is reserved twice.
            log.info("node %s: task %s resumes its open reservation", node, task_id)
            return hello
        if state == "closed":
            from fedgov.node.refusals import refusal_text

            return _refusal(node, P.RefusalCode.TASK_ENDED.value, refusal_text("task-ended", task_id=task_id))
        mechanism = Mechanism.dpsgd(history, accountant=task.privacy.accountant)
        try:
            home.ledger.reserve(dataset=ds.name, task_id=task_id, mechanism=mechanism, budget=budget_of(ds))
        except BudgetExceeded:
            return _refusal(node, P.RefusalCode.BUDGET_EXHAUSTED.value, public_reason("budget-exhausted"))
    return hello


def awaiting_approval(home: NodeHome, key: str, summary: Callable[[], dict[str, Any]], *, what: str) -> str | None:
    """With ``approval = "manual"``: None once the operator approved ``key``; else the reason to
    refuse for now (the first time, ``key`` is queued with ``summary()`` for the operator)."""
    status = home.state.status(key)
    if status == "approved":
        return None
    if status == "none":
        home.state.enqueue(key, summary=summary())
    verb = "was rejected by" if status == "rejected" else "waits for"
    return f"{what} {key} {verb} the node's operator (fedgov node approve {key})"


def is_admitted(home: NodeHome, contract: Contract, task_id: str, task: Task) -> bool:
    """Did this node admit (and reserve for) this task, and is it still open?"""
    if not task.privacy.enabled:
        return home.exists()
    ds = dataset_name(home, contract)
    return ds is not None and home.ledger.task_state(task_id, dataset=ds) == "open"


def record_spend(
    home: NodeHome, contract: Contract, task: Task, *, task_id: str, entries: list[tuple[float, float, int]], server_round: int
) -> None:
    """Record one round's DP-SGD steps in the ledger (before the reply leaves the node)."""
    ds = dataset_name(home, contract)
    if ds is None or not task.privacy.enabled or not entries:
        return
    home.ledger.spend(dataset=ds, task_id=task_id, mechanism=Mechanism.dpsgd(entries, accountant=task.privacy.accountant), round=server_round)


def release(home: NodeHome, contract: Contract, task: Task, *, task_id: str, note: str = "") -> None:
    """Close the task: what it reserved but did not spend goes back to the budget."""
    ds = dataset_name(home, contract)
    if ds is None or not task.privacy.enabled:
        return
    if home.ledger.task_state(task_id, dataset=ds) == "open":
        home.ledger.release(dataset=ds, task_id=task_id, note=note)


def spent(home: NodeHome, contract: Contract, task: Task, *, task_id: str) -> dict[int, list[tuple[float, float, int]]]:
    """The DP-SGD steps this node's ledger recorded for ``task_id``, per round: what a resumed
    task's accountant continues from (the node's own record, never the coordinator's word)."""
    ds = dataset_name(home, contract)
    if ds is None or not task.privacy.enabled:
        return {}
    out: dict[int, list[tuple[float, float, int]]] = {}
    for ev in home.ledger.events(ds):
        if ev.task_id == task_id and ev.kind == "spend" and ev.mechanism is not None and ev.round is not None \
                and ev.note != EVALUATION_NOTE:
            out.setdefault(ev.round, []).extend((float(s), float(q), int(k)) for s, q, k in ev.mechanism.history or [])
    return out


EVALUATION_NOTE = "evaluation"
"""The note of a ledger spend that is an evaluation's noisy counts (not a round's training)."""


def spent_history(home: NodeHome, contract: Contract, task: Task, *, task_id: str) -> list[tuple[float, float, int]]:
    """Every entry this node's ledger recorded for ``task_id`` (training and evaluations), in
    order: what a resumed task's accountant continues from."""
    ds = dataset_name(home, contract)
    if ds is None or not task.privacy.enabled:
        return []
    return [
        (float(s), float(q), int(k))
        for ev in home.ledger.events(ds)
        if ev.task_id == task_id and ev.kind == "spend" and ev.mechanism is not None
        for s, q, k in ev.mechanism.history or []
    ]


def evaluated_rounds(home: NodeHome, contract: Contract, task: Task, *, task_id: str) -> set[int]:
    """The rounds whose global model this node already evaluated (and charged) for ``task_id``."""
    ds = dataset_name(home, contract)
    if ds is None:
        return set()
    return {
        ev.round for ev in home.ledger.events(ds)
        if ev.task_id == task_id and ev.kind == "spend" and ev.note == EVALUATION_NOTE and ev.round is not None
    }


def record_evaluation(
    home: NodeHome, contract: Contract, task: Task, *, task_id: str, entry: tuple[float, float, int], server_round: int
) -> None:
    """Record one evaluation's noisy counts in the ledger (before they are computed)."""
    ds = dataset_name(home, contract)
    if ds is None:
        raise LookupError("no data set serves this contract")
    home.ledger.spend(
        dataset=ds, task_id=task_id, mechanism=Mechanism.dpsgd([entry], accountant=task.privacy.accountant),
        round=server_round, note=EVALUATION_NOTE,
    )
