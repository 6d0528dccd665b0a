"""Steering a simulation (issue 19): the simulated nodes' policies from the federation file and
the command line, one minimum of rows named with its number, a refusal summary by reason, the
global figure a task without a central test set will show, a member's bad rows without their
values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedgov.cli import app
from fedgov.config import load_contract, load_task
from fedgov.config.federation import Federation, load_federation
from fedgov.data import materialize, problem_classes, read_table, validate_frame
from fedgov.errors import ConfigError, DataValidationError, ExitCode
from fedgov.launch.simulation import SimulationOptions, node_policy_settings
from fedgov.node.policy import MIN_ROWS_LOCAL, min_rows_for
from fedgov.node.refusals import is_allowed
from fedgov.node.rounds import hello
from fedgov.reports import refusal_groups, refusal_lines

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "configs" / "contracts" / "adult-income.toml"
ADULT_TEST = ROOT / "data" / "adult" / "adult_test.csv"
runner = CliRunner()


def _federation(node_policy: dict[str, Any] | None = None, member: dict[str, Any] | None = None) -> Federation:
    return Federation.model_validate({
        "name": "f", "source": str(ADULT_TEST), "node_policy": node_policy or {},
        "members": [{"code": "GM0363", **({"node_policy": member} if member else {})}, {"code": "GM0344"}],
    })


def test_node_policy_precedence_defaults_file_member_command_line() -> None:
    fed = _federation({"min_rows": 20, "require_privacy": False, "budget_epsilon": 4.0}, {"min_rows": 5, "approval": "manual"})
    plain = SimulationOptions()
    assert node_policy_settings(_federation(), 0, plain) == {"approval": "auto", "budget_epsilon": 10.0}
    assert node_policy_settings(fed, 0, plain) == {
        "approval": "manual", "budget_epsilon": 4.0, "min_rows": 5, "require_privacy": False,
    }
    assert node_policy_settings(fed, 1, plain) == {
        "approval": "auto", "budget_epsilon": 4.0, "min_rows": 20, "require_privacy": False,
    }
    # the command line wins, for every member; its text values are typed as the file's
    cli = SimulationOptions(node_policy={"min_rows": "1", "require_privacy": "true"}, node_budget=2.5, approval="deny")
    assert node_policy_settings(fed, 0, cli) == {
        "approval": "deny", "budget_epsilon": 2.5, "min_rows": 1, "require_privacy": True,
    }


def test_a_bad_node_policy_value_names_its_key() -> None:
    with pytest.raises(ConfigError) as ei:
        node_policy_settings(_federation(), 0, SimulationOptions(node_policy={"min_rows": "many"}))
    assert ei.value.problems[0].file == "--node-policy" and ei.value.problems[0].location == "min_rows"


def test_a_federation_files_node_policy_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "fed.toml"
    path.write_text(
        f'name = "f"\nsource = "{ADULT_TEST}"\n[node_policy]\nmin_row = 5\nbudget_epsilon = -1\n[[members]]\ncode = "GM0363"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as ei:
        load_federation(path)
    assert {p.location for p in ei.value.problems} == {"node_policy.min_row", "node_policy.budget_epsilon"}


def test_one_minimum_of_rows_with_its_floor_and_setting(tmp_path: Path, node_home: Any, write_task: Any) -> None:
    """Local DP-SGD: limits.min_rows, never under the floor; distributed DP: its own setting;
    statistics: limits.min_rows as set. A refusal names the setting and the minimum, and passes
    the release gate's template check."""
    policy = node_home(min_rows=1).policy()
    local = load_task(write_task(tmp_path / "l.toml", name="l", training={"rounds": 1}, privacy={"target_epsilon": 1.0}))[0]
    plain = load_task(write_task(tmp_path / "p.toml", name="p", training={"rounds": 1}, privacy={"enabled": False}))[0]
    assert min_rows_for(policy, local) == (MIN_ROWS_LOCAL, "limits.min_rows")
    assert min_rows_for(policy, plain) == (MIN_ROWS_LOCAL, "limits.min_rows")
    assert min_rows_for(policy, None) == (1, "limits.min_rows")
    assert min_rows_for(node_home(tmp_path / "n2", min_rows=80).policy(), local) == (80, "limits.min_rows")

    contract = load_contract(CONTRACT)
    rows = read_table(ADULT_TEST).head(8)  # 8 training rows: under the floor
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    rows.to_csv(train, index=False)
    rows.to_csv(test, index=False)
    limit, setting = min_rows_for(policy, local)
    answer, _ = hello(local, contract, node="GM0363", node_name="Amsterdam", train_path=train, test_path=test,
                      min_rows=limit, min_rows_setting=setting)
    assert not answer.accepted and answer.code == "too-few-rows"
    assert answer.reason == f"the node's data set has fewer training rows than this node's minimum of {MIN_ROWS_LOCAL} (limits.min_rows)"
    assert is_allowed("too-few-rows", answer.reason)


