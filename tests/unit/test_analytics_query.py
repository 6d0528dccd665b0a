"""Query files for federated statistics: validation (file and field of every problem), the
public cell grid, and the epsilon split (the parts add up exactly to the query's budget)."""

from __future__ import annotations

import math
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgov.analytics import MISSING_LEVEL, Query, cell_grid, check_query, load_query
from fedgov.config.contract import Contract
from fedgov.errors import ConfigError, ExitCode
from fedgov.node.ledger import Mechanism

CONTRACT_TOML = """
name = "mini-wmo"
version = "1.0"
person_id = "pid"

[[columns]]
name = "pid"
type = "string"

[[columns]]
name = "province"
type = "string"

[[columns]]
name = "cat"
type = "categorical"
categories = ["01", "02", "03"]

[[columns]]
name = "age_group"
type = "categorical"
categories = ["0-17", "18-64", "65+"]
nullable = true

[[columns]]
name = "ended_early"
type = "categorical"
categories = ["0", "1"]

[[columns]]
name = "ongoing"
type = "boolean"

[[columns]]
name = "age"
type = "integer"
min = 0
max = 105

[[columns]]
name = "duration_days"
type = "integer"
min = 1
max = 3650

[[columns]]
name = "volume"
type = "float"
min = 0
max = 40
"""

GOOD_QUERY = """
name = "mini-monitor"
contract = "contracts/mini.toml"
description = "test query"
where = [{ column = "age", op = "ge", value = 18 }]
regions = ["province"]

[privacy]
epsilon = 1.0
delta = 0.0
mechanism = "laplace"
max_rows_per_person = 2

[[measures]]
name = "clients-by-category"
kind = "count"
by = ["cat", "age_group"]
weight = 2.0

[[measures]]
name = "mean-duration"
kind = "mean"
column = "duration_days"

[[measures]]
name = "ended-early-share"
kind = "ratio"
numerator = [{ column = "ended_early", op = "eq", value = "1" }]

[[measures]]
name = "volume-quantiles"
kind = "quantiles"
column = "volume"
quantiles = [0.25, 0.5, 0.75]
bins = 80

[[measures]]
name = "duration-histogram"
kind = "histogram"
column = "duration_days"
edges = [0, 30, 90, 180, 365, 730, 3650]
where = [{ column = "ongoing", op = "eq", value = false }]

[[measures]]
name = "volume-total"
kind = "sum"
column = "volume"
by = ["ongoing"]
"""


def _write(tmp_path: Path, query_text: str, contract_text: str = CONTRACT_TOML) -> Path:
    (tmp_path / "contracts").mkdir(exist_ok=True)
    (tmp_path / "contracts" / "mini.toml").write_text(contract_text, "utf-8")
    path = tmp_path / "query.toml"
    path.write_text(textwrap.dedent(query_text), "utf-8")
    return path


def _contract() -> Contract:
    import tomllib

    return Contract.model_validate(tomllib.loads(CONTRACT_TOML))


def test_load_good_query(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD_QUERY)
    query, contract = load_query(path)
    assert query.name == "mini-monitor"
    assert query.contract == (tmp_path / "contracts" / "mini.toml").resolve()
    assert contract.ref == "mini-wmo@1.0"
    assert [m.kind for m in query.measures] == ["count", "mean", "ratio", "quantiles", "histogram", "sum"]
    assert query.rows_per_person(contract) == 2
    parts = [(p.measure, p.part) for p in query.parts()]
    assert parts == [
        ("clients-by-category", "counts"),
        ("mean-duration", "sum"),
        ("mean-duration", "count"),
        ("ended-early-share", "numerator"),
        ("ended-early-share", "denominator"),
        ("volume-quantiles", "counts"),
        ("duration-histogram", "counts"),
        ("volume-total", "sum"),
    ]
    split = query.epsilon_split()
    assert split["clients-by-category"] == pytest.approx(2 / 7)
    assert split["mean-duration"] == pytest.approx(1 / 7)
    assert sum(split.values()) == 1.0
    assert query.mechanism() == Mechanism(kind="laplace", epsilon=1.0, delta=0.0)


