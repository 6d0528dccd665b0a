"""The policy's rules (:data:`fedgov.node.policy.RULES`): one ordered tuple, one signature, shared by
training tasks and statistics queries."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from fedgov.config import Contract, Task, load_task
from fedgov.node.policy import RULES, NodePolicy, PolicyCode, Proposal, check_query, check_task, decide, load_policy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo() -> tuple[Task, Contract]:
    return load_task(ROOT / "configs" / "tasks" / "adult-income.toml")


@pytest.fixture(scope="module")
def policy() -> NodePolicy:
    return load_policy(ROOT / "configs" / "policies" / "GM0363.toml")


def _with(policy: NodePolicy, **changes: dict[str, Any] | str) -> NodePolicy:
    data = policy.model_dump()
    for key, value in changes.items():
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    return NodePolicy.model_validate(data)


def _query(contract: Contract, **kw: Any) -> Proposal:
    args: dict[str, Any] = {
        "noun": "query", "kind": "statistics", "contract": contract, "coordinator": None, "submitter": None,
        "secure_aggregation": False, "privacy": True, "epsilon": 0.5, "delta": 1e-6,
    }
    args.update(kw)
    return Proposal(**args)


def test_the_rules_run_in_the_documented_order() -> None:
    """The order decides which refusal a node gives first: who may ask, then what is asked of
    which data set, then how much."""
    assert [r.__name__.lstrip("_") for r in RULES] == [
        "approval", "kind", "coordinator", "submitter", "contract", "model", "strategy", "secure_aggregation",
        "privacy", "distributed", "epsilon", "evaluation_epsilon", "delta", "noise", "rows",
    ]


def test_every_rule_has_the_one_signature() -> None:
    for rule in RULES:
        assert list(inspect.signature(rule).parameters) == ["policy", "p"], rule.__name__


def test_a_conforming_task_and_query_pass_every_rule(policy: NodePolicy, demo: tuple[Task, Contract]) -> None:
    task, contract = demo
    open_policy = _with(policy, accept={"kinds": ["training", "statistics"]})
    assert check_task(open_policy, task=task, contract=contract, rows=5000, noise_multiplier=1.0).accepted
    proposal = _query(contract)
    assert all(rule(open_policy, proposal) is None for rule in RULES)
    d = decide(open_policy, proposal)
    assert d.accepted and d.reason.startswith("query conforms to the node policy") and d.dataset == "adult"


def test_the_training_rules_pass_a_query(policy: NodePolicy, demo: tuple[Task, Contract]) -> None:
    """A query has no model, strategy, privacy mode, evaluations, noise or rows to check."""
    _, contract = demo
    strict = _with(
        policy,
        accept={"kinds": ["statistics"], "models": ["mlp"], "strategies": ["fedprox"]},
        limits={"require_distributed": True, "min_noise_multiplier": 50.0, "max_evaluation_epsilon": 0.0},
    )
    assert check_query(strict, contract=contract, epsilon=0.5, delta=1e-6).accepted


def test_a_query_meets_the_same_rules_as_a_task(policy: NodePolicy, demo: tuple[Task, Contract]) -> None:
    task, contract = demo
    both = _with(policy, accept={"kinds": ["training", "statistics"]})
    big = check_query(both, contract=contract, epsilon=50.0, delta=1e-6)
    assert big.code is PolicyCode.EPSILON_ABOVE_MAX and big.reason.startswith("query asks epsilon 50.0 per node")
    assert check_query(both, contract=contract, epsilon=0.5, delta=0.5).code is PolicyCode.DELTA_ABOVE_MAX
    strict = _with(both, limits={"require_secure_aggregation": True})
    d = check_query(strict, contract=contract, epsilon=0.5, delta=1e-6)
    assert d.code is PolicyCode.SECURE_AGGREGATION_REQUIRED and "query has secure_aggregation = false" in d.reason
    assert check_query(strict, contract=contract, epsilon=0.5, delta=1e-6, secure_aggregation=True).accepted
    # one order for both: who may ask comes before secure aggregation
    other = contract.model_copy(update={"version": "9.9"})
    assert check_query(strict, contract=other, epsilon=0.5, delta=1e-6).code is PolicyCode.CONTRACT_NOT_SERVED
    no_stats = _with(strict, accept={"kinds": ["training"]})
    assert check_query(no_stats, contract=contract, epsilon=0.5, delta=1e-6).code is PolicyCode.KIND_NOT_ALLOWED
    assert check_task(strict, task=task, contract=other, rows=None, noise_multiplier=None).code is PolicyCode.CONTRACT_NOT_SERVED


def test_a_query_names_every_contract_the_node_serves(policy: NodePolicy, demo: tuple[Task, Contract]) -> None:
    _, contract = demo
    both = _with(policy, accept={"kinds": ["training", "statistics"]})
    d = check_query(both, contract=contract.model_copy(update={"name": "wmo-clients"}), epsilon=0.5, delta=1e-6)
    assert d.code is PolicyCode.CONTRACT_NOT_SERVED and d.dataset is None
    assert d.reason == (
        "query uses contract wmo-clients@1.0; this node serves adult-income@1.0 (datasets.contract, datasets.versions)"
    )
