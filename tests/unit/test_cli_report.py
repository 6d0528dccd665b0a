"""A damaged report.json is a ReportError naming the file and what was expected: ``fedgov
report`` prints it and exits with its code, never a traceback."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from fedgov.cli import app
from fedgov.cli.console import new_typer
from fedgov.cli.summary import run_with_progress
from fedgov.errors import ExitCode, FederationError, FedgovError, ReportError
from fedgov.reports import NodeResult, TrainingReport, load_report

runner = CliRunner()


def _report() -> TrainingReport:
    return TrainingReport(
        fedgov_version="0", run_id="r", task="demo-task", task_file="t.toml", federation="f", contract="c@1.0",
        started=datetime(2026, 1, 1, tzinfo=timezone.utc), model="logreg", strategy="fedavg", rounds_planned=2, status="completed",
        nodes=[NodeResult(node="GM0363", name="Amsterdam", status="accepted", train_rows=900, epsilon=1.9, gain=0.02)],
    )


DAMAGED = {
    "truncated": ('{"kind": "training", "fedgov_version": "0", "run_id": "r", "task": ', "not JSON, or cut short"),
    "not-json": ("<html>502 Bad Gateway</html>", "not JSON, or cut short"),
    "empty": ("", "not JSON, or cut short"),
    "wrong-schema": ('{"kind": "query", "rounds": "many"}', "not a fedgov training report"),
    "a-list": ("[1, 2, 3]", "not a fedgov training report"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_load_report_of_a_damaged_file_is_a_report_error(tmp_path: Path, case: str) -> None:
    text, what = DAMAGED[case]
    path = tmp_path / "report.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ReportError) as ei:
        load_report(path)
    message = str(ei.value)
    assert str(path) in message and what in message
    assert "expected a fedgov training report" in message or "not a fedgov training report" in message
    assert ei.value.exit_code == ExitCode.CONFIG


def test_a_wrong_schema_lists_every_field_at_fault(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text('{"kind": "query", "rounds": "many", "run_id": "r"}', encoding="utf-8")
    with pytest.raises(ReportError) as ei:
        load_report(path)
    locations = {p.location for p in ei.value.problems}
    assert {"kind", "rounds", "task", "started"} <= locations
    assert all(p.file == str(path) for p in ei.value.problems)


def test_load_report_of_a_missing_file_is_a_report_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "report.json"
    with pytest.raises(ReportError, match="no such file") as ei:
        load_report(path)
    assert str(path) in str(ei.value)


def test_load_report_still_reads_a_good_report(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text(_report().model_dump_json(), encoding="utf-8")
    assert load_report(path) == _report()


@pytest.mark.parametrize("case", sorted(DAMAGED))
@pytest.mark.parametrize("given", ["run-dir", "file"])
def test_fedgov_report_on_a_damaged_report_exits_with_a_message(tmp_path: Path, case: str, given: str) -> None:
    path = tmp_path / "run" / "report.json"
    path.parent.mkdir()
    path.write_text(DAMAGED[case][0], encoding="utf-8")
    out = runner.invoke(app, ["report", str(path.parent if given == "run-dir" else path)])
    assert isinstance(out.exception, SystemExit), out.exception
    assert out.exit_code == int(ExitCode.CONFIG), out.output
    assert "Traceback" not in out.output
    assert out.stderr.startswith("error: ") and str(path) in out.stderr.replace("\n", "")


def test_fedgov_report_on_a_directory_without_a_report_is_a_usage_error(tmp_path: Path) -> None:
    out = runner.invoke(app, ["report", str(tmp_path)])
    assert out.exit_code == int(ExitCode.USAGE)
    assert f"no report.json (training run) or query.json (query) in {tmp_path}" in out.stderr.replace("\n", "")
    out = runner.invoke(app, ["report", str(tmp_path / "garbage.json")])
    assert out.exit_code == int(ExitCode.USAGE)


@pytest.mark.parametrize("given", ["run-dir", "file"])
def test_fedgov_report_shows_a_good_report(tmp_path: Path, given: str) -> None:
    path = tmp_path / "run" / "report.json"
    path.parent.mkdir()
    path.write_text(_report().model_dump_json(), encoding="utf-8")
    out = runner.invoke(app, ["report", str(path.parent if given == "run-dir" else path)])
    assert out.exit_code == 0, out.output
    assert "demo-task: per node" in out.stdout and "Amsterdam" in out.stdout
    as_json = runner.invoke(app, ["report", str(path), "--json"])
    assert as_json.exit_code == 0 and TrainingReport.model_validate_json(as_json.stdout) == _report()


def _following(run_dir: Path, error: FedgovError | None) -> typer.Typer:
    """A command that follows a fake run's progress events; the run then fails with ``error``."""
    toy = new_typer("a toy")

    @toy.command()
    def go() -> None:
        def fake_run(on_event: Callable[[dict[str, Any]], None]) -> Path:
            on_event({"event": "run-dir", "path": str(run_dir)})
            on_event({"event": "training-start", "rounds": 2})
            on_event({"event": "round", "round": 1, "accuracy": 0.8, "max_epsilon": 0.5, "nodes_trained": ["a"]})
            if error is not None:
                raise error
            return run_dir

        print(f"done: {run_with_progress(fake_run)}")

    @toy.command()
    def other() -> None:  # a second command, so that typer keeps the command names
        pass

    return toy


def test_a_failed_run_shows_its_report_then_its_error(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text(_report().model_dump_json(), encoding="utf-8")
    err = FederationError("the run failed: too few nodes")
    err.run_dir = tmp_path
    out = runner.invoke(_following(tmp_path, err), ["go"])
    assert out.exit_code == int(ExitCode.FEDERATION), out.output
    assert "round   1: accuracy 0.8000" in out.stdout and "demo-task: per node" in out.stdout
    assert out.stderr.startswith("error: the run failed: too few nodes")


def test_a_failed_run_with_a_damaged_report_still_ends_in_the_runs_error(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text('{"kind": "training", "run', encoding="utf-8")
    err = FederationError("the run failed: too few nodes")
    err.run_dir = tmp_path
    out = runner.invoke(_following(tmp_path, err), ["go"])
    assert out.exit_code == int(ExitCode.FEDERATION), out.output
    assert "warning: no summary:" in out.stderr and "not JSON, or cut short" in out.stderr
    assert "error: the run failed: too few nodes" in out.stderr and "Traceback" not in out.output


def test_a_run_that_succeeds_returns_its_directory(tmp_path: Path) -> None:
    out = runner.invoke(_following(tmp_path, None), ["go"])
    assert out.exit_code == 0 and f"done: {tmp_path}" in out.stdout.replace("\n", "")