def test_problem_classes_name_file_column_and_kind_never_a_value(tmp_path: Path) -> None:
    contract = load_contract(CONTRACT)
    raw = read_table(ADULT_TEST).head(20)
    raw.loc[3, "sex"] = "Mael"
    raw.loc[5, "sex"] = "male"
    raw.loc[6, "age"] = "ninety-nine"
    raw["postcode"] = "1234AB"
    with pytest.raises(DataValidationError) as ei:
        validate_frame(raw, contract, file="x.csv")
    classes = problem_classes(ei.value)
    text = " ".join(classes)
    assert "column 'sex': 2 cell(s), expected one of 2 categories (Female, Male)" in classes
    assert "column 'age': 1 cell(s), expected an integer in [17, 90]" in classes
    assert any(c.startswith("column 'postcode': not declared") for c in classes)
    for value in ("Mael", "did you mean", "ninety-nine", "1234AB", "row "):
        assert value not in text


def test_column_split_a_members_bad_rows_refuse_that_member_only(tmp_path: Path) -> None:
    contract = load_contract(CONTRACT)
    src = read_table(ADULT_TEST).head(90).copy()
    src["gemeente"] = ["GM0363", "GM0344", "GM0150"] * 30
    src.loc[4, "sex"] = "Fmale"  # a row of Utrecht's (GM0344)
    path = tmp_path / "src.csv"
    src.to_csv(path, index=False)
    fed = Federation.model_validate({
        "name": "f", "source": str(path), "partition": {"kind": "column", "column": "gemeente"},
        "members": [{"code": c} for c in ("GM0363", "GM0344", "GM0150")],
    })
    with pytest.raises(DataValidationError):  # a whole source without a simulation to go on: as before
        materialize(fed, contract, tmp_path / "plain")
    seen: list[tuple[int, list[str]]] = []
    nodes = materialize(fed, contract, tmp_path / "nodes", on_invalid=lambda i, e: seen.append((i, problem_classes(e))))
    assert seen == [(1, ["column 'sex': 1 cell(s), expected one of 2 categories (Female, Male)"])]
    assert [n.train_rows + n.test_rows for n in nodes] == [30, 30, 30]
    for n in (nodes[0], nodes[2]):  # conforming, as always
        validate_frame(read_table(n.train_path), contract, file="t")
    with pytest.raises(DataValidationError):  # written as read: its node finds the same problem
        bad = pd.concat([read_table(nodes[1].train_path), read_table(nodes[1].test_path)])
        validate_frame(bad, contract, file="t")
    # the same seed and order as a conforming source: Amsterdam's files do not change
    clean = src.copy()
    clean.loc[4, "sex"] = "Female"
    clean.to_csv(path, index=False)
    again = materialize(fed, contract, tmp_path / "clean")
    assert again[0].train_path.read_bytes() == nodes[0].train_path.read_bytes()


