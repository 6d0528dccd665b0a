"""Node policy: the file loads strictly, and every rule refuses with its own code and a clear text."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from fedgov.config import Contract, Task, load_contract, load_task
from fedgov.errors import ConfigError, ExitCode
from fedgov.node.policy import (
    Decision,
    NodePolicy,
    PolicyCode,
    check_task,
    default_policy_text,
    load_policy,
)

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "configs" / "policies"

GOOD = """
node = "GM0363"
approval = "auto"
[[datasets]]
name = "adult"
contract = "adult-income"
versions = ["1.0"]
path = "data/train.csv"
test_path = "data/test.csv"
[datasets.budget]
epsilon = 10.0
delta = 1e-5
period = "year"
[accept]
kinds = ["training", "statistics"]
models = ["logreg"]
strategies = ["fedavg"]
coordinators = ["vng"]
submitters = ["cbs", "rivm"]
[limits]
max_epsilon_per_task = 3.0
max_delta_per_task = 1e-5
min_noise_multiplier = 0.3
min_rows = 50
min_cohort = 10
require_privacy = true
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory, write_file) -> NodePolicy:
    return load_policy(write_file(tmp_path_factory.mktemp("policy") / "policy.toml", GOOD))


@pytest.fixture(scope="module")
def demo(demo_task_path: Path) -> tuple[Task, Contract]:
    return load_task(demo_task_path)


def variant(task: Task, **sections: dict[str, Any]) -> Task:
    """The task with some fields of its sections replaced (``privacy={"target_epsilon": 5.0}``)."""
    update: dict[str, Any] = {}
    for name, fields in sections.items():
        if isinstance(fields, dict):
            update[name] = getattr(task, name).model_copy(update=fields)
        else:
            update[name] = fields
    return task.model_copy(update=update)


def check(policy: NodePolicy, task: Task, contract: Contract, **kw: Any) -> Decision:
    args: dict[str, Any] = {"rows": 1000, "noise_multiplier": 1.0, "coordinator": "vng", "submitter": "cbs"}
    args.update(kw)
    return check_task(policy, task=task, contract=contract, **args)


# --- loading -------------------------------------------------------------------------------


def test_shipped_policies_load_and_serve_the_demo_contract(demo: tuple[Task, Contract]) -> None:
    _, contract = demo
    for name in ("GM0363.toml", "one-demo.toml"):
        pol = load_policy(POLICIES / name)
        ds = pol.dataset_for(contract)
        assert ds is not None and ds.name == "adult"
        assert ds.path.is_file(), ds.path
    assert load_policy(POLICIES / "one-demo.toml").datasets[0].budget.epsilon == 2.0


def test_one_demo_policy_pays_for_the_demo_task_once(demo: tuple[Task, Contract]) -> None:
    task, contract = demo
    pol = load_policy(POLICIES / "one-demo.toml")
    d = check_task(pol, task=task, contract=contract, rows=2000, noise_multiplier=1.0)
    assert d.accepted, d.reason
    budget = pol.datasets[0].budget
    assert task.privacy.target_epsilon <= budget.epsilon < 2 * task.privacy.target_epsilon


def test_relative_paths_resolve_against_the_policy_file(tmp_path: Path, write_file) -> None:
    p = write_file(tmp_path / "node" / "policy.toml", GOOD)
    pol = load_policy(p)
    ds = pol.datasets[0]
    assert ds.path == (tmp_path / "node" / "data" / "train.csv").resolve()
    assert ds.test_path == (tmp_path / "node" / "data" / "test.csv").resolve()


def test_a_malformed_policy_lists_every_problem_with_its_location(tmp_path: Path, write_file) -> None:
    p = write_file(
        tmp_path / "policy.toml",
        """
        node = ""
        approval = "sometimes"
        colour = "blue"
        [[datasets]]
        name = "adult"
        contract = "adult-income"
        versions = []
        path = "data.csv"
        [datasets.budget]
        epsilon = -1.0
        delta = 2.0
        period = "month"
        [accept]
        kinds = ["training", "gossip"]
        models = []
        [limits]
        max_epsilon_per_task = 0
        min_rows = 0
        """,
    )
    with pytest.raises(ConfigError) as ei:
        load_policy(p)
    err = ei.value
    assert err.exit_code == ExitCode.CONFIG
    locs = {pr.location for pr in err.problems}
    assert {
        "node",
        "approval",
        "colour",
        "datasets[0].versions",
        "datasets[0].budget.epsilon",
        "datasets[0].budget.delta",
        "datasets[0].budget.period",
        "accept.kinds[1]",
        "accept.models",
        "limits.max_epsilon_per_task",
        "limits.min_rows",
    } <= locs, locs
    text = str(err)
    assert str(p) in text
    assert "unknown field" in text
    assert 'approval = "deny"' in text  # the empty list explains how to refuse everything


