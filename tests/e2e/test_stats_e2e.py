"""A statistics query end to end in simulation (real SuperLink and Ray; marked ``slow``):
four municipalities' synthetic iWmo data, the noisy figures against the truth, the ledger and
the audit log of every node. (A query over a node's budget is refused in
``tests/unit/test_stats_node.py``; a run refused by every node for budget in ``tests/e2e/test_autonomy_e2e.py``.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedgov.analytics import load_query_report
from fedgov.data import iwmo
from fedgov.node.home import NodeHome, budget_of
from fedgov.launch.simulation import SimulationOptions
from fedgov.launch.query import run_query_simulation

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "configs" / "contracts" / "iwmo-wmo.toml"
CODES = ("GM0363", "GM0344", "GM0150", "GM0088")  # Amsterdam, Utrecht, Deventer, Schiermonnikoog


def test_query_in_simulation_figures_ledger_audit_and_budget(tmp_path: Path, write_file, flower_processes) -> None:
    source = iwmo.write(tmp_path / "wmo.csv", iwmo.generate(11, codes=CODES))
    fed = write_file(
        tmp_path / "fed.toml",
        f"""
        name = "wmo-4"
        seed = 11
        source = "{source}"
        [partition]
        kind = "column"
        column = "municipality"
        test_fraction = 0.2
        """ + "".join(f'[[members]]\ncode = "{c}"\n' for c in CODES),
    )
    query = write_file(
        tmp_path / "q.toml",
        f"""
        name = "wmo-e2e"
        contract = "{CONTRACT}"
        federation = "{fed}"
        regions = ["province"]
        [privacy]
        epsilon = 1.0
        max_rows_per_person = 1
        [[measures]]
        name = "clients-by-category"
        kind = "count"
        by = ["product_category"]
        weight = 2.0
        [[measures]]
        name = "mean-duration"
        kind = "mean"
        column = "duration_days"
        [[measures]]
        name = "ended-early"
        kind = "ratio"
        numerator = [{{ column = "ended_early", op = "eq", value = "1" }}]
        [[measures]]
        name = "volume-quantiles"
        kind = "quantiles"
        column = "volume"
        quantiles = [0.5]
        bins = 40
        """,
    )
    state = tmp_path / "state"
    opts = SimulationOptions(runs_dir=tmp_path / "runs", state_dir=state, node_budget=1.5, num_cpus=2)
    started = time.monotonic()
    run_dir = run_query_simulation(query, options=opts)
    seconds = time.monotonic() - started
    report = load_query_report(run_dir / "query.json")
    assert report.status == "completed" and report.mode == "simulation"
    assert sorted(n.node for n in report.accepted()) == sorted(CODES)
    assert all(n.epsilon == pytest.approx(1.0) for n in report.accepted())
    for name in ("query.json", "query.csv", "query.png"):
        assert (run_dir / name).is_file()
    assert report.result is not None and report.truth is not None and report.errors is not None
    truth = {f.key: f for f in report.truth.figures}
    national = report.result.select(scope="national")
    assert {f.measure for f in national} == {"clients-by-category", "mean-duration", "ended-early", "volume-quantiles"}
    for f in national:
        t = truth[f.key].estimate
        assert f.estimate is not None and t is not None and f.std_error is not None
        if f.kind in ("count", "mean", "ratio"):  # the stated error bar covers the error
            assert abs(f.estimate - t) <= 6 * f.std_error + 1e-9, (f.key, f.estimate, t, f.std_error)
        assert f.ci_low is not None and f.ci_high is not None and f.ci_low <= f.estimate <= f.ci_high
    # Schiermonnikoog's own small cells are never published; they still count nationally.
    tiny = report.result.select("clients-by-category", "node", "GM0088")
    assert any(f.suppressed and f.estimate is None for f in tiny)
    assert all(f.nodes == 4 for f in report.result.select("clients-by-category", "national"))
    print(f"query over 4 simulated municipalities: {seconds:.1f} s")

    for code in CODES:
        home = NodeHome(state / "nodes" / code)
        ds = home.policy().datasets[0]
        assert home.ledger.status(ds.name, budget_of(ds)).epsilon_committed == pytest.approx(1.0)
        assert home.audit.verify().ok
        assert [e.payload["epsilon"] for e in home.audit.entries() if e.kind == "spend"] == [pytest.approx(1.0)]

    time.sleep(0.5)
    assert flower_processes(tmp_path) == []
