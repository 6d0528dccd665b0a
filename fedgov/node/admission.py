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
from fedgov.protocol import fingerprint
from fedgov.config import Contract, Task
from fedgov.privacy.events import Mechanism
from fedgov.errors import BudgetExceeded
from fedgov.node.home import NodeHome, budget_of
from fedgov.node.gate import GateContext
from fedgov.node.policy import check_task
from fedgov.node.refusals import Refusal, error_reason, is_allowed, refusal_text

__all__ = [
    "EVALUATION_NOTE",
    "after_hello",
    "audit_decision",
    "awaiting_approval",
    "before_hello",
    "check_admitted",
    "hello_refusal",
    "node_display_name",
    "precheck",
    "public_answer",
    "public_hello",
    "query_gate_context",
    "released_counts",
    "stop_blocked",
    "task_gate_context",
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


def node_display_name(home: NodeHome, node: str) -> str:
    """The name this node gives itself in its hellos and answers: its policy's ``name``, else
    the CBS name of its code (a Dutch municipality), else the code itself."""
    from fedgov.config.municipalities import display_name
    from fedgov.errors import FedgovError

    try:
        if home.exists():
            name = home.policy().name
            if name:
                return name
    except FedgovError:  # a policy that does not load: the node refuses; its code names it
        pass
    return display_name(node)


def hello_refusal(node: str, code: str, reason: str) -> P.NodeHello:
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
    lim = getattr(policy, "limits", None)
    values: dict[str, Any] = {"setting": _RULE_SETTING.get(code, "policy"), "contract": contract.ref if contract else "-"}
    if code == "kind-not-allowed":
        values["value"] = kind
    elif code in ("model-not-allowed", "model-rejected"):
        values["value"] = task.model.name
    elif code == "strategy-not-allowed":
        values["value"] = task.training.strategy
    elif code == "too-few-rows":
        from fedgov.node.policy import min_rows_for

        limit, values["setting"] = min_rows_for(policy, task) if policy is not None else (None, "limits.min_rows")
        values["limit"] = "-" if limit is None else limit
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
    return hello_refusal(node, code, public_reason(code, task=task, contract=contract, policy=policy, kind=kind))


def dataset_name(home: NodeHome, contract: Contract) -> str | None:
    ds = home.policy().dataset_for(contract)
    return ds.name if ds is not None else None


def precheck(
    home: NodeHome, task: Task, contract: Contract, *, node: str, coordinator: str | None = None, simulated: bool = False
) -> P.NodeHello | None:
    """The checks that need no data. None: go on; else the refusal to send.

    In order: a policy, not paused, no reproducible noise outside a simulation, the policy's
    rules (:data:`fedgov.node.policy.RULES`), and a pinned roster for a task under secure
    aggregation.

    ``simulated``: the node is a virtual node of a simulation. Only there may a task ask for
    ``privacy.reproducible_noise`` (noise derived from the task's seed, which whoever knows the
    seed can subtract); a deployed node refuses it and draws its noise from its own generator.
    """
    if not home.exists():
        return hello_refusal(node, P.RefusalCode.NO_POLICY.value, refusal_text("no-policy"))
    paused, _ = home.state.paused()
    if paused:
        return hello_refusal(node, P.RefusalCode.PAUSED.value, refusal_text("paused"))
    if task.privacy.enabled and task.privacy.reproducible_noise and not simulated:
        return hello_refusal(node, P.RefusalCode.REPRODUCIBLE_NOISE.value, refusal_text("reproducible-noise"))
    policy = home.policy()
    decision = check_task(policy, task=task, contract=contract, rows=None, noise_multiplier=None, coordinator=coordinator)
    if not decision.accepted:
        return _policy_refusal(node, decision, task, contract, policy)
    if task.training.secure_aggregation and policy.secure_aggregation is None:
        # Secure by default: without a pinned roster no peer's keys can be checked.
        return hello_refusal(node, "secure-aggregation-no-roster", refusal_text("secure-aggregation-no-roster"))
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
            rejected = home.state.status(fp) == "rejected"
            code = "approval-rejected" if rejected else P.RefusalCode.PENDING_APPROVAL.value
            return hello_refusal(node, code, refusal_text(code, key=fp))
    if task.privacy.enabled:
        state = home.ledger.task_state(task_id, dataset=ds.name)
        if state == "open":
            # A resumed run (the coordinator restarted): the reservation made when the task was
            # first admitted still holds; nothing is reserved twice.
            log.info("node %s: task %s resumes its open reservation", node, task_id)
            return hello
        if state == "closed":
            return hello_refusal(node, P.RefusalCode.TASK_ENDED.value, refusal_text("task-ended", task_id=task_id))
        mechanism = Mechanism.dpsgd(history, accountant=task.privacy.accountant)
        try:
            home.ledger.reserve(dataset=ds.name, task_id=task_id, mechanism=mechanism, budget=budget_of(ds))
        except BudgetExceeded:
            return hello_refusal(node, P.RefusalCode.BUDGET_EXHAUSTED.value, public_reason("budget-exhausted"))
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


# --- around the node's handlers (the ClientApp's mods call these) ----------------------------


def public_hello(hello: P.NodeHello, task: Task) -> P.NodeHello:
    """What of a hello may leave the node: who, whether, a refusal's code and fixed text; for an
    acceptance the released (noisy) row count with the delta and noise multiplier computed
    from it, and as the planned epsilon the task's own target (which the node's plan keeps).
    A refusal carries no sizes."""
    if not hello.accepted:
        return hello.model_copy(update={"train_rows": 0, "test_rows": 0, "delta": None, "noise_multiplier": None,
                                        "planned_epsilon": None, "evaluation_noise": None})
    planned = task.privacy.target_epsilon if task.privacy.enabled else None
    return hello.model_copy(update={"test_rows": 0, "planned_epsilon": planned, "reason": ""})


def audit_decision(home: NodeHome, task_id: str, hello: P.NodeHello, history: list[tuple[float, float, int]] | None = None) -> None:
    """The node's decision in its audit log: the code and fixed text, and for an acceptance the
    mechanism reserved in the ledger (its own record); no row counts."""
    if not home.path.is_dir():
        return
    payload: dict[str, Any] = {"accepted": hello.accepted, "code": hello.code, "reason": hello.reason}
    if hello.accepted:
        payload.update(epsilon_reserved=hello.planned_epsilon, mechanism=[list(h) for h in history or []])
    home.audit.append("decision", task_id=task_id, payload=payload)


def before_hello(
    home: NodeHome, task: Task, contract: Contract, *, node: str, task_id: str, simulated: bool = False
) -> P.NodeHello | None:
    """Before the hello handler touches the data: :func:`precheck`, a refusal in the audit log."""
    early = precheck(home, task, contract, node=node, simulated=simulated)
    if early is not None:
        audit_decision(home, task_id, early)
    return early


def after_hello(
    home: NodeHome, task: Task, contract: Contract, hello: P.NodeHello, *, task_id: str, accountant: str | None
) -> tuple[P.NodeHello, str | None]:
    """After the hello handler read the data and planned DP-SGD (``hello``; ``accountant``, the
    :class:`~fedgov.node.rounds.DPState` it kept, as JSON): the remaining rules, approval and
    the reservation of the task's whole planned spend (:func:`admit`), the decision in the
    audit log. A resumed task's accountant continues from this node's own ledger, never the
    coordinator's word. Returns the hello that may leave (:func:`public_hello`) and, for a
    resumed task, the accountant to keep instead (JSON), else None."""
    from fedgov.node.rounds import DPState  # with the DP-SGD planning (torch): only where the node trains

    def kept() -> DPState:
        if accountant is None:
            raise KeyError("the hello handler kept no accountant for an accepted task")
        return DPState.from_json(accountant)

    history: list[tuple[float, float, int]] = []
    if hello.accepted and task.privacy.enabled:
        plan = kept().plan(task, hello.train_rows)
        history = plan.planned_history() if hasattr(plan, "planned_history") else plan.history_after(task.training.rounds)
    final = admit(home, task, contract, hello, task_id=task_id, history=history)
    resumed = None
    if final.accepted and task.privacy.enabled:
        done = spent(home, contract, task, task_id=task_id)
        if done:
            dp = kept()
            dp.history = spent_history(home, contract, task, task_id=task_id)
            resumed = dp.to_json()
            home.audit.append("resume", task_id=task_id, payload={"rounds_spent": sorted(done)})
    audit_decision(home, task_id, final, history)
    return public_hello(final, task), resumed


def check_admitted(home: NodeHome, contract: Contract, task: Task, *, task_id: str) -> Refusal | None:
    """A train or evaluate message runs only for a task this node admitted and has not closed."""
    if is_admitted(home, contract, task_id, task):
        return None
    return Refusal(P.RefusalCode.NOT_ADMITTED.value, {"task_id": task_id})


def released_counts(home: NodeHome, contract: Contract) -> set[int]:
    """The row counts this node has released for the data set serving ``contract`` (ledger),
    and the public clamp of each that its replies carry (:func:`~fedgov.node.rounds.public_row_count`)."""
    from fedgov.node.rounds import ROWS_NOTE, public_row_count

    ds = dataset_name(home, contract)
    if ds is None:
        return set()
    released = {int(ev.note[len(ROWS_NOTE):]) for ev in home.ledger.events(ds) if ev.kind == "spend" and ev.note.startswith(ROWS_NOTE)}
    return released | {public_row_count(v) for v in released}


def task_gate_context(
    home: NodeHome, task: Task, contract: Contract, *, task_id: str, kind: str, server_round: int | None, simulated: bool
) -> GateContext:
    """The node's own facts the release gate checks a reply of a task against: its ledger,
    never the message's word."""
    return GateContext(
        kind=kind,
        server_round=server_round,
        simulated=simulated,
        privacy_enabled=task.privacy.enabled,
        secure=task.training.secure_aggregation,
        target_epsilon=task.privacy.target_epsilon,
        round_spent=lambda r: r in spent(home, contract, task, task_id=task_id),
        released_rows=lambda: released_counts(home, contract),
        round_evaluated=lambda r: r in evaluated_rounds(home, contract, task, task_id=task_id),
    )


def query_gate_context(
    home: NodeHome, contract: Contract, *, query_id: str | None, secure: bool, kind: str, server_round: int | None,
    simulated: bool,
) -> GateContext:
    """The facts the release gate checks a reply to a statistics query against: is the
    query's spend in this node's ledger?"""
    ds = dataset_name(home, contract)

    def query_spent() -> bool:
        return ds is not None and any(ev.task_id == query_id and ev.kind == "spend" for ev in home.ledger.events(ds))

    return GateContext(kind=kind, server_round=server_round, simulated=simulated, secure=secure, query_spent=query_spent)


def stop_blocked(
    home: NodeHome, *, kind: str, task_id: str | None, violations: list[str], task: Task | None = None,
    contract: Contract | None = None,
) -> None:
    """The release gate blocked a reply: the violations (field names, never values) in the
    audit log, and the task stopped at this node (its reservation closed, so every later
    message of it is refused)."""
    if not home.path.is_dir():
        return
    home.audit.append("blocked", task_id=task_id, payload={"kind": kind, "violations": violations})
    if task is not None and contract is not None and task_id is not None:
        release(home, contract, task, task_id=task_id, note="stopped by the node's release gate")


def public_answer(answer: P.StatsAnswer, query: Any, contract: Contract, home: NodeHome) -> P.StatsAnswer:
    """What of a statistics answer may leave: a refusal whose text is not a fixed template gets
    the fixed text of its code (the detailed reason stays at the node, in its audit log), or
    the fixed internal-error text for a code without a template."""
    if answer.accepted or is_allowed(answer.code, answer.reason):
        return answer
    code = answer.code or "internal-error"
    try:
        reason = public_reason(code, task=query, contract=contract, policy=home.policy(), kind="statistics")
    except Exception:  # noqa: BLE001 - a code without a template: the fixed internal text
        code, reason = "internal-error", error_reason("internal-error").partition(": ")[2]
    return answer.model_copy(update={"code": code, "reason": reason})
