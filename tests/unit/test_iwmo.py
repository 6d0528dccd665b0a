"""Synthetic iWmo data: determinism, shape, contract, plausibility and learnability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from fedgov.config import load_contract, load_federation
from fedgov.data import iwmo, read_table, validate_frame
from fedgov.config.municipalities import all_municipalities

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "configs" / "contracts" / "iwmo-wmo.toml"
SHELTER = ["15", "16", "17", "18"]
SOME = ["GM0363", "GM0599", "GM0088", "GM0171", "GM0589"]


def assert_same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Equal frames: columns, dtypes, index and values (fast; assert_frame_equal is slow on categoricals)."""
    assert list(a.columns) == list(b.columns)
    assert list(a.dtypes) == list(b.dtypes)
    assert a.equals(b)


@pytest.fixture(scope="module")
def country() -> pd.DataFrame:
    """The whole country at scale 1.0 (about 1.4 million rows, a few seconds)."""
    return iwmo.generate(2026)


@pytest.fixture(scope="module")
def some() -> pd.DataFrame:
    return iwmo.generate(2026, codes=SOME)


def test_columns_and_types(some: pd.DataFrame) -> None:
    assert list(some.columns) == iwmo.COLUMNS
    for name in ("age", "start_year", "duration_days"):
        assert pd.api.types.is_integer_dtype(some[name].dtype), name
    for name in ("volume", "budget_eur"):
        assert pd.api.types.is_float_dtype(some[name].dtype), name
    assert pd.api.types.is_bool_dtype(some["ongoing"].dtype)
    assert some["age"].between(0, 105).all()
    assert some["start_year"].between(2015, 2026).all()
    assert some["duration_days"].between(1, 3650).all()
    assert some["volume"].between(0, 40).all()
    assert some["budget_eur"].between(0, 100_000).all()
    assert set(some["municipality"]) == set(SOME)
    assert some["person_id"].str.match(r"^GM\d{4}-\d{6}$").all()
    assert (some["person_id"].str[:6] == some["municipality"]).all()
    per_client = some.groupby("person_id").size()
    assert per_client.between(1, 4).all()
    assert 1.2 <= per_client.mean() <= 1.4
    # client-level attributes are the same on all of a client's rows
    assert (some.groupby("person_id")[["age", "gender"]].nunique(dropna=False) == 1).all().all()
    names = all_municipalities()
    assert (some["province"] == some["municipality"].map(lambda c: names[c].province)).all()


def test_deterministic_and_seeded(some: pd.DataFrame) -> None:
    assert_same(some, iwmo.generate(2026, codes=SOME))
    other = iwmo.generate(2027, codes=SOME)
    assert not other["age"].equals(some["age"]) or len(other) != len(some)


def test_subset_is_part_of_the_whole(country: pd.DataFrame, some: pd.DataFrame) -> None:
    part = country[country["municipality"].isin(SOME)].reset_index(drop=True)
    assert_same(part, some)
    # the order of codes does not matter
    assert_same(iwmo.generate(2026, codes=list(reversed(SOME))), some)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="GM9999"):
        iwmo.generate(codes=["GM9999"])
    with pytest.raises(ValueError):
        iwmo.generate(codes=[])
    with pytest.raises(ValueError):
        iwmo.generate(scale=0)


def test_contract_validates_the_frame(some: pd.DataFrame) -> None:
    contract = load_contract(CONTRACT)
    assert contract.ref == "iwmo-wmo@1.0"
    assert contract.names() == iwmo.COLUMNS
    assert contract.column("product_category").categories == iwmo.CATEGORIES
    assert contract.column("referrer").categories == iwmo.REFERRERS
    assert contract.column("stop_reason").categories == iwmo.STOP_REASONS
    assert contract.column("unit").categories == iwmo.UNITS
    assert contract.column("age_group").categories == iwmo.AGE_GROUPS
    typed = validate_frame(some, contract, file="x")
    assert len(typed) == len(some)


def test_written_file_round_trips(tmp_path: Path) -> None:
    frame = iwmo.generate(2026, codes=["GM0088", "GM0589"])
    path = iwmo.write(tmp_path / "wmo.csv", frame)
    contract = load_contract(CONTRACT)
    back = validate_frame(read_table(path), contract, file=str(path))
    direct = validate_frame(frame, contract, file="x")
    pd.testing.assert_frame_equal(back, direct)
    assert not list(tmp_path.glob(".*.tmp"))


