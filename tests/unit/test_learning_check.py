"""Honest summaries: a global model that does not beat guessing by more than its test set's noise
is called so, in the report, the summary and the exit status (ExitCode.NOT_LEARNED)."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedgov.cli import app
from fedgov.errors import EXIT_HELP, ExitCode
from fedgov.reports import GlobalMetrics, NodeResult, TrainingReport, check_learning, load_report

runner = CliRunner()


def test_accuracy_at_the_majority_rate_is_not_learned() -> None:
    # 0.6887 against a majority of 0.6887 (the first table): nothing learned
    check = check_learning(accuracy=0.6887, auc=0.62, class_counts=[303, 672])
    assert check is not None and not check.learned
    assert check.metric == "accuracy" and check.baseline == pytest.approx(672 / 975)
    assert check.margin == pytest.approx(2 * math.sqrt(check.baseline * (1 - check.baseline) / 975))
    assert "did not learn" in check.message and "majority rate" in check.message
    assert "AUC 0.6200" in check.message  # the ranking is named, but does not rescue the verdict
    assert any("rounds" in tip for tip in check.advice) and any("target_epsilon" in tip for tip in check.advice)


def test_a_gain_inside_the_noise_is_not_learned_and_one_beyond_it_is() -> None:
    counts = [2141, 7859]  # majority 0.7859 on 10,000 rows: 2 SE = 0.0082
    margin = 2 * math.sqrt(0.7859 * 0.2141 / 10_000)
    inside = check_learning(accuracy=0.7859 + 0.9 * margin, auc=None, class_counts=counts)
    beyond = check_learning(accuracy=0.7859 + 1.1 * margin, auc=None, class_counts=counts)
    assert inside is not None and not inside.learned
    assert beyond is not None and beyond.learned and beyond.advice == []


def test_six_classes_judged_by_accuracy_against_the_largest_class() -> None:
    counts = [400, 900, 1200, 1300, 1150, 1250]  # majority 1300 / 6200 = 0.2097
    assert not check_learning(accuracy=0.2175, auc=0.60, class_counts=counts).learned  # type: ignore[union-attr]
    assert check_learning(accuracy=0.3733, auc=0.70, class_counts=counts).learned  # type: ignore[union-attr]


def test_an_imbalanced_binary_target_is_judged_by_auc() -> None:
    counts = [1360, 86]  # 6% positive: accuracy never beats the majority, AUC can
    good = check_learning(accuracy=0.9405, auc=0.85, class_counts=counts)
    chance = check_learning(accuracy=0.9405, auc=0.53, class_counts=counts)
    assert good is not None and good.learned and good.metric == "auc" and good.baseline == 0.5
    assert good.margin == pytest.approx(2 * math.sqrt((1360 + 86 + 1) / (12 * 1360 * 86)))
    assert chance is not None and not chance.learned and "AUC on" in chance.message and "is 0.5300" in chance.message and "0.5 (chance)" in chance.message


def test_nothing_to_judge_without_two_classes() -> None:
    assert check_learning(accuracy=1.0, auc=None, class_counts=[0, 50]) is None
    assert check_learning(accuracy=1.0, auc=None, class_counts=[]) is None


def test_without_dp_no_advice_to_raise_epsilon() -> None:
    check = check_learning(accuracy=0.5, auc=None, class_counts=[50, 50], privacy=False)
    assert check is not None and not any("target_epsilon" in tip for tip in check.advice)


def _report(accuracy: float) -> TrainingReport:
    counts = [2000, 500]
    return TrainingReport(
        fedgov_version="0", run_id="r", task="t", task_file="t.toml", federation="f", contract="c@1.0",
        started=datetime(2026, 1, 1, tzinfo=timezone.utc), model="logreg", strategy="fedavg", rounds_planned=2,
        status="completed", majority_rate=0.8, privacy={"enabled": True, "target_epsilon": 2.0},
        nodes=[NodeResult(node="GM0363", name="Amsterdam", status="accepted", train_rows=900, epsilon=1.9)],
        final=GlobalMetrics(accuracy=accuracy, loss=0.5, auc=0.6, n=2500),
        learning=check_learning(accuracy=accuracy, auc=0.6, class_counts=counts),
    )


@pytest.mark.parametrize(("accuracy", "code", "said"), [(0.80, ExitCode.NOT_LEARNED, "Not learned"), (0.85, ExitCode.OK, "Learned")])
def test_fedgov_run_says_so_and_exits_with_its_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accuracy: float, code: ExitCode, said: str,
) -> None:
    import fedgov.launch.simulation as simulation

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "report.json").write_text(_report(accuracy).model_dump_json(), encoding="utf-8")
    monkeypatch.setattr(simulation, "run_simulation", lambda *a, **k: run_dir)
    task = tmp_path / "task.toml"
    task.write_text("", encoding="utf-8")
    out = runner.invoke(app, ["run", str(task), "--runs-dir", str(tmp_path / "runs")], terminal_width=200)
    assert out.exit_code == int(code), out.output
    assert said + ":" in out.output
    if code == ExitCode.NOT_LEARNED:
        assert "Try:" in out.output and "training.rounds" in out.output
    assert load_report(run_dir / "report.json").learning is not None


def test_the_exit_code_is_documented() -> None:
    assert int(ExitCode.NOT_LEARNED) == 21 and "does not beat guessing" in EXIT_HELP[ExitCode.NOT_LEARNED]
    out = runner.invoke(app, ["exit-codes"], terminal_width=250)
    assert "NOT_LEARNED" in out.output