def test_refusals_grouped_by_reason() -> None:
    pairs = [(f"GM{i:04d}", "too-few-rows: small") for i in range(5)] + [("GM0100", "privacy-required: dp")]
    assert refusal_groups(pairs) == [("too-few-rows: small", [f"GM{i:04d}" for i in range(5)]), ("privacy-required: dp", ["GM0100"])]
    assert refusal_lines(pairs, examples=2) == [
        "5 node(s): too-few-rows: small (GM0000, GM0001 and 3 more)", "1 node(s): privacy-required: dp (GM0100)",
    ]
    many = [(f"GM{i:04d}", f"reason {i}") for i in range(9)]
    assert refusal_lines(many, limit=3)[-1] == "6 node(s) for 6 other reason(s)"


def test_check_says_which_global_figure_a_task_without_a_central_test_set_shows(tmp_path: Path, write_task: Any) -> None:
    pooled = write_task(tmp_path / "a.toml", name="a", training={"rounds": 2}, privacy={"target_epsilon": 1.0})
    none = write_task(tmp_path / "b.toml", name="b", training={"rounds": 2}, privacy={"target_epsilon": 1.0},
                      evaluation={"at_nodes": "off"})
    central = write_task(tmp_path / "c.toml", name="c", training={"rounds": 2}, privacy={"target_epsilon": 1.0},
                         evaluation={"centralized": ADULT_TEST})
    out = runner.invoke(app, ["check", str(pooled), str(none), str(central)], env={"COLUMNS": "400"})
    assert out.exit_code == 0, out.output  # a notice, not an error
    lines = out.output.splitlines()
    assert any(f"notice: {pooled}" in line and "pooled over the nodes' own test splits" in line for line in lines)
    assert any(f"notice: {none}" in line and "no global figure" in line for line in lines)
    assert not any(f"notice: {central}" in line for line in lines)


@pytest.mark.parametrize("args, words", [
    (["run", "t.toml", "--node-policy", "min_rows"], "KEY=VALUE"),
    (["run", "t.toml", "--node-policy", "min_row=5"], "unknown key 'min_row'"),
    (["run", "--resume", "runs/x", "--node-policy", "min_rows=5"], "resumed run keeps its nodes' policies"),
    (["query", "q.toml", "-C", "coord", "--node-policy", "min_rows=5"], "a real node's policy"),
])
def test_node_policy_options_misused_exit_2(args: list[str], words: str) -> None:
    out = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert out.exit_code == int(ExitCode.USAGE), out.output
    assert words in out.output


def test_a_node_policy_the_nodes_loader_refuses_names_the_member_and_the_settings() -> None:
    from fedgov.data import NodeData
    from fedgov.launch.simulation import _policy_text

    node = NodeData(code="GM0363", name="Amsterdam", train_path=Path("/n/train.csv"), test_path=Path("/n/test.csv"),
                    train_rows=1, test_rows=1)
    settings = node_policy_settings(_federation({"budget_epsilon": 2.0, "max_epsilon_per_task": 5.0}), 0, SimulationOptions())
    with pytest.raises(ConfigError) as ei:
        _policy_text(node, load_contract(CONTRACT), settings, max_epsilon=1.0, kinds=("training",),
                     pinned=("contracts/c.json", "0" * 64), roster=Path("roster.json"), authority="0" * 64)
    assert "GM0363" in str(ei.value) and "max_epsilon_per_task=5.0" in str(ei.value)
    assert ei.value.problems[0].location == "limits.max_epsilon_per_task"


def test_check_says_when_a_policys_min_rows_is_under_the_local_floor(node_home: Any) -> None:
    low = node_home(min_rows=3)
    high = node_home(low.path.parent / "n2", min_rows=60)
    out = runner.invoke(app, ["check", str(low.policy_path), str(high.policy_path)], env={"COLUMNS": "400"})
    assert out.exit_code == 0, out.output
    assert f"limits.min_rows = 3 counts as {MIN_ROWS_LOCAL} for training with local DP-SGD" in out.output
    assert out.output.count("notice:") == 1
