"""``fedgov node model list|show|export`` (a node's personal models, for its staff) and the
report's per-node columns: local-only, federated, personalised."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from fedgov.cli import app
from fedgov.config import Contract, Task
from fedgov.node.home import NodeHome
from fedgov.node.personal import PersonalModel, PersonalModels
from fedgov.reports import NodeResult, TrainingReport

runner = CliRunner()


def _keep(home: NodeHome, task_id: str = "adult-income-0123456789abcdef-77") -> None:
    task = Task.model_validate({"name": "adult-income", "contract": "c.toml"})
    contract = Contract.model_validate({"name": "adult-income", "version": "1.0", "columns": [{"name": "x", "type": "float", "min": 0, "max": 1}]})
    state = {"0.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "0.bias": np.zeros(2, dtype=np.float32)}
    PersonalModels(home.path).save(
        task=task, contract=contract, task_id=task_id, dataset="adult", data_sha256="d" * 64, global_sha256="g" * 64,
        personal=PersonalModel(state, "fine-tuned", 4, 120, 480, 0.8125, 0.8541, "fine-tuned for 4 epoch(s)"),
    )


def test_node_model_list_show_and_export(tmp_path: Path, node_home: Callable[..., NodeHome]) -> None:
    home = node_home()
    out = runner.invoke(app, ["node", "model", "list", "-n", str(home.path)])
    assert out.exit_code == 0 and "no personal models" in out.output
    _keep(home)
    out = runner.invoke(app, ["node", "model", "list", "-n", str(home.path), "--json"])
    assert out.exit_code == 0, out.output
    (rec,) = json.loads(out.output)
    assert rec["task"] == "adult-income" and rec["run"] == "77" and rec["variant"] == "fine-tuned"
    assert rec["val_accuracy"] == 0.8541 and rec["val_accuracy_global"] == 0.8125 and Path(rec["path"]).is_file()
    out = runner.invoke(app, ["node", "model", "list", "-n", str(home.path)])
    assert out.exit_code == 0 and "fine-tuned (4 ep.)" in out.output and "0.8541" in out.output
    out = runner.invoke(app, ["node", "model", "show", "adult-income", "-n", str(home.path)])
    assert out.exit_code == 0 and "global_sha256" in out.output and "adult-income-0123456789abcdef-77" in out.output

    for suffix in (".npz", ".pt"):
        target = tmp_path / f"personal{suffix}"
        out = runner.invoke(app, ["node", "model", "export", rec["key"], "--out", str(target), "-n", str(home.path)])
        assert out.exit_code == 0, out.output
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        assert json.loads(target.with_name(target.name + ".json").read_text())["task_id"] == rec["task_id"]
        if suffix == ".npz":
            with np.load(target) as z:
                assert z["0.weight"].tolist() == [[0, 1, 2], [3, 4, 5]]
        else:
            import torch

            assert torch.load(target)["0.weight"].shape == (2, 3)
    assert len([e for e in home.audit.entries() if e.kind == "personal-model-exported"]) == 2
    # never over a file; an unknown model is named, with what the node keeps
    again = runner.invoke(app, ["node", "model", "export", rec["key"], "--out", str(tmp_path / "personal.pt"), "-n", str(home.path)])
    assert again.exit_code == 2 and "exists" in again.output
    wrong = runner.invoke(app, ["node", "model", "export", rec["key"], "--out", str(tmp_path / "m.pkl"), "-n", str(home.path)])
    assert wrong.exit_code == 2 and ".pt" in wrong.output
    missing = runner.invoke(app, ["node", "model", "show", "nope", "-n", str(home.path)])
    assert missing.exit_code != 0 and "no personal model 'nope'" in missing.output and "(adult-income)" in missing.output
    assert "Traceback" not in missing.output


def _report(nodes: list[NodeResult]) -> TrainingReport:
    return TrainingReport(
        fedgov_version="0", run_id="r", task="demo-task", task_file="t.toml", federation="f", contract="c@1.0",
        started=datetime(2026, 1, 1, tzinfo=timezone.utc), model="logreg", strategy="fedavg", rounds_planned=2, nodes=nodes,
    )


def test_the_report_shows_local_only_federated_and_personalised_per_node(tmp_path: Path) -> None:
    from fedgov.cli.console import console
    from fedgov.cli.summary import print_summary

    nodes = [
        NodeResult(node="GM0599", name="Rotterdam", status="accepted", train_rows=8600, test_rows=2148, federated_accuracy=0.749,
                   local_only_accuracy=0.783, gain=-0.034, personal_accuracy=0.797, personal_variant="fine-tuned", personal_gain=0.014),
        NodeResult(node="GM0473", name="Zandvoort", status="accepted", train_rows=140, test_rows=34, federated_accuracy=0.735,
                   local_only_accuracy=0.794, gain=-0.059, personal_accuracy=0.706, personal_variant="fine-tuned", personal_gain=-0.088),
        NodeResult(node="GM0589", name="Oudewater", status="accepted", train_rows=80, test_rows=20, federated_accuracy=0.85,
                   local_only_accuracy=0.85, gain=0.0, personal_accuracy=0.85, personal_variant="global", personal_gain=0.0),
    ]
    report = _report(nodes)
    # the standard error of each node's test split, at its local-only accuracy
    assert abs((nodes[1].standard_error() or 0) - (0.794 * 0.206 / 34) ** 0.5) < 1e-12
    assert [n.node for n in report.worse_off()] == ["GM0473"]  # -8.8 points, standard error 6.9
    assert report.median_personal_gain() == 0.0
    with console.capture() as cap:
        print_summary(report, tmp_path)
    text = cap.get()
    header = next(line for line in text.splitlines() if "local-only acc." in line)
    assert header.index("local-only acc.") < header.index("federated acc.") < header.index("personalised acc.")
    assert "gain (pers.)" in header
    assert "0.797 (fine-tuned)" in text and "+1.4 pt" in text and "0.850 (global)" in text and "-8.8 pt" in text
    assert "1 node(s) worse off" in text and "Zandvoort" in text
    from fedgov.reports import plot_report

    png = plot_report(report, tmp_path / "accuracy.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a run without personal figures (a deployment) has no such columns
    for n in nodes:
        n.personal_accuracy = n.personal_gain = n.personal_variant = None
    with console.capture() as cap:
        print_summary(_report(nodes), tmp_path)
    assert "personalised" not in cap.get()