def test_cross_checks_are_listed_together_with_their_locations(tmp_path: Path, write_file) -> None:
    p = write_file(
        tmp_path / "policy.toml",
        """
        node = "GM0363"
        [[datasets]]
        name = "adult"
        contract = "adult-income"
        versions = ["1.0"]
        path = "a.csv"
        [datasets.budget]
        epsilon = 2.0
        delta = 1e-5
        [[datasets]]
        name = "adult"
        contract = "adult-income"
        versions = ["1.0", "1.1"]
        path = "b.csv"
        [datasets.budget]
        epsilon = 10.0
        delta = 1e-6
        [limits]
        max_epsilon_per_task = 3.0
        """,
    )
    with pytest.raises(ConfigError) as ei:
        load_policy(p)
    by_loc: dict[str, list[str]] = {}
    for pr in ei.value.problems:
        by_loc.setdefault(pr.location, []).append(pr.message)
    assert "datasets[1].name" in by_loc and "unique" in by_loc["datasets[1].name"][0]
    assert "adult-income@1.0" in by_loc["datasets[1].versions"][0]
    eps = by_loc["limits.max_epsilon_per_task"]
    assert len(eps) == 1 and "3.0" in eps[0] and "2.0" in eps[0] and "budget" in eps[0]
    assert "1e-06" in by_loc["limits.max_delta_per_task"][0]


def test_cross_checks_also_guard_policies_built_in_code() -> None:
    data = tomllib.loads(GOOD)
    data["limits"]["max_epsilon_per_task"] = 11.0
    with pytest.raises(ValueError, match="max_epsilon_per_task"):
        NodePolicy.model_validate(data)


def test_missing_and_invalid_toml_files_are_config_errors(tmp_path: Path, write_file) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_policy(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_policy(write_file(tmp_path / "bad.toml", "node = "))


def test_dataset_for_matches_name_and_version(policy: NodePolicy, adult_contract_path: Path) -> None:
    contract = load_contract(adult_contract_path)
    assert policy.dataset_for(contract) is not None
    assert policy.dataset_for(contract.model_copy(update={"version": "2.0"})) is None
    assert policy.dataset_for(contract.model_copy(update={"name": "other"})) is None


def test_default_policy_text_loads(tmp_path: Path, write_file) -> None:
    text = default_policy_text(
        "GM0014",
        dataset="adult",
        contract="adult-income",
        version="1.0",
        path="train.csv",
        test_path=Path("sub dir") / 'te"st.csv',
        budget_epsilon=2.0,
        approval="auto",
    )
    assert text.lstrip().startswith("#")  # commented for the operator
    p = write_file(tmp_path / "policy.toml", text)
    pol = load_policy(p)
    assert pol.node == "GM0014" and pol.approval == "auto"
    ds = pol.datasets[0]
    assert ds.path == (tmp_path / "train.csv").resolve()
    assert ds.test_path == (tmp_path / "sub dir" / 'te"st.csv').resolve()
    assert ds.budget.epsilon == 2.0
    assert pol.limits.max_epsilon_per_task == 2.0  # never above the budget
    no_test = default_policy_text(
        "GM0014", dataset="adult", contract="adult-income", version="1.0", path="t.csv", budget_epsilon=10.0
    )
    pol2 = load_policy(write_file(tmp_path / "p2.toml", no_test))
    assert pol2.datasets[0].test_path is None and pol2.approval == "manual"
    assert pol2.limits.max_epsilon_per_task == 3.0


def test_default_policy_text_refuses_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="max_epsilon_per_task"):
        default_policy_text(
            "GM0014",
            dataset="adult",
            contract="adult-income",
            version="1.0",
            path="t.csv",
            budget_epsilon=1.0,
            max_epsilon_per_task=2.0,
        )


# --- decisions -----------------------------------------------------------------------------