def test_ensure_writes_once(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "wmo.csv"
    assert iwmo.ensure(path, seed=1, scale=0.002) == path
    assert path.is_file()
    before = path.stat().st_mtime_ns
    content = path.read_bytes()
    assert iwmo.ensure(path, seed=1, scale=0.002) == path
    assert path.stat().st_mtime_ns == before and path.read_bytes() == content
    assert read_table(path)["municipality"].nunique() == 342


def test_counts_follow_population(country: pd.DataFrame) -> None:
    clients = country.groupby("municipality")["person_id"].nunique()
    assert set(clients.index) == set(all_municipalities())
    assert clients.min() >= 20
    assert 1_000_000 <= clients.sum() <= 1_300_000
    assert clients["GM0363"] > clients["GM0171"] > clients["GM0088"]
    for code, m in all_municipalities().items():
        if m.approx_population > 50_000:
            assert 0.03 <= clients[code] / m.approx_population <= 0.10, code


def test_every_category_is_common_enough(country: pd.DataFrame) -> None:
    shares = country["product_category"].value_counts(normalize=True)
    assert set(shares.index) == set(iwmo.CATEGORIES)
    assert shares.min() >= 0.015, shares.idxmin()


def test_plausible_ages(country: pd.DataFrame) -> None:
    clients = country.drop_duplicates("person_id")
    assert 65 <= clients["age"].median() <= 75
    young = country["product_category"].isin(["02", *SHELTER])
    assert country.loc[young, "age"].median() < country.loc[~young, "age"].median() - 20
    bands = pd.cut(country["age"], [-1, 17, 39, 64, 74, 84, 200], labels=iwmo.AGE_GROUPS)
    assert (bands.astype(str) == country["age_group"].astype(str)).all()


def test_stop_reasons_consistent(country: pd.DataFrame) -> None:
    early = country["stop_reason"].isin(["21", "22", "23"])
    assert ((country["ended_early"] == "1") == early).all()
    assert ((country["stop_reason"] == "00") == country["ongoing"]).all()
    assert 0.1 <= early.mean() <= 0.4
    assert 0.15 <= country["ongoing"].mean() <= 0.5
    # aids are counted in euro with no hours; sheltered housing in days
    aids = country["product_category"].isin(["11", "12", "13", "14"])
    assert (country.loc[aids, "unit"] == "83").all() and (country.loc[aids, "volume"] == 0).all()
    assert (country.loc[country["product_category"].isin(SHELTER), "unit"] == "14").all()


def test_municipal_mixes_differ(country: pd.DataFrame) -> None:
    cat = country["product_category"]
    shares = pd.DataFrame(
        {"shelter": cat.isin(SHELTER), "rural": cat.isin(["01", "08", "13"]), "guidance": cat == "02"}
    ).groupby(country["municipality"]).mean()
    for city in ("GM0363", "GM0599", "GM0344"):  # Amsterdam, Rotterdam, Utrecht
        for village in ("GM0589", "GM0088"):  # Oudewater, Schiermonnikoog
            assert shares.loc[city, "shelter"] > shares.loc[village, "shelter"], (city, village)
            assert shares.loc[city, "rural"] < shares.loc[village, "rural"], (city, village)
    population = pd.Series({c: m.approx_population for c, m in all_municipalities().items()})
    big = shares[population[shares.index] > 200_000].mean()
    small = shares[population[shares.index] < 20_000].mean()
    assert big["shelter"] > 1.5 * small["shelter"]
    assert big["guidance"] > small["guidance"]
    assert big["rural"] < small["rural"] - 0.1
    mixes = pd.crosstab(country["municipality"], country["product_category"], normalize="index")
    assert mixes.std().min() > 0.003  # every category varies between municipalities
    early = (country["ended_early"] == "1").groupby(country["municipality"]).mean()
    assert early.std() > 0.02


def test_early_ending_is_learnable(country: pd.DataFrame) -> None:
    rows = country[country["municipality"].isin(["GM0363", "GM0344", "GM0150", "GM0171", "GM0589", "GM0088"])]
    features = pd.get_dummies(rows[["product_category", "age_group", "referrer", "gender"]]).astype(float)
    features["volume"] = rows["volume"] / 10.0
    x = features.to_numpy()
    y = (rows["ended_early"] == "1").to_numpy()
    test = np.random.default_rng(0).random(len(y)) < 0.25
    model = LogisticRegression(max_iter=1000).fit(x[~test], y[~test])
    accuracy = float((model.predict(x[test]) == y[test]).mean())
    majority = max(float(y[test].mean()), 1.0 - float(y[test].mean()))
    assert accuracy >= majority + 0.03, (accuracy, majority)


@pytest.mark.parametrize(("name", "n"), [("nl-342-wmo", 342), ("wmo-12", 12)])
def test_federations_load(name: str, n: int) -> None:
    fed = load_federation(ROOT / "configs" / "federations" / f"{name}.toml")
    codes = [m.code for m in fed.members]
    assert len(codes) == n
    assert fed.partition.kind == "column" and fed.partition.column == "municipality"
    assert fed.source == (ROOT / "data" / "iwmo" / "wmo.csv").resolve()
    assert fed.seed == 2026
    if n == 342:
        assert codes == list(all_municipalities())
    else:
        assert {"GM0363", "GM0599", "GM0344", "GM0088"} <= set(codes)
