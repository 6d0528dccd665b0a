"""Simulated federations: node sizes, skew, train/test splits, node files and the manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fedgov.config.contract import Contract, load_contract
from fedgov.config.federation import Federation, load_federation
from fedgov.data import (
    NodeData,
    materialize,
    population_sizes,
    read_manifest,
    read_table,
    split_federation,
    train_test_split,
    validate_frame,
    write_csv,
    write_manifest,
)
from fedgov.errors import ConfigError, DataFileError, DataValidationError
from fedgov.config.municipalities import municipality

ROOT = Path(__file__).resolve().parents[2]
ADULT_CSV = ROOT / "data" / "adult" / "adult.csv"


@pytest.fixture(scope="module")
def adult() -> Contract:
    return load_contract(ROOT / "configs" / "contracts" / "adult-income.toml")


@pytest.fixture(scope="module")
def adult_typed(adult: Contract) -> pd.DataFrame:
    return validate_frame(read_table(ADULT_CSV), adult, file="adult.csv")


@pytest.fixture(scope="module")
def demo() -> Federation:
    return load_federation(ROOT / "configs" / "federations" / "demo-12.toml")


def federation(
    members: list[str] | list[dict[str, Any]],
    *,
    source: Path | None = ADULT_CSV,
    seed: int = 0,
    **partition: Any,
) -> Federation:
    return Federation.model_validate(
        {
            "name": "test",
            "seed": seed,
            **({"source": source} if source is not None else {}),
            "partition": partition,
            "members": [m if isinstance(m, dict) else {"code": m} for m in members],
        }
    )


def with_partition(fed: Federation, **changes: Any) -> Federation:
    return fed.model_copy(update={"partition": fed.partition.model_copy(update=changes)})


# --- sizes --------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 2_000_000), min_size=1, max_size=40),
    st.integers(1, 200),
    st.integers(0, 50_000),
)
def test_population_sizes(weights: list[int], min_rows: int, extra: int) -> None:
    total = min_rows * len(weights) + extra
    sizes = population_sizes(weights, total, min_rows)
    assert sum(sizes) == total
    assert min(sizes) >= min_rows
    for a in range(len(weights)):
        for b in range(len(weights)):
            if weights[a] > weights[b]:
                assert sizes[a] >= sizes[b]


def test_population_sizes_are_proportional_above_the_floor() -> None:
    assert population_sizes([300, 100, 1], 1000, 10) == [
        743,
        247,
        10,
    ]  # 742.5 and 247.5: the tie goes to the larger weight
    with pytest.raises(ValueError, match="need 30 rows"):
        population_sizes([1, 1, 1], 29, 10)


# --- population split of the demo federation ---------------------------------------------


def test_demo_split_is_disjoint_complete_and_follows_population(
    demo: Federation, adult: Contract, adult_typed: pd.DataFrame
) -> None:
    for skew in ("label", "none"):
        parts = split_federation(with_partition(demo, skew=skew), adult, adult_typed)
        assert list(parts) == [m.code for m in demo.members]
        index = np.concatenate([p.index.to_numpy() for p in parts.values()])
        assert len(index) == len(set(index)) == len(adult_typed)  # disjoint, and all rows used
        sizes = {code: len(p) for code, p in parts.items()}
        assert min(sizes.values()) >= demo.partition.min_rows
        pops = {code: municipality(code).approx_population for code in parts}
        for a in parts:
            for b in parts:
                if pops[a] > pops[b]:
                    assert sizes[a] >= sizes[b], (a, b)
        assert sizes["GM0589"] == demo.partition.min_rows  # Oudewater's share is below the floor
        for p in parts.values():  # rows keep the source order and their values
            assert p.index.is_monotonic_increasing
            pd.testing.assert_frame_equal(p, adult_typed.loc[p.index])


def test_split_is_seeded(demo: Federation, adult: Contract, adult_typed: pd.DataFrame) -> None:
    def rows(fed: Federation) -> dict[str, list[int]]:
        return {code: p.index.tolist() for code, p in split_federation(fed, adult, adult_typed).items()}

    assert rows(demo) == rows(demo)
    other = rows(demo.model_copy(update={"seed": demo.seed + 1}))
    assert other != rows(demo)
    # The sizes depend on the populations only, not on the seed.
    assert {c: len(r) for c, r in other.items()} == {c: len(r) for c, r in rows(demo).items()}


def _spread(fed: Federation, adult: Contract, df: pd.DataFrame, column: str, value: str) -> float:
    """How far the nodes' share of ``value`` strays from the global share (mean absolute)."""
    parts = split_federation(fed, adult, df)
    overall = (df[column] == value).mean()
    return float(np.mean([abs((p[column] == value).mean() - overall) for p in parts.values()]))


def test_small_alpha_skews_labels_more_than_large_alpha(
    demo: Federation, adult: Contract, adult_typed: pd.DataFrame
) -> None:
    for seed in (0, 1, 2):
        skewed = _spread(
            with_partition(demo, dirichlet_alpha=0.1).model_copy(update={"seed": seed}),
            adult,
            adult_typed,
            "income",
            ">50K",
        )
        alike = _spread(
            with_partition(demo, dirichlet_alpha=1000.0).model_copy(update={"seed": seed}),
            adult,
            adult_typed,
            "income",
            ">50K",
        )
        assert skewed > 2 * alike
        assert alike < 0.05


