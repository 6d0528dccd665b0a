"""fedgov data draft: first drafts of a new data set's contract, registry, federation, task and
query, which fedgov's own loaders accept as they are."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedgov.analytics.query import load_query
from fedgov.cli import app
from fedgov.config import load_contract, load_federation, load_task
from fedgov.data.draft import DraftError, draft, nice_bounds
from fedgov.data.validate import validate_frame

runner = CliRunner()


def _table() -> pd.DataFrame:
    rows = []
    for i in range(60):
        rows.append({
            "region": ["Noord", "Zuid", "Oost West", "oost-west"][i % 4],  # a space, and a clash ignoring case
            "age": str(18 + (i * 7) % 70),
            "income": f"{1234.5 + 10.25 * i:.2f}",
            "smoker": ["yes", "no"][i % 2],
            "sector": ["A", "B", "C"][i % 3] if i % 10 else "",
            "note": f"free text {i}",
            "label": ["low", "mid", "high"][(i // 2) % 3],
        })
    rows.append({"region": "Eiland", "age": "40", "income": "2000.00", "smoker": "no", "sector": "A", "note": "x", "label": "low"})
    return pd.DataFrame(rows)


def test_the_drafts_load_with_fedgovs_own_loaders_and_the_table_conforms(tmp_path: Path) -> None:
    src = tmp_path / "mine.csv"
    _table().to_csv(src, index=False)
    res = runner.invoke(app, ["data", "draft", str(src), "--target", "label", "--organisation", "region", "--out-dir", str(tmp_path / "cfg")])
    assert res.exit_code == 0, res.output
    cfg = tmp_path / "cfg"
    contract = load_contract(cfg / "contracts" / "mine.toml")
    kinds = {c.name: c.type.value for c in contract.columns}
    assert kinds == {"age": "integer", "income": "float", "smoker": "boolean", "sector": "categorical", "note": "string", "label": "categorical"}
    assert "region" not in kinds  # the organisation column is the federation's split, not a contract column
    assert contract.column("sector").nullable and not contract.column("age").nullable
    age = contract.column("age")
    assert (age.min, age.max) == (10, 90)  # 18 .. 81 in the table, widened to round numbers
    # the table itself conforms to its drafted contract (projected on the contract's columns)
    validate_frame(_table().astype(str).drop(columns=["region"]), contract, file=str(src))

    fed = load_federation(cfg / "federations" / "mine.toml")
    codes = [m.code for m in fed.members]
    assert len(codes) == 4 and "Eiland" not in codes  # a single-row organisation cannot be split: left out, said so
    assert "single row" in res.output
    assert len({c.lower() for c in codes}) == 4  # 'Oost West' and 'oost-west' stay two members
    assert {fed.name_of(c) for c in codes} == {"Noord", "Zuid", "Oost West", "oost-west"}
    assert fed.node_policy.min_rows == 1

    task, _ = load_task(cfg / "tasks" / "mine.toml")
    assert task.privacy.target_epsilon == 2.0
    assert task.privacy.mode == "distributed" and task.training.secure_aggregation  # 15 rows an organisation
    # a seeded tenth held out for the coordinator's figure: its rows are not in the nodes' file
    assert task.evaluation.centralized is not None
    central = pd.read_csv(task.evaluation.centralized, dtype=str, keep_default_na=False)
    nodes = pd.read_csv(cfg / "data" / "mine-nodes.csv", dtype=str, keep_default_na=False)
    assert 0 < len(central) < len(nodes) and len(central) + len(nodes) == len(_table())
    assert list(central.columns) == [c.name for c in contract.columns]  # the contract's columns only
    validate_frame(central, contract, file="central")
    query, _ = load_query(cfg / "queries" / "mine.toml")
    assert [m.kind for m in query.measures] == ["count", "mean"]

    again = runner.invoke(app, ["data", "draft", str(src), "--target", "label", "--organisation", "region", "--out-dir", str(cfg)])
    assert again.exit_code == 2 and "--force" in again.output  # nothing is overwritten unasked


def test_numeric_organisations_are_named_by_their_column() -> None:
    df = pd.DataFrame({"lea": ["7", "7", "12", "12", "12"], "y": ["a", "b", "a", "b", "a"], "x": ["1", "2", "3", "4", "5"]})
    out = draft(df, name="t", source="t.csv", target="y", organisation="lea")
    assert out.files["registries/t.csv"].splitlines() == ["code,name", "7,lea 7", "12,lea 12"]


def test_large_organisations_get_dp_sgd_at_every_node(tmp_path: Path) -> None:
    n = 1200
    df = pd.DataFrame({"org": ["a", "b"] * (n // 2), "y": ["p", "q", "q"] * (n // 3), "x": [str(i % 7) for i in range(n)]})
    out = draft(df, name="big", source="big.csv", target="y", organisation="org")
    for rel, text in out.files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    df.to_csv(tmp_path / "big.csv", index=False)
    task, _ = load_task(tmp_path / "tasks" / "big.toml")
    assert task.privacy.mode == "local" and not task.training.secure_aggregation


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"target": "nope", "organisation": "org"}, "target column 'nope' is not a column"),
        ({"target": "y", "organisation": "nope"}, "organisation column 'nope' is not a column"),
        ({"target": "y", "organisation": "y"}, "cannot be the organisation"),
        ({"target": "blank", "organisation": "org"}, "has empty cells"),
    ],
)
def test_a_request_the_table_cannot_meet_is_a_clear_error(kwargs: dict[str, str], expected: str) -> None:
    df = pd.DataFrame({"org": ["a", "a", "b", "b"], "y": ["1", "0", "1", "0"], "blank": ["p", "", "q", "p"]})
    with pytest.raises(DraftError, match=expected):
        draft(df, name="t", source="t.csv", **kwargs)


@settings(max_examples=200, derandomize=True)
@given(
    st.floats(min_value=-1e9, max_value=1e9, allow_nan=False),
    st.floats(min_value=0, max_value=1e9, allow_nan=False),
    st.booleans(),
)
def test_bounds_are_widened_outward_never_inward(lo: float, width: float, integer: bool) -> None:
    if integer:
        lo, width = float(math.floor(lo)), float(math.ceil(width))
    hi = lo + width
    nlo, nhi = nice_bounds(lo, hi, integer=integer)
    assert nlo <= lo and nhi >= hi and nlo < nhi
    if lo >= 0:
        assert nlo >= 0  # a non-negative column keeps a non-negative bound
