"""A simulation a data scientist can steer (issue 19): the simulated nodes' policies from the
federation file and the command line, one minimum of rows, a failure below ``min_nodes`` in a
few lines, a global figure without a central test set, and a typo in one member's file that
refuses that member while the others go on. fedgov's real ClientApp, in process."""

from __future__ import annotations

import math

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fedgov.cli.console import console
from fedgov.cli.summary import print_summary
from fedgov.config import load_federation, load_task
from fedgov.errors import DataValidationError
from fedgov.launch.simulation import SimulationOptions, _add_data_check, prepare_nodes
from fedgov.node.home import NodeHome
from fedgov.reports import POOLED_LABEL
from fedgov.testing import InProcessGrid

CODES = ["GM0363", "GM0344", "GM0150"]  # Amsterdam, Utrecht, Deventer


def _prepare(tmp: Path, fed: Path, task_path: Path, **options: Any) -> tuple[list[Any], Path, list[dict[str, Any]]]:
    task, contract = load_task(task_path)
    events: list[dict[str, Any]] = []
    nodes, manifest = prepare_nodes(
        tmp, load_federation(fed), contract, SimulationOptions(runs_dir=tmp, **options), events.append,
        max_epsilon=task.privacy.target_epsilon, task=task,
    )
    return nodes, manifest, events


def _task(write_task: Any, path: Path, fed: Path, **training: Any) -> Path:
    """One round of logistic regression with DP-SGD, evaluated at the nodes only (no central test set)."""
    return write_task(
        path, name="steer", federation=fed,
        training={"rounds": 1, "local_epochs": 1, "batch_size": 128, "learning_rate": 0.5, "min_nodes": 2, "seed": 1,
                  "reply_timeout": 5, **training},
        privacy={"target_epsilon": 2.0, "delta": 1e-5, "accountant": "rdp", "reproducible_noise": True},
        evaluation={"epsilon": 0.3, "at_nodes": "final"},
    )


@pytest.fixture
def files_federation(tmp_path: Path, write_file: Any, adult_csv: Path) -> Any:
    """``files_federation(spoil)``: three members with a file each (600 Adult rows), ``spoil``
    applied to Deventer's (as text cells)."""

    def make(spoil: Any = None, extra: str = "") -> Path:
        df = pd.read_csv(adult_csv, dtype=str, keep_default_na=False)
        for i, code in enumerate(CODES):
            part = df.iloc[600 * i: 600 * (i + 1)].copy()
            if code == "GM0150" and spoil is not None:
                spoil(part)
            part.to_csv(tmp_path / f"{code}.csv", index=False)
        members = "".join(f'[[members]]\ncode = "{c}"\ndata = "{tmp_path / f"{c}.csv"}"\n' for c in CODES)
        return write_file(tmp_path / "fed.toml", f'name = "steer-3"\n[partition]\nkind = "files"\n{extra}\n{members}')

    return make


def _typo(part: pd.DataFrame) -> None:
    part.loc[part.index[7], "sex"] = "Fmale"  # a category the contract does not have


def test_a_typo_in_one_members_file_refuses_that_member_and_the_others_go_on(
    tmp_path: Path, files_federation: Any, write_task: Any, run_task: Any
) -> None:
    fed = files_federation(_typo)
    task_path = _task(write_task, tmp_path / "task.toml", fed)
    nodes, manifest, events = _prepare(tmp_path / "sim", fed, task_path)
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert len(warnings) == 1 and "GM0150" in warnings[0] and str(tmp_path / "GM0150.csv") in warnings[0]
    assert "column 'sex': 1 cell(s), expected one of 2 categories" in warnings[0] and "data-invalid" in warnings[0]
    assert "Fmale" not in warnings[0]  # the record's value stays out of what the simulation prints
    check = json.loads((tmp_path / "sim" / "data-check.json").read_text())
    assert list(check) == ["GM0150"] and "Fmale" not in json.dumps(check)

    report = run_task(InProcessGrid(manifest, len(nodes), run_id=31), task_path, tmp_path / "run", run_id=31, federation="steer-3")
    assert report.status == "completed"
    by_node = {n.node: n for n in report.nodes}
    assert by_node["GM0150"].status == "refused" and by_node["GM0150"].refusal_code == "data-invalid"
    # the node's own words leave it (no column, no value); its details stay in its private report
    assert by_node["GM0150"].refusal_reason == "the node's data set does not conform to contract adult-income@1.0"
    private = nodes[2].train_path.parent / "reports" / "data-check-adult-income.txt"
    assert "Fmale" in private.read_text() and private.stat().st_mode & 0o077 == 0  # for the node's user only
    assert by_node["GM0363"].status == by_node["GM0344"].status == "accepted"
    assert by_node["GM0363"].rounds_trained == 1
    # the simulation's own finding goes into the report line (by file, column and kind)
    assert _add_data_check(tmp_path / "sim", report)
    assert "column 'sex'" in by_node["GM0150"].detail and "Fmale" not in by_node["GM0150"].detail

    # no central test set: the global figure is the nodes' released counts, pooled and labelled
    assert report.final is None and report.pooled is not None
    assert report.pooled.label == POOLED_LABEL and report.pooled.nodes == 2 and report.pooled.round == 1
    assert 0.5 < report.pooled.accuracy <= 1.0
    assert report.pooled.accuracy == pytest.approx(min(1.0, report.pooled.correct / report.pooled.total))
    # its noise: each node's two released counts carry Gaussian noise of sd z sqrt(2) (its plan's z)
    acc = report.pooled.correct / report.pooled.total
    var = sum(2.0 * n.evaluation_noise**2 for n in report.nodes if n.evaluation_noise is not None)
    assert var > 0 and report.pooled.sd == pytest.approx(math.sqrt(var * (1 + acc**2)) / report.pooled.total)
    with console.capture() as out:
        print_summary(report, tmp_path / "run")
    assert f"Global model, {POOLED_LABEL}: accuracy" in out.get()