def test_cell_grid_comes_from_the_contract() -> None:
    contract = _contract()
    q = Query.model_validate(
        {
            "name": "g",
            "contract": "x.toml",
            "privacy": {"epsilon": 1.0},
            "measures": [
                {"name": "n", "kind": "count", "by": ["cat", "age_group", "ongoing"]},
                {"name": "h", "kind": "histogram", "column": "duration_days", "edges": [0, 30, 3650]},
                {"name": "q", "kind": "quantiles", "column": "volume", "quantiles": [0.5], "bins": 4},
            ],
        }
    )
    g = cell_grid(q.measures[0], contract)
    assert g.levels == (("01", "02", "03"), ("0-17", "18-64", "65+", MISSING_LEVEL), ("false", "true"))
    assert g.size == 3 * 4 * 2
    assert g.keys()[0] == "cat=01;age_group=0-17;ongoing=false"
    h = cell_grid(q.measures[1], contract)
    assert h.keys() == ["bin=[0, 30)", "bin=[30, 3650]"]
    qg = cell_grid(q.measures[2], contract)
    assert qg.edges == (0.0, 10.0, 20.0, 30.0, 40.0)


# --------------------------------------------------------------------------- bad files


def _replace(old: str, new: str) -> str:
    assert old in GOOD_QUERY, old
    return GOOD_QUERY.replace(old, new, 1)


