"""A node's side of a statistics query, without Flower: policy, budget, ledger, audit, cells."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedgov.analytics import LocalRelease, load_query
from fedgov.data import iwmo
from fedgov.node.home import NodeHome, budget_of
from fedgov.node.statistics import answer_query, query_id_of

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "configs" / "contracts" / "iwmo-wmo.toml"


@pytest.fixture
def wmo_query(write_file):
    """``wmo_query(folder, epsilon=1.0, by='["product_category"]')``: a count and a mean over the iWmo contract."""

    def make(tmp: Path, *, epsilon: float = 1.0, by: str = '["product_category"]') -> Path:
        return write_file(
            tmp / "q.toml",
            f"""
            name = "q"
            contract = "{CONTRACT}"
            [privacy]
            epsilon = {epsilon}
            max_rows_per_person = 1
            [[measures]]
            name = "by-category"
            kind = "count"
            by = {by}
            [[measures]]
            name = "mean-duration"
            kind = "mean"
            column = "duration_days"
            """,
        )

    return make


@pytest.fixture
def wmo_home(node_home):
    """``wmo_home(folder, code="GM0363", budget=2.5, ...)``: the node of ``code`` with its synthetic
    iWmo data (seed 7) and a policy that answers statistics queries."""

    def make(tmp: Path, code: str = "GM0363", *, budget: float = 2.5, kinds: tuple[str, ...] = ("training", "statistics"),
             min_cohort: int = 10, small_cells: str = "publish-suppressed", approval: str = "auto") -> NodeHome:
        data = tmp / code / "wmo.csv"
        iwmo.write(data, iwmo.generate(7, codes=[code]))
        return node_home(tmp / code / "node", code, budget=budget, dataset="wmo", contract="iwmo-wmo", data=data,
                         approval=approval, kinds=kinds, min_cohort=min_cohort, small_cells=small_cells)

    return make


def test_answer_spends_exactly_the_query_epsilon_and_audits_it(tmp_path: Path, wmo_home, wmo_query) -> None:
    home = wmo_home(tmp_path)
    query, contract = load_query(wmo_query(tmp_path))
    a = answer_query(home, "GM0363", query, contract, query_id=query_id_of(query, contract, 1))
    assert a.accepted and a.epsilon == pytest.approx(1.0) and a.release_json
    release = LocalRelease.model_validate_json(a.release_json)
    assert release.epsilon == pytest.approx(1.0)
    ds = home.policy().datasets[0]
    st = home.ledger.status(ds.name, budget_of(ds))
    assert st.epsilon_committed == pytest.approx(1.0) and st.open_tasks == []
    kinds = [e.kind for e in home.audit.entries()]
    assert kinds.count("decision") == 1 and kinds.count("spend") == 1
    spend = next(e for e in home.audit.entries() if e.kind == "spend")
    assert spend.payload["epsilon"] == pytest.approx(1.0)
    assert home.audit.verify().ok


def test_a_query_over_the_budget_is_refused_with_its_reason(tmp_path: Path, wmo_home, wmo_query) -> None:
    home = wmo_home(tmp_path, budget=2.5)
    query, contract = load_query(wmo_query(tmp_path))
    for run in (1, 2):
        assert answer_query(home, "GM0363", query, contract, query_id=query_id_of(query, contract, run)).accepted
    third = answer_query(home, "GM0363", query, contract, query_id=query_id_of(query, contract, 3))
    assert not third.accepted and third.code == "budget-exhausted"
    assert "2.5" in third.reason and third.release_json is None
    ds = home.policy().datasets[0]
    assert home.ledger.status(ds.name, budget_of(ds)).epsilon_committed == pytest.approx(2.0)


def test_policy_refusals_come_before_the_data(tmp_path: Path, wmo_home, wmo_query) -> None:
    query, contract = load_query(wmo_query(tmp_path, epsilon=5.0))
    home = wmo_home(tmp_path, budget=10.0)
    a = answer_query(home, "GM0363", query, contract, query_id="x")
    assert not a.accepted and a.code == "epsilon-above-max"
    no_stats = wmo_home(tmp_path / "b", kinds=("training",))
    q1, _ = load_query(wmo_query(tmp_path / "b"))
    b = answer_query(no_stats, "GM0363", q1, contract, query_id="y")
    assert not b.accepted and b.code == "kind-not-allowed"
    no_stats.state.pause("maintenance")
    c = answer_query(no_stats, "GM0363", q1, contract, query_id="z")
    assert c.code == "paused" and "maintenance" not in c.reason  # the operator's note stays at the node


def test_manual_approval_queues_then_answers(tmp_path: Path, wmo_home, wmo_query) -> None:
    home = wmo_home(tmp_path, approval="manual")
    query, contract = load_query(wmo_query(tmp_path))
    a = answer_query(home, "GM0363", query, contract, query_id="run-1")
    assert a.code == "pending-approval"
    [pending] = home.state.pending()
    assert pending.summary["kind"] == "statistics" and pending.summary["epsilon"] == 1.0
    home.state.approve(pending.task_id)
    assert answer_query(home, "GM0363", query, contract, query_id="run-2").accepted


def test_small_cells_are_flagged_or_withheld_as_the_policy_says(tmp_path: Path, wmo_home, wmo_query) -> None:
    query, contract = load_query(wmo_query(tmp_path))
    flagged = wmo_home(tmp_path / "f", code="GM0088", min_cohort=500)  # Schiermonnikoog: every cell is small
    a = answer_query(flagged, "GM0088", query, contract, query_id="a")
    rel = LocalRelease.model_validate_json(a.release_json or "")
    counts = rel.part("by-category", "counts")
    assert all(counts.small) and all(v is not None for v in counts.values)
    withheld = wmo_home(tmp_path / "w", code="GM0088", min_cohort=500, small_cells="withhold")
    b = answer_query(withheld, "GM0088", query, contract, query_id="b")
    rel_b = LocalRelease.model_validate_json(b.release_json or "")
    assert all(v is None for v in rel_b.part("by-category", "counts").values)
    assert rel_b.withheld_cells() > 0


def test_invalid_data_is_refused_without_values(tmp_path: Path, wmo_home, wmo_query) -> None:
    home = wmo_home(tmp_path)
    data = home.policy().datasets[0].path
    text = data.read_text().splitlines()
    cols = text[0].split(",")
    age = cols.index("age")
    row = text[1].split(",")
    row[age] = "-12345"
    text[1] = ",".join(row)
    data.write_text("\n".join(text) + "\n")
    query, contract = load_query(wmo_query(tmp_path))
    a = answer_query(home, "GM0363", query, contract, query_id="q")
    assert not a.accepted and a.code == "data-invalid" and "-12345" not in a.reason
    assert home.ledger.datasets() == []  # nothing reserved
