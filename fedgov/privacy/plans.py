"""The privacy plans a task implies, computed the same way at every node and at the coordinator.

Pure functions of the task (and, for a node's local DP-SGD plan, its row count): no files, no
messages. The node calibrates its noise with them; the coordinator uses the distributed-DP
plan to decode the secure sum. Calibration is a search over an accountant (seconds), so each
plan is cached on the numbers it depends on.
"""

from __future__ import annotations

import functools

from fedgov.config import Task
from fedgov.privacy.accounting import AccountantName, DPPlan, plan_node_dp
from fedgov.privacy.distributed import DistributedPlan, plan_distributed

__all__ = ["distributed_plan", "node_evaluations", "node_plan", "task_delta"]


def node_evaluations(task: Task) -> int:
    """How many DP evaluations of the global model this node plans for ``task`` (local DP-SGD
    only: under distributed DP the guarantee is per municipality, which a per-record count
    release would not keep, so the nodes do not evaluate)."""
    p = task.privacy
    return task.evaluation.node_evaluations(task.training.rounds, enabled=p.enabled and p.mode == "local")


def node_plan(task: Task, rows: int) -> DPPlan:
    """The node's local DP-SGD plan for ``task`` on ``rows`` records (its sigma and steps).

    ``rows`` is the node's released (noisy) row count: the automatic batch size and local epochs
    (:meth:`~fedgov.config.TrainingSpec.resolved`) come from it, so nothing in the plan depends
    on the true count."""
    p = task.privacy
    training = task.training.resolved(rows, dp_sgd=True)  # automatic settings from the (released) row count
    return _plan_cached(
        rows, training.batch, training.epochs, task.training.rounds,
        p.target_epsilon, p.delta_for(rows), p.accountant, p.margin, node_evaluations(task), task.evaluation.epsilon,
    )


@functools.lru_cache(maxsize=256)
def _plan_cached(
    rows: int, batch_size: int, local_epochs: int, rounds: int,
    target_epsilon: float, delta: float, accountant: AccountantName, margin: float, evaluations: int = 0,
    evaluation_epsilon: float = 0.0,
) -> DPPlan:
    """Calibrating sigma takes seconds (a search over the PRV accountant): do it once."""
    return plan_node_dp(
        rows=rows, batch_size=batch_size, local_epochs=local_epochs, rounds=rounds,
        target_epsilon=target_epsilon, delta=delta, accountant=accountant, margin=margin,
        evaluations=evaluations, evaluation_epsilon=evaluation_epsilon,
    )


def task_delta(task: Task, rows: int) -> float:
    """The task's delta at a node: per record for local DP-SGD (``delta_for``), per municipality
    (``privacy.delta``, default 1e-5) for distributed DP."""
    if task.privacy.mode == "distributed":
        return task.privacy.delta if task.privacy.delta is not None else 1e-5
    return task.privacy.delta_for(rows)


def distributed_plan(task: Task, dimension: int) -> DistributedPlan:
    """The task's distributed-DP plan (the same at every node and the coordinator)."""
    p = task.privacy
    return _dplan_cached(
        dimension, p.update_clip, task.training.rounds, task.training.fraction_train, p.target_epsilon,
        task_delta(task, 0), p.accountant, p.margin,
    )


@functools.lru_cache(maxsize=64)
def _dplan_cached(
    dimension: int, clip: float, rounds: int, sample_rate: float, target_epsilon: float, delta: float, accountant: str, margin: float,
) -> DistributedPlan:

    return plan_distributed(
        dimension=dimension, clip=clip, rounds=rounds, sample_rate=sample_rate, target_epsilon=target_epsilon,
        delta=delta, accountant=accountant, margin=margin,
    )