BAD_CASES = {
    "unknown-by-column": (_replace('by = ["cat", "age_group"]', 'by = ["cat", "agegroup"]'), "measures[0].by[1]", "not a column"),
    "by-not-categorical": (_replace('by = ["cat", "age_group"]', 'by = ["cat", "age"]'), "measures[0].by[1]", "categorical or boolean"),
    "unknown-measure-column": (_replace('column = "duration_days"\n\n[[measures]]\nname = "ended', 'column = "duration"\n\n[[measures]]\nname = "ended'), "measures[1].column", "not a column"),
    "mean-of-categorical": (_replace('column = "duration_days"\n\n[[measures]]\nname = "ended', 'column = "cat"\n\n[[measures]]\nname = "ended'), "measures[1].column", "numeric"),
    "quantiles-of-boolean": (_replace('column = "volume"\nquantiles', 'column = "ongoing"\nquantiles'), "measures[3].column", "numeric"),
    "histogram-of-string": (_replace('column = "duration_days"\nedges', 'column = "province"\nedges'), "measures[4].column", "numeric"),
    "sum-of-categorical": (_replace('kind = "sum"\ncolumn = "volume"', 'kind = "sum"\ncolumn = "cat"'), "measures[5].column", "numeric"),
    "filter-value-not-a-category": (_replace('op = "eq", value = "1" }', 'op = "eq", value = "yes" }'), "measures[2].numerator[0].value", "not among the categories"),
    "where-unknown-column": (_replace('column = "age", op = "ge"', 'column = "leeftijd", op = "ge"'), "where[0].column", "not a column"),
    "ordered-op-on-categorical": (_replace('op = "eq", value = "1" }', 'op = "gt", value = 0 }'), "measures[2].numerator[0].op", "numeric column"),
    "numeric-filter-with-text": (_replace('op = "ge", value = 18 }', 'op = "eq", value = "18" }'), "where[0].value", "non-numeric"),
    "boolean-filter-with-text": (_replace('value = false }', 'value = "no" }'), "measures[4].where[0].value", "boolean"),
    "between-three-values": (_replace('op = "ge", value = 18 }', 'op = "between", value = [1, 2, 3] }'), "where[0].value", "two numbers"),
    "in-without-list": (_replace('op = "ge", value = 18 }', 'op = "in", value = 18 }'), "where[0].value", "list"),
    "edges-not-increasing": (_replace("edges = [0, 30, 90, 180, 365, 730, 3650]", "edges = [0, 30, 30, 180]"), "measures[4].edges", "increasing"),
    "quantile-outside-0-1": (_replace("quantiles = [0.25, 0.5, 0.75]", "quantiles = [0.25, 1.0]"), "measures[3].quantiles", "between 0 and 1"),
    "quantile-zero": (_replace("quantiles = [0.25, 0.5, 0.75]", "quantiles = [0.0, 0.5]"), "measures[3].quantiles", "between 0 and 1"),
    "duplicate-measure-name": (_replace('name = "mean-duration"', 'name = "clients-by-category"'), "measures[1].name", "already used"),
    "gaussian-delta-0": (_replace('mechanism = "laplace"', 'mechanism = "gaussian"'), "privacy.delta", "delta > 0"),
    "laplace-delta-positive": (_replace("delta = 0.0", "delta = 1e-6"), "privacy.delta", "delta must be 0"),
    "max-rows-0": (_replace("max_rows_per_person = 2", "max_rows_per_person = 0"), "privacy.max_rows_per_person", "at least 1"),
    "epsilon-0": (_replace("epsilon = 1.0", "epsilon = 0"), "privacy.epsilon", "greater than 0"),
    "ratio-without-numerator": (_replace('numerator = [{ column = "ended_early", op = "eq", value = "1" }]\n', ""), "measures[2].numerator", "numerator"),
    "count-with-column": (_replace('by = ["cat", "age_group"]\nweight', 'column = "age"\nby = ["cat", "age_group"]\nweight'), "measures[0].column", "no 'column'"),
    "edges-on-count": (_replace("weight = 2.0", "weight = 2.0\nedges = [1, 2]"), "measures[0].edges", "only for kind 'histogram'"),
    "weight-negative": (_replace("weight = 2.0", "weight = -1"), "measures[0].weight", "greater than 0"),
    "unknown-region": (_replace('regions = ["province"]', 'regions = ["provincie"]'), "regions[0]", "not a column"),
    "region-numeric": (_replace('regions = ["province"]', 'regions = ["age"]'), "regions[0]", "categorical or string"),
    "unknown-kind": (_replace('kind = "count"', 'kind = "median"'), "measures[0].kind", "Input should be"),
    "misspelled-key": (_replace('kind = "count"', 'kind = "count"\ncolum = "x"'), "measures[0].colum", "unknown field"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_query_reports_file_and_field(tmp_path: Path, case: str) -> None:
    text, field, message = BAD_CASES[case]
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_query(path)
    err = info.value
    assert err.exit_code == ExitCode.CONFIG == 10
    locations = {p.location: p for p in err.problems}
    assert field in locations, f"{case}: {[str(p) for p in err.problems]}"
    assert locations[field].file == str(path)
    assert message in locations[field].message
    assert str(path) in str(err)


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    text = GOOD_QUERY.replace('by = ["cat", "age_group"]', 'by = ["kat"]').replace(
        'op = "eq", value = "1" }', 'op = "eq", value = "2" }'
    ).replace('name = "mean-duration"', 'name = "clients-by-category"').replace(
        "max_rows_per_person = 2", "max_rows_per_person = 0"
    )
    with pytest.raises(ConfigError) as info:
        load_query(_write(tmp_path, text))
    where = {p.location for p in info.value.problems}
    assert {"measures[0].by[0]", "measures[2].numerator[0].value", "measures[1].name", "privacy.max_rows_per_person"} <= where


def test_missing_contract_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "q.toml"
    path.write_text(GOOD_QUERY.replace("contracts/mini.toml", "nowhere.toml"), "utf-8")
    with pytest.raises(ConfigError):
        load_query(path)


def test_without_person_id_each_row_is_a_person() -> None:
    contract = _contract().model_copy(update={"person_id": None})
    q = Query.model_validate(
        {
            "name": "n",
            "contract": "x.toml",
            "privacy": {"epsilon": 1.0, "max_rows_per_person": 0},
            "measures": [{"name": "n", "kind": "count"}],
        }
    )
    assert check_query(q, contract) == []
    assert q.rows_per_person(contract) == 1
    assert check_query(q, _contract())[0].location == "privacy.max_rows_per_person"


# --------------------------------------------------------------------------- epsilon split

_KINDS = ["count", "sum", "mean", "histogram", "quantiles", "ratio"]


def _measure(i: int, kind: str, weight: float) -> dict[str, object]:
    m: dict[str, object] = {"name": f"m{i}", "kind": kind, "weight": weight}
    if kind in ("sum", "mean"):
        m["column"] = "volume"
    if kind == "histogram":
        m.update(column="age", edges=[0, 18, 65, 105])
    if kind == "quantiles":
        m.update(column="age", quantiles=[0.5])
    if kind == "ratio":
        m["numerator"] = [{"column": "ongoing", "op": "eq", "value": True}]
    return m


@settings(max_examples=300, deadline=None)
@given(
    epsilon=st.floats(min_value=1e-4, max_value=100, allow_nan=False, allow_infinity=False),
    delta=st.one_of(st.just(0.0), st.floats(min_value=1e-12, max_value=0.5)),
    measures=st.lists(
        st.tuples(st.sampled_from(_KINDS), st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)), min_size=1, max_size=12
    ),
)
def test_epsilon_parts_add_up_exactly(epsilon: float, delta: float, measures: list[tuple[str, float]]) -> None:
    q = Query.model_validate(
        {
            "name": "p",
            "contract": "x.toml",
            "privacy": {"epsilon": epsilon, "delta": delta, "mechanism": "gaussian" if delta > 0 else "laplace"},
            "measures": [_measure(i, k, w) for i, (k, w) in enumerate(measures)],
        }
    )
    parts = q.parts()
    eps = [p.epsilon for p in parts]
    deltas = [p.delta for p in parts]
    expected_parts = sum(2 if k in ("mean", "ratio") else 1 for k, _ in measures)
    assert len(parts) == expected_parts
    # exactly: in floating point in any order, and as exact rationals
    assert sum(eps) == epsilon and sum(reversed(eps)) == epsilon and math.fsum(eps) == epsilon
    assert sum((Fraction(e) for e in eps), Fraction(0)) == Fraction(epsilon)
    assert sum((Fraction(d) for d in deltas), Fraction(0)) == Fraction(delta)
    assert all(e > 0 for e in eps)
    assert sum(q.epsilon_split().values()) == epsilon
    assert math.fsum(q.delta_split().values()) == delta
    # proportional to the weights (up to the ulp apportioning)
    total_w = sum(w for _, w in measures)
    for (_kind, w), (name, e) in zip(measures, q.epsilon_split().items(), strict=True):
        assert e == pytest.approx(epsilon * w / total_w, rel=1e-9, abs=1e-12), name
    # what the ledger records is the whole query, exactly what the parts add up to
    mech = q.mechanism()
    assert mech.kind == q.privacy.mechanism and mech.epsilon == sum(eps) and mech.delta == math.fsum(deltas)


def test_mean_and_ratio_split_their_epsilon_in_half() -> None:
    q = Query.model_validate(
        {
            "name": "h",
            "contract": "x.toml",
            "privacy": {"epsilon": 0.9},
            "measures": [_measure(0, "mean", 1.0), _measure(1, "ratio", 1.0), _measure(2, "count", 1.0)],
        }
    )
    parts = q.parts()
    assert parts[0].epsilon == pytest.approx(0.15) and parts[1].epsilon == pytest.approx(0.15)
    assert parts[2].epsilon == pytest.approx(0.15) and parts[3].epsilon == pytest.approx(0.15)
    assert parts[4].epsilon == pytest.approx(0.3)
    assert sum(p.epsilon for p in parts) == 0.9