def test_feature_skew(demo: Federation, adult: Contract, adult_typed: pd.DataFrame) -> None:
    skewed = with_partition(demo, skew="feature", skew_column="sex", dirichlet_alpha=0.1)
    alike = with_partition(demo, skew="feature", skew_column="sex", dirichlet_alpha=1000.0)
    assert _spread(skewed, adult, adult_typed, "sex", "Female") > 2 * _spread(
        alike, adult, adult_typed, "sex", "Female"
    )
    with pytest.raises(ConfigError, match="categorical or boolean"):
        split_federation(with_partition(demo, skew="feature", skew_column="age"), adult, adult_typed)


def test_zero_population_counts_as_min_rows(adult: Contract, adult_typed: pd.DataFrame) -> None:
    assert municipality("GM0317").approx_population == 0  # Eemnes: no GeoNames place matched
    fed = federation(["GM0363", "GM0317", "GM0589"], min_rows=40, skew="none")
    sizes = {c: len(p) for c, p in split_federation(fed, adult, adult_typed.head(5000)).items()}
    assert sizes["GM0317"] == 40
    assert sum(sizes.values()) == 5000


def test_too_few_rows_for_min_rows(demo: Federation, adult: Contract, adult_typed: pd.DataFrame) -> None:
    with pytest.raises(ConfigError) as info:
        split_federation(demo, adult, adult_typed.head(1000))
    assert info.value.problems[0].location == "partition.min_rows"
    assert "1200 rows needed, the source has 1000" in info.value.problems[0].message


# --- split by a column ---------------------------------------------------------------------


def org_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "gemeente": ["GM0363", "GM0599", "GM0363", "Rdam", "GM0344", "GM0599", "elsewhere"],
            "x": np.arange(7, dtype=np.float64),
        }
    )


def test_split_by_column(adult: Contract) -> None:
    fed = federation(
        ["GM0363", {"code": "GM0599", "values": ["GM0599", "Rdam"]}], kind="column", column="gemeente"
    )
    parts = split_federation(fed, adult, org_frame())
    assert parts["GM0363"]["x"].tolist() == [0.0, 2.0]
    assert parts["GM0599"]["x"].tolist() == [1.0, 3.0, 5.0]


def test_split_by_column_errors(adult: Contract) -> None:
    fed = federation(["GM0363", "GM0014", "GM0855"], kind="column", column="gemeente")
    with pytest.raises(ConfigError) as info:
        split_federation(fed, adult, org_frame())
    assert [p.location for p in info.value.problems] == ["members[1]", "members[2]"]
    assert "GM0014 (Groningen) has no rows" in info.value.problems[0].message

    with pytest.raises(ConfigError, match="no column 'gemeente'"):
        split_federation(fed, adult, org_frame().drop(columns="gemeente"))

    overlap = federation(
        ["GM0363", {"code": "GM0599", "values": ["GM0363"]}], kind="column", column="gemeente"
    )
    with pytest.raises(ConfigError, match="one member only"):
        split_federation(overlap, adult, org_frame())


def test_kind_files_is_not_split(adult: Contract, tmp_path: Path) -> None:
    fed = federation([{"code": "GM0363", "data": tmp_path / "a.csv"}], source=None, kind="files")
    with pytest.raises(ValueError, match="nothing to split"):
        split_federation(fed, adult, pd.DataFrame())


# --- train/test ---------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 300), st.floats(0.01, 0.99), st.integers(0, 2**32 - 1))
def test_train_test_split(n: int, fraction: float, seed: int) -> None:
    df = pd.DataFrame({"v": np.arange(n)}, index=np.arange(n) * 3)
    train, test = train_test_split(df, fraction, seed)
    assert sorted(train.index.tolist() + test.index.tolist()) == df.index.tolist()
    assert not set(train.index) & set(test.index)
    if n >= 2:
        assert len(test) >= 1 and len(train) >= 1
        assert abs(len(test) - n * fraction) <= 1 or len(test) in (1, n - 1)
    a, b = train_test_split(df, fraction, seed)
    assert a.index.tolist() == train.index.tolist() and b.index.tolist() == test.index.tolist()


# --- node files and the manifest -----------------------------------------------------------


@pytest.fixture(scope="module")
def sample_csv(tmp_path_factory: pytest.TempPathFactory, adult: Contract, adult_typed: pd.DataFrame) -> Path:
    p = tmp_path_factory.mktemp("src") / "sample.csv"
    write_csv(adult_typed.head(3000), p, adult)
    return p


