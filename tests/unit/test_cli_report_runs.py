"""``fedgov report`` on every kind of run directory: a statistics query (query.json), a failed
or unfinished run (a non-zero exit, as the run itself had); and ``fedgov run``/``fedgov query``
ending in a non-zero exit when their run failed. The run directories are small fixtures: no
Flower, no Ray."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedgov.analytics import Figure, QueryNode, QueryReport, QueryResult, clamp_figure, feasible_range
from fedgov.cli import app
from fedgov.errors import ExitCode
from fedgov.reports import NodeResult, TrainingReport

runner = CliRunner()
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _figure(measure: str, kind: str, cell: str, raw: float, se: float, bounds: tuple[float, float]) -> Figure:
    lo, hi = raw - 1.96 * se, raw + 1.96 * se
    est, plo, phi = clamp_figure(raw, lo, hi, *bounds)
    return Figure(
        measure=measure, kind=kind, scope="national", cell=cell, estimate=est, std_error=se, ci_low=plo, ci_high=phi,
        nodes=12, raw_estimate=raw, raw_ci_low=lo, raw_ci_high=hi,
    )


def _query_report(status: str = "completed", message: str = "") -> QueryReport:
    count = feasible_range("count")
    figures = [
        _figure("people", "count", "sex=Male", 12173.0, 40.0, count),
        _figure("people", "count", "sex=Female", 7279.0, 40.0, count),
        _figure("people", "count", "sex=Other", -74.0, 51.1, count),  # noise below zero
        _figure("share-above-50k", "ratio", "", 0.21754, 0.004, feasible_range("ratio")),
    ]
    result = QueryResult(query="overview", contract="c@1.0", epsilon=0.5, delta=0.0, mechanism="laplace",
                         max_rows_per_person=1, nodes=["GM0363"], figures=figures)
    return QueryReport(
        query="overview", query_file="q.toml", contract="c@1.0", status=status, message=message,  # type: ignore[arg-type]
        started=T0, epsilon=0.5, nodes=[QueryNode(node="GM0363", accepted=True)],
        result=result if status == "completed" else None,
    )


def _training_report(status: str, message: str = "") -> TrainingReport:
    return TrainingReport(
        fedgov_version="0", run_id="r", task="demo-task", task_file="t.toml", federation="f", contract="c@1.0",
        started=T0, model="logreg", strategy="fedavg", rounds_planned=2, status=status, message=message,  # type: ignore[arg-type]
        nodes=[NodeResult(node="GM0363", name="Amsterdam", status="accepted", train_rows=900, epsilon=1.9)],
    )


def _run_dir(tmp_path: Path, name: str, text: str) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    (d / name).write_text(text, encoding="utf-8")
    return d


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


# --------------------------------------------------------------------------- query runs


@pytest.mark.parametrize("given", ["run-dir", "file"])
def test_report_shows_a_query_run_in_one_number_format(tmp_path: Path, given: str) -> None:
    d = _run_dir(tmp_path, "query.json", _query_report().model_dump_json())
    out = runner.invoke(app, ["report", str(d if given == "run-dir" else d / "query.json")])
    assert out.exit_code == 0, out.output
    text = out.stdout
    assert "overview" in text and "national figures" in text
    # one format: thousands separators, never 1.217e+04 beside 7,279
    assert "12,173" in text and "7,279" in text and "0.2175" in text
    assert not re.search(r"\d[eE][+-]\d", text)
    # the noisy negative count is published as 0, inside its interval, and the raw value is pointed to
    row = next(line for line in text.splitlines() if "sex=Other" in line)
    assert "-74" not in row and re.search(r"\b0 +│ +0 \.\. 26\.\d", row), row
    assert "1 national figure(s) post-processed" in _flat(text) and "raw_estimate" in _flat(text)


def test_report_json_of_a_query_run_keeps_raw_and_published_values(tmp_path: Path) -> None:
    d = _run_dir(tmp_path, "query.json", _query_report().model_dump_json())
    out = runner.invoke(app, ["report", str(d), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    other = next(f for f in data["result"]["figures"] if f["cell"] == "sex=Other")
    assert other["raw_estimate"] == -74.0 and other["estimate"] == 0.0
    assert "raw_estimate" in data["result"]["post_processing"]


def test_report_of_a_failed_query_exits_non_zero(tmp_path: Path) -> None:
    d = _run_dir(tmp_path, "query.json", _query_report("failed", "no node connected within 120 s").model_dump_json())
    out = runner.invoke(app, ["report", str(d)])
    assert out.exit_code == int(ExitCode.FEDERATION), out.output
    assert "overview" in out.stdout and "failed" in out.stdout
    assert out.stderr.startswith("error: the run failed: no node connected within 120 s")
    assert "Traceback" not in out.output


def test_report_of_a_damaged_query_json_names_the_file(tmp_path: Path) -> None:
    d = _run_dir(tmp_path, "query.json", '{"kind": "query", "query": ')
    out = runner.invoke(app, ["report", str(d)])
    assert out.exit_code == int(ExitCode.CONFIG), out.output
    flat = _flat(out.stderr)
    assert str(d / "query.json") in out.stderr.replace("\n", "") and "not JSON, or cut short" in flat
    assert "expected a fedgov query report" in flat and "Traceback" not in out.output


# --------------------------------------------------------------------------- training runs


@pytest.mark.parametrize(("status", "says"), [("failed", "the run failed: too few nodes"), ("running", "the run has not finished")])
def test_report_of_a_failed_or_unfinished_training_run_exits_non_zero(tmp_path: Path, status: str, says: str) -> None:
    d = _run_dir(tmp_path, "report.json", _training_report(status, "too few nodes").model_dump_json())
    for args in ([str(d)], [str(d), "--json"]):
        out = runner.invoke(app, ["report", *args])
        assert out.exit_code == int(ExitCode.FEDERATION), out.output
        assert out.stderr.startswith(f"error: {says}") and "Traceback" not in out.output
    shown = runner.invoke(app, ["report", str(d)])
    assert "demo-task: per node" in shown.stdout  # the summary first, then the error
    as_json = runner.invoke(app, ["report", str(d), "--json"])
    assert TrainingReport.model_validate_json(as_json.stdout).status == status


def test_report_of_a_completed_training_run_exits_zero(tmp_path: Path) -> None:
    d = _run_dir(tmp_path, "report.json", _training_report("completed").model_dump_json())
    out = runner.invoke(app, ["report", str(d)])
    assert out.exit_code == 0 and "demo-task: per node" in out.stdout


def test_report_of_a_model_that_did_not_learn_says_so_and_exits_21(tmp_path: Path) -> None:
    from fedgov.reports import check_learning

    rep = _training_report("completed")
    rep.learning = check_learning(accuracy=0.76, auc=0.5, class_counts=[760, 240])  # majority 0.76: no better than guessing
    assert rep.learning is not None and not rep.learning.learned
    d = _run_dir(tmp_path, "report.json", rep.model_dump_json())
    out = runner.invoke(app, ["report", str(d)], env={"COLUMNS": "200"})
    assert out.exit_code == 21 and "Not learned" in out.stdout


# --------------------------------------------------------------------------- fedgov run / query


def test_fedgov_query_exits_non_zero_when_the_query_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedgov.launch.query as launch_query

    run_dir = tmp_path / "runs" / "q1"

    def fake(query_path: Path, federation: Path | None, options: Any, on_event: Any) -> Path:
        # what the ServerApp leaves when the query failed; the launcher's real check follows
        run_dir.mkdir(parents=True)
        (run_dir / "query.json").write_text(_query_report("failed", "every node refused").model_dump_json(), "utf-8")
        launch_query.finish_query(run_dir, 0.0)
        return run_dir

    monkeypatch.setattr(launch_query, "run_query_simulation", fake)
    out = runner.invoke(app, ["query", str(tmp_path / "q.toml"), "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == int(ExitCode.FEDERATION), out.output
    assert "error: the query failed: every node refused" in _flat(out.stderr)
    assert "overview" in out.stdout  # the failed run's summary


def test_fedgov_run_exits_non_zero_when_the_training_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedgov.launch.simulation as sim

    run_dir = tmp_path / "runs" / "r1"

    def fake_simulate(run_dir: Path, **kwargs: Any) -> None:  # what the ServerApp leaves when training failed
        (run_dir / "report.json").write_text(_training_report("failed", "only 1 node accepted, 2 needed").model_dump_json(), "utf-8")

    def fake_run(task: Path, federation: Path | None, options: Any, on_event: Any) -> Path:
        run_dir.mkdir(parents=True)
        return sim._finish(run_dir, 2, {}, options, on_event)  # the launcher's real check of the report

    monkeypatch.setattr(sim, "simulate", fake_simulate)
    monkeypatch.setattr(sim, "run_simulation", fake_run)
    out = runner.invoke(app, ["run", str(tmp_path / "t.toml"), "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == int(ExitCode.FEDERATION), out.output
    assert "error: the run failed: only 1 node accepted, 2 needed" in _flat(out.stderr)
    assert "demo-task: per node" in out.stdout