def test_typos_in_too_many_members_stop_before_anything_runs(tmp_path: Path, files_federation: Any, write_task: Any) -> None:
    fed = files_federation(_typo)
    task_path = _task(write_task, tmp_path / "task.toml", fed, min_nodes=3)  # two valid members are not enough
    with pytest.raises(DataValidationError) as ei:
        _prepare(tmp_path / "sim", fed, task_path)
    assert "training.min_nodes" in str(ei.value) and "column 'sex'" in str(ei.value)  # the owner's own terminal: full detail


def test_node_policy_from_the_federation_file_and_a_failure_below_min_nodes_in_a_few_lines(
    tmp_path: Path, files_federation: Any, write_task: Any, run_task: Any
) -> None:
    """[node_policy] sets every simulated node's min_rows (one member has its own), written
    into policies the node's loader validates; every node refuses, and the failure says so by
    reason in a few lines while the report keeps every node's answer."""
    fed = files_federation(
        extra='[node_policy]\nmin_rows = 100000\nrequire_privacy = false\nbudget_epsilon = 4.0\napproval = "auto"\n'
    )
    text = fed.read_text().replace('code = "GM0150"\n', 'code = "GM0150"\nnode_policy = { min_rows = 200000 }\n')
    fed.write_text(text)
    task_path = _task(write_task, tmp_path / "task.toml", fed, min_nodes=2)
    nodes, manifest, events = _prepare(tmp_path / "sim", fed, task_path, node_policy={"max_epsilon_per_task": "3.5"})
    policies = {n.code: NodeHome(n.train_path.parent).policy() for n in nodes}  # the node's own loader
    assert {c: p.limits.min_rows for c, p in policies.items()} == {"GM0363": 100000, "GM0344": 100000, "GM0150": 200000}
    assert all(p.limits.require_privacy is False and p.datasets[0].budget.epsilon == 4.0 for p in policies.values())
    assert all(p.limits.max_epsilon_per_task == 3.5 and p.approval == "auto" for p in policies.values())
    # one warning per minimum, on the training rows (480 of each member's 600), naming the setting
    small = [e["message"] for e in events if e["event"] == "warning"]
    assert len(small) == 2
    assert "2 of 3 members" in small[0] and "limits.min_rows = 100000" in small[0] and "GM0363 (480)" in small[0]
    assert "--node-policy min_rows=N" in small[0]

    report = run_task(InProcessGrid(manifest, len(nodes), run_id=32), task_path, tmp_path / "run", run_id=32, federation="steer-3")
    assert report.status == "failed"
    lines = report.message.splitlines()
    assert len(lines) <= 5
    assert lines[0].startswith("only 0 of 3 connected nodes accepted the task; it needs at least 2 (training.min_nodes)")
    assert any(
        line.strip().startswith("2 node(s): too-few-rows: the node's data set has fewer training rows than this node's "
                                "minimum of 100000 (limits.min_rows) (GM0344, GM0363)")
        for line in lines
    )
    assert any("1 node(s): too-few-rows" in line and "minimum of 200000" in line for line in lines)
    assert all(n.status == "refused" and n.refusal_code == "too-few-rows" for n in report.nodes) and len(report.nodes) == 3


def test_many_refusals_are_summarised_by_reason(tmp_path: Path) -> None:
    """131 refused nodes: a handful of lines, not one each (the report keeps them all)."""
    from datetime import datetime, timezone

    from fedgov.reports import NodeResult, TrainingReport

    nodes = [
        NodeResult(node=f"GM{i:04d}", status="refused", refusal_code="too-few-rows",
                   refusal_reason="the node's data set has fewer training rows than this node's minimum of 50 (limits.min_rows)")
        for i in range(120)
    ] + [NodeResult(node=f"GM{i:04d}", status="refused", refusal_code="privacy-required",
                    refusal_reason="this node's policy requires differential privacy (limits.require_privacy)")
         for i in range(120, 131)]
    report = TrainingReport(
        fedgov_version="x", run_id="r", task="t", task_file="t.toml", federation="f", contract="c@1.0",
        started=datetime.now(timezone.utc), model="logreg", strategy="fedavg", rounds_planned=1, nodes=nodes,
        status="failed", message="only 0 of 131",
    )
    with console.capture() as out:
        print_summary(report, tmp_path)
    text = out.get()
    assert "120 node(s): too-few-rows" in text and "GM0000, GM0001, GM0002 and 117 more" in text
    assert "11 node(s): privacy-required" in text
    assert "GM0050" not in text and len(text) < 4000