def test_a_conforming_task_is_accepted_and_names_the_dataset(
    policy: NodePolicy, demo: tuple[Task, Contract]
) -> None:
    task, contract = demo
    d = check(policy, task, contract)
    assert d.accepted and d.code is None and d.dataset == "adult"
    assert "adult" in d.reason
    with pytest.raises(ValidationError):
        d.accepted = False  # type: ignore[misc]  # frozen


def test_a_task_above_the_per_task_maximum_is_refused(policy: NodePolicy, demo: tuple[Task, Contract]) -> None:
    task, contract = demo
    d = check(policy, variant(task, privacy={"target_epsilon": 5.0}), contract)
    assert not d.accepted
    assert d.code == PolicyCode.EPSILON_ABOVE_MAX == "epsilon-above-max"
    assert d.reason == "task asks epsilon 5.0 per node; policy allows at most 3.0 (limits.max_epsilon_per_task)"
    assert d.dataset == "adult"
    assert Decision.model_validate_json(d.model_dump_json()) == d


def _policy_with(policy: NodePolicy, **changes: dict[str, Any] | str) -> NodePolicy:
    data = policy.model_dump()
    for key, value in changes.items():
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    return NodePolicy.model_validate(data)


CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], PolicyCode, list[str]]] = [
    # id, policy changes, task changes, check kwargs, code, words the reason must name
    ("deny", {"approval": "deny"}, {}, {}, PolicyCode.APPROVAL_DENY, ['approval = "deny"']),
    ("kind", {"accept": {"kinds": ["statistics"]}}, {}, {}, PolicyCode.KIND_NOT_ALLOWED, ["training", "statistics", "accept.kinds"]),
    ("coordinator", {}, {}, {"coordinator": "evil"}, PolicyCode.COORDINATOR_NOT_ALLOWED, ["evil", "vng", "accept.coordinators"]),
    ("anonymous-coordinator", {}, {}, {"coordinator": None}, PolicyCode.COORDINATOR_NOT_ALLOWED, ["did not identify", "vng"]),
    ("submitter", {}, {}, {"submitter": "someone"}, PolicyCode.SUBMITTER_NOT_ALLOWED, ["someone", "cbs, rivm", "accept.submitters"]),
    ("model", {}, {"model": {"name": "mlp"}}, {}, PolicyCode.MODEL_NOT_ALLOWED, ["mlp", "logreg", "accept.models"]),
    ("strategy", {}, {"training": {"strategy": "fedprox", "proximal_mu": 0.1}}, {}, PolicyCode.STRATEGY_NOT_ALLOWED, ["fedprox", "fedavg", "accept.strategies"]),
    ("privacy", {}, {"privacy": {"enabled": False}}, {}, PolicyCode.PRIVACY_REQUIRED, ["privacy.enabled = false", "limits.require_privacy"]),
    ("delta", {}, {"privacy": {"delta": 1e-4}}, {}, PolicyCode.DELTA_ABOVE_MAX, ["0.0001", "1e-05", "limits.max_delta_per_task"]),
    ("noise", {}, {}, {"noise_multiplier": 0.2}, PolicyCode.NOISE_BELOW_MIN, ["0.2", "0.3", "limits.min_noise_multiplier"]),
    ("rows", {}, {}, {"rows": 30}, PolicyCode.TOO_FEW_ROWS, ["30", "50", "limits.min_rows"]),
    ("rows-distributed", {"limits": {"min_rows_distributed": 20}}, {"privacy": {"mode": "distributed"}}, {"rows": 5},
     PolicyCode.TOO_FEW_ROWS, ["5", "20", "limits.min_rows_distributed"]),
    ("evaluation-epsilon", {}, {"evaluation": {"epsilon": 0.6}}, {}, PolicyCode.EVALUATION_EPSILON_ABOVE_MAX,
     ["0.6", "0.5", "limits.max_evaluation_epsilon"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_rule_refuses_with_its_code(
    policy: NodePolicy,
    demo: tuple[Task, Contract],
    case: tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], PolicyCode, list[str]],
) -> None:
    _, pol_changes, task_changes, kw, code, words = case
    task, contract = demo
    d = check(_policy_with(policy, **pol_changes), variant(task, **task_changes), contract, **kw)
    assert not d.accepted
    assert d.code == code
    for w in words:
        assert w in d.reason, (w, d.reason)


def test_a_contract_not_served_is_refused(policy: NodePolicy, demo: tuple[Task, Contract]) -> None:
    task, contract = demo
    d = check(policy, task, contract.model_copy(update={"version": "2.0"}))
    assert d.code == PolicyCode.CONTRACT_NOT_SERVED and d.dataset is None
    assert "adult-income@2.0" in d.reason and "adult-income@1.0" in d.reason
    d = check(policy, task, contract.model_copy(update={"name": "wmo-clients"}))
    assert d.code == PolicyCode.CONTRACT_NOT_SERVED
    assert "wmo-clients" in d.reason


def test_the_first_failing_rule_wins(policy: NodePolicy, demo: tuple[Task, Contract]) -> None:
    task, contract = demo
    bad = variant(task, model={"name": "mlp"}, privacy={"target_epsilon": 50.0})
    assert check(policy, bad, contract, rows=1).code == PolicyCode.MODEL_NOT_ALLOWED
    assert check(policy, bad, contract, rows=1, coordinator="x").code == PolicyCode.COORDINATOR_NOT_ALLOWED
    denied = _policy_with(policy, approval="deny")
    assert check(denied, bad, contract, kind="gossip").code == PolicyCode.APPROVAL_DENY


def test_the_delta_compared_is_the_one_the_node_uses(policy: NodePolicy, demo: tuple[Task, Contract]) -> None:
    task, contract = demo
    auto = variant(task, privacy={"delta": None})  # min(1e-5, 0.1 / rows)
    assert check(policy, auto, contract, rows=5000).accepted
    assert check(policy, auto, contract, rows=None).accepted  # at most 1e-5 whatever the rows
    strict = _policy_with(policy, limits={"max_delta_per_task": 1e-6})
    d = check(strict, auto, contract, rows=20_000)  # 0.1 / 20000 = 5e-6 > 1e-6
    assert d.code == PolicyCode.DELTA_ABOVE_MAX and "5e-06" in d.reason
    assert check(strict, auto, contract, rows=200_000).accepted  # 5e-7


def test_unknown_rows_and_noise_skip_their_rules(policy: NodePolicy, demo: tuple[Task, Contract]) -> None:
    task, contract = demo
    assert check(policy, task, contract, rows=None, noise_multiplier=None).accepted


def test_wildcards_and_policy_without_privacy(policy: NodePolicy, demo: tuple[Task, Contract]) -> None:
    task, contract = demo
    open_policy = _policy_with(
        policy, accept={"coordinators": ["*"], "submitters": ["*"]}, limits={"require_privacy": False}
    )
    assert check(open_policy, task, contract, coordinator=None, submitter="anyone").accepted
    d = check(open_policy, variant(task, privacy={"enabled": False, "target_epsilon": 50.0}), contract)
    assert d.accepted and "without differential privacy" in d.reason


def test_manual_approval_says_the_task_waits(policy: NodePolicy, demo: tuple[Task, Contract]) -> None:
    task, contract = demo
    d = check(_policy_with(policy, approval="manual"), task, contract)
    assert d.accepted and "manual" in d.reason


def test_secure_aggregation_can_be_required(policy: NodePolicy, demo: tuple[Task, Contract]) -> None:
    task, contract = demo
    strict = _policy_with(policy, limits={"require_secure_aggregation": True})
    d = check(strict, task, contract)
    assert not d.accepted and d.code is PolicyCode.SECURE_AGGREGATION_REQUIRED
    assert "limits.require_secure_aggregation" in d.reason
    assert check(strict, variant(task, training={"secure_aggregation": True}), contract).accepted


def test_distributed_dp_can_be_required(policy: NodePolicy, demo: tuple[Task, Contract]) -> None:
    task, contract = demo
    strict = _policy_with(policy, limits={"require_distributed": True})
    d = check(strict, task, contract)
    assert not d.accepted and d.code is PolicyCode.DISTRIBUTED_REQUIRED
    assert "limits.require_distributed" in d.reason and 'privacy.mode = "local"' in d.reason
    distributed = Task.model_validate({
        **task.model_dump(), "training": {**task.training.model_dump(), "secure_aggregation": True},
        "privacy": {**task.privacy.model_dump(), "mode": "distributed"},
    })
    assert check(strict, distributed, contract).accepted


def test_the_evaluation_epsilon_counts_only_where_nodes_evaluate(policy: NodePolicy, demo: tuple[Task, Contract]) -> None:
    """``limits.max_evaluation_epsilon`` (default 0.5) bounds ``[evaluation] epsilon`` (default
    0.2) only for a training task with local DP whose nodes evaluate."""
    task, contract = demo
    assert policy.limits.max_evaluation_epsilon == 0.5 and task.evaluation.epsilon == 0.2
    assert check(policy, task, contract).accepted
    greedy = variant(task, evaluation={"epsilon": 0.6})
    d = check(policy, greedy, contract)
    assert d.code is PolicyCode.EVALUATION_EPSILON_ABOVE_MAX
    assert d.reason == "task spends epsilon 0.6 on evaluations at the node; policy allows at most 0.5 (limits.max_evaluation_epsilon)"
    # a higher limit accepts it; no evaluations at the nodes, nothing to bound
    assert check(_policy_with(policy, limits={"max_evaluation_epsilon": 0.6}), greedy, contract).accepted
    assert check(policy, variant(task, evaluation={"epsilon": 0.6, "at_nodes": "off"}), contract).accepted
    # under distributed DP the nodes do not evaluate
    distributed = Task.model_validate({
        **greedy.model_dump(), "training": {**task.training.model_dump(), "secure_aggregation": True},
        "privacy": {**task.privacy.model_dump(), "mode": "distributed"},
    })
    assert check(policy, distributed, contract).accepted


def test_every_code_is_tested() -> None:
    tested = {c[4] for c in CASES} | {
        PolicyCode.CONTRACT_NOT_SERVED, PolicyCode.EPSILON_ABOVE_MAX, PolicyCode.SECURE_AGGREGATION_REQUIRED,
        PolicyCode.DISTRIBUTED_REQUIRED,
    }
    assert tested == set(PolicyCode)


def test_the_rows_minimum_belongs_to_the_privacy_mode(policy: NodePolicy, demo: tuple[Task, Contract]) -> None:
    """Under distributed DP the guarantee is per municipality and the noise is on the sum: the
    default policy takes a data set of any size (limits.min_rows_distributed = 1), while local
    DP-SGD and statistics keep limits.min_rows (50)."""
    from fedgov.node.policy import min_rows_for

    task, contract = demo
    distributed = variant(task, privacy={"mode": "distributed"})
    assert policy.limits.min_rows == 50 and policy.limits.min_rows_distributed == 1
    assert min_rows_for(policy, distributed) == (1, "limits.min_rows_distributed")
    assert min_rows_for(policy, task) == (50, "limits.min_rows")
    assert min_rows_for(policy, None) == (50, "limits.min_rows")  # a statistics query
    assert min_rows_for(policy, variant(distributed, privacy={"enabled": False})) == (50, "limits.min_rows")
    assert check(policy, distributed, contract, rows=3).accepted
    assert check(policy, task, contract, rows=3).code == PolicyCode.TOO_FEW_ROWS
    # the default policy file says so, and an operator can set it
    text = default_policy_text("GM0001", dataset="d", contract=contract.name, version=contract.version, path="t.csv",
                               budget_epsilon=5.0, min_rows_distributed=25)
    assert "min_rows_distributed = 25" in text


def test_a_repointed_link_in_a_policy_is_seen_at_the_next_load(tmp_path: Path, demo: tuple[Task, Contract]) -> None:
    """A node reads its policy several times a message and fedgov keeps what it parsed; a data
    file kept as a symlink and re-pointed (the policy's bytes unchanged) is the new file at the
    next load, as the operator expects."""
    _, contract = demo
    for name in ("old.csv", "new.csv"):
        (tmp_path / name).write_text("x\n", encoding="utf-8")
    link = tmp_path / "train.csv"
    link.symlink_to(tmp_path / "old.csv")
    text = default_policy_text("GM0001", dataset="d", contract=contract.name, version=contract.version, path="train.csv",
                               budget_epsilon=5.0)
    (tmp_path / "policy.toml").write_text(text, encoding="utf-8")
    first = load_policy(tmp_path / "policy.toml")
    assert first.datasets[0].path == tmp_path / "old.csv"
    assert load_policy(tmp_path / "policy.toml") is first  # unchanged: parsed once
    link.unlink()
    link.symlink_to(tmp_path / "new.csv")
    assert load_policy(tmp_path / "policy.toml").datasets[0].path == tmp_path / "new.csv"