def test_materialize_population(tmp_path: Path, adult: Contract, sample_csv: Path) -> None:
    codes = ["GM0599", "GM0344", "GM0150", "GM0589"]
    fed = federation(codes, source=sample_csv, seed=7, min_rows=100, test_fraction=0.25)
    nodes = materialize(fed, adult, tmp_path / "nodes")
    assert [n.code for n in nodes] == codes
    assert nodes[0].name == "Rotterdam"
    assert sum(n.train_rows + n.test_rows for n in nodes) == 3000
    seen: set[tuple[object, ...]] = set()
    for n in nodes:
        assert n.train_path == (tmp_path / "nodes" / n.code / "train.csv").resolve()
        train = validate_frame(read_table(n.train_path), adult, file=str(n.train_path))
        test = validate_frame(read_table(n.test_path), adult, file=str(n.test_path))
        assert (len(train), len(test)) == (n.train_rows, n.test_rows)
        assert list(train.columns) == adult.names()
        assert abs(n.test_rows - 0.25 * (n.train_rows + n.test_rows)) <= 1
        seen.update(map(tuple, train.fillna("").itertuples(index=False)))
    assert not list((tmp_path / "nodes").rglob("*.tmp"))

    manifest = tmp_path / "manifest.json"
    write_manifest(nodes, manifest)
    assert read_manifest(manifest) == nodes
    assert json.loads(manifest.read_text())[0]["code"] == "GM0599"

    again = materialize(fed, adult, tmp_path / "again")  # same seed, same files
    assert [Path(a.train_path).read_bytes() for a in again] == [
        Path(n.train_path).read_bytes() for n in nodes
    ]


def test_materialize_column_with_an_undeclared_org_column(
    tmp_path: Path, adult: Contract, adult_typed: pd.DataFrame
) -> None:
    src = adult_typed.head(60).copy()
    src["gemeente"] = ["GM0363", "GM0599", "GM0014"] * 20
    p = tmp_path / "orgs.csv"
    write_csv(src, p, adult)
    fed = federation(["GM0363", "GM0599"], source=p, kind="column", column="gemeente")
    nodes = materialize(fed, adult, tmp_path / "nodes")
    assert [n.train_rows + n.test_rows for n in nodes] == [20, 20]
    for n in nodes:  # the org column is not part of the contract, so not of the node files
        assert list(read_table(n.train_path).columns) == adult.names()


def test_materialize_files(tmp_path: Path, adult: Contract, adult_typed: pd.DataFrame) -> None:
    a, b, b_test = tmp_path / "a.csv", tmp_path / "b.parquet", tmp_path / "b_test.csv"
    write_csv(adult_typed.iloc[:30], a, adult)
    adult_typed.iloc[30:50].to_parquet(b)
    write_csv(adult_typed.iloc[50:55], b_test, adult)
    fed = federation(
        [{"code": "GM0363", "data": a}, {"code": "GM0599", "data": b, "test_data": b_test}],
        source=None,
        kind="files",
        test_fraction=0.2,
    )
    nodes = materialize(fed, adult, tmp_path / "nodes")
    assert [(n.train_rows, n.test_rows) for n in nodes] == [(24, 6), (20, 5)]
    pd.testing.assert_frame_equal(
        validate_frame(read_table(nodes[1].test_path), adult, file="t"),
        adult_typed.iloc[50:55].reset_index(drop=True),
    )


def test_materialize_files_lists_violations_of_every_member(
    tmp_path: Path, adult: Contract, adult_typed: pd.DataFrame
) -> None:
    write_csv(adult_typed.head(5), tmp_path / "five.csv", adult)
    text = read_table(tmp_path / "five.csv")
    bad1, bad2 = text.copy(), text.copy()
    bad1.loc[0, "age"] = "old"
    bad2.loc[4, "sex"] = "X"
    p1, p2 = tmp_path / "1.csv", tmp_path / "2.csv"
    bad1.to_csv(p1, index=False)
    bad2.to_csv(p2, index=False)
    fed = federation(
        [{"code": "GM0363", "data": p1}, {"code": "GM0599", "data": p2}], source=None, kind="files"
    )
    with pytest.raises(DataValidationError) as info:
        materialize(fed, adult, tmp_path / "nodes")
    assert [(p.file, p.location) for p in info.value.problems] == [
        (str(p1), "row 1, column 'age'"),
        (str(p2), "row 5, column 'sex'"),
    ]
    assert not (tmp_path / "nodes").exists()


def test_materialize_refuses_a_node_without_test_rows(
    tmp_path: Path, adult: Contract, adult_typed: pd.DataFrame
) -> None:
    p = tmp_path / "one.csv"
    write_csv(adult_typed.head(1), p, adult)
    fed = federation([{"code": "GM0363", "data": p}], source=None, kind="files")
    with pytest.raises(DataValidationError, match="too little data"):
        materialize(fed, adult, tmp_path / "nodes")


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="manifest not found"):
        read_manifest(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"code": "GM0363"}]')
    with pytest.raises(DataFileError, match=str(bad)):
        read_manifest(bad)
    bad.write_text("{not json")
    with pytest.raises(DataFileError, match="not a valid node manifest"):
        read_manifest(bad)
    node = NodeData(
        code="GM0363",
        name="Amsterdam",
        train_path=Path("/a"),
        test_path=Path("/b"),
        train_rows=1,
        test_rows=1,
    )
    with pytest.raises(ValidationError):  # frozen
        node.train_rows = 2  # type: ignore[misc]
