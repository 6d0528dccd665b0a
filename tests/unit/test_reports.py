"""Reports: the pydantic model round-trips, summaries are right, the plot is written."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from fedgov.reports import NodeResult, RoundMetrics, TrainingReport, load_report, plot_report, write_json_atomic


def _report() -> TrainingReport:
    return TrainingReport(
        fedgov_version="0",
        run_id="r",
        task="t",
        task_file="t.toml",
        federation="f",
        contract="c@1.0",
        started=datetime.now(timezone.utc),
        model="logreg",
        strategy="fedavg",
        rounds_planned=2,
        privacy={"target_epsilon": 2.0},
        majority_rate=0.76,
        rounds=[RoundMetrics(round=1, accuracy=0.8, federated_accuracy=0.79), RoundMetrics(round=2, accuracy=0.83)],
        nodes=[
            NodeResult(node="GM0363", name="Amsterdam", status="accepted", train_rows=900, epsilon=1.9, gain=0.02),
            NodeResult(node="GM0150", name="Deventer", status="accepted", train_rows=90, epsilon=1.5, gain=0.10),
            NodeResult(node="GM0589", name="Oudewater", status="accepted", train_rows=10, epsilon=1.2, gain=-0.01),
            NodeResult(node="GM0014", status="refused", refusal_code="data-invalid", refusal_reason="x"),
        ],
    )


def test_round_trip_and_summaries(tmp_path: Path) -> None:
    r = _report()
    path = tmp_path / "report.json"
    write_json_atomic(path, r.model_dump_json())
    back = load_report(path)
    assert back == r
    assert back.median_gain() == 0.02
    assert back.max_epsilon() == 1.9
    assert [n.node for n in back.accepted()] == ["GM0363", "GM0150", "GM0589"]
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_plot_is_a_png(tmp_path: Path) -> None:
    out = plot_report(_report(), tmp_path / "a.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
