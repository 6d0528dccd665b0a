"""The Encoder: model inputs from a typed frame, with every parameter from the contract."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgov.config.contract import ColumnType, Contract, load_contract
from fedgov.data import Encoder, read_table, validate_frame

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def adult() -> Contract:
    return load_contract(ROOT / "configs" / "contracts" / "adult-income.toml")


@pytest.fixture(scope="module")
def adult_typed(adult: Contract) -> pd.DataFrame:
    return validate_frame(read_table(ROOT / "data" / "adult" / "adult.csv").head(2000), adult, file="adult")


SMALL = Contract.model_validate(
    {
        "name": "small",
        "version": "2.1",
        "target": "label",
        "person_id": "pid",
        "columns": [
            {"name": "pid", "type": "string"},
            {"name": "age", "type": "integer", "min": 10, "max": 110},
            {"name": "income", "type": "float", "min": 0, "max": 1000, "scale": "log", "nullable": True},
            {
                "name": "color",
                "type": "categorical",
                "categories": ["red", "green", "blue"],
                "nullable": True,
            },
            {"name": "flag", "type": "boolean", "nullable": True},
            {"name": "label", "type": "categorical", "categories": ["low", "mid", "high"]},
        ],
    }
)


def small_frame(rows: list[tuple[object, ...]]) -> pd.DataFrame:
    cols = ["pid", "age", "income", "color", "flag", "label"]
    df = pd.DataFrame(rows, columns=cols)
    for c in ("age", "income", "flag"):
        df[c] = df[c].astype(np.float64)
    for c in ("pid", "color", "label"):
        df[c] = df[c].astype(object)
    return df


def test_layout_of_the_small_contract() -> None:
    enc = Encoder.from_contract(SMALL)
    assert enc.features == ("age", "income", "color", "flag")  # no person id, no target
    assert enc.feature_names == [
        "age",
        "income",
        "income:missing",
        "color=red",
        "color=green",
        "color=blue",
        "color:missing",
        "flag",
        "flag:missing",
    ]
    assert enc.n_features == 9
    assert enc.n_classes == 3
    assert enc.class_names == ["low", "mid", "high"]
    assert enc.columns == ["age", "income", "color", "flag", "label"]


def test_values_are_encoded_from_contract_parameters() -> None:
    enc = Encoder.from_contract(SMALL)
    df = small_frame(
        [
            ("a", 10.0, 0.0, "red", 1.0, "high"),
            ("b", 110.0, 1000.0, "blue", 0.0, "low"),
            ("c", 60.0, 9.0, None, None, "mid"),
            ("d", 5.0, math.nan, "green", 1.0, "low"),  # below min: clipped
            ("e", 500.0, 1e9, "green", 0.0, "low"),  # above max: clipped
        ]
    )
    x, y = enc.transform(df)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.shape == (5, 9)
    expected = np.array(
        [
            # numbers centred into [-1, 1] by the contract's bounds (a missing one: 0, the middle)
            [-1.0, -1.0, 0, 1, 0, 0, 0, 1, 0],
            [1.0, 1.0, 0, 0, 0, 1, 0, 0, 0],
            [0.0, 2 * math.log1p(9) / math.log1p(1000) - 1, 0, 0, 0, 0, 1, 0, 1],
            [-1.0, 0.0, 1, 0, 1, 0, 0, 1, 0],
            [1.0, 1.0, 0, 0, 1, 0, 0, 0, 0],
        ],
        dtype=np.float32,
    )
    np.testing.assert_allclose(x, expected, rtol=1e-6)
    assert y.tolist() == [2, 0, 1, 0, 0]


def test_adult_width_range_and_classes(adult: Contract, adult_typed: pd.DataFrame) -> None:
    enc = Encoder.from_contract(adult)
    width = 0
    for name in enc.features:
        col = adult.column(name)
        width += len(col.categories) if col.type == ColumnType.CATEGORICAL else 1
        width += 1 if col.nullable else 0
    assert enc.n_features == width == 108
    x, y = enc.transform(adult_typed)
    assert x.shape == (2000, 108)
    assert np.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0
    numeric = [i for i, n in enumerate(enc.feature_names) if adult.column(n.split("=")[0].split(":")[0]).type != ColumnType.CATEGORICAL and ":" not in n]
    assert numeric and x[:, numeric].min() < 0.0  # numbers are centred, not in [0, 1]
    assert set(np.unique(y)) == {0, 1}
    assert enc.class_names == ["<=50K", ">50K"]
    assert (y == 1).tolist() == (adult_typed["income"] == ">50K").tolist()
    # One-hot blocks sum to one per row.
    wc = [i for i, n in enumerate(enc.feature_names) if n.startswith("workclass")]
    np.testing.assert_array_equal(x[:, wc].sum(axis=1), 1.0)


def test_selected_features(adult: Contract, adult_typed: pd.DataFrame) -> None:
    enc = Encoder.from_contract(adult, ["sex", "age"])
    assert enc.feature_names == ["sex=Female", "sex=Male", "age"]
    x, _ = enc.transform(adult_typed[["age", "sex", "income"]])
    assert x.shape == (2000, 3)


def test_same_contract_same_encoder(adult: Contract) -> None:
    a, b = (
        Encoder.from_contract(adult),
        Encoder.from_contract(load_contract(ROOT / "configs" / "contracts" / "adult-income.toml")),
    )
    assert a == b
    assert a.signature == b.signature
    assert a.signature != Encoder.from_contract(adult, ["age"]).signature
    assert a.signature != Encoder.from_contract(SMALL).signature


def test_bad_feature_lists(adult: Contract) -> None:
    with pytest.raises(ValueError, match="is the target"):
        Encoder.from_contract(adult, ["age", "income"])
    with pytest.raises(ValueError, match="not a column"):
        Encoder.from_contract(adult, ["height"])
    with pytest.raises(ValueError, match="person id"):
        Encoder.from_contract(SMALL, ["pid"])


def test_unvalidated_frames_are_refused() -> None:
    enc = Encoder.from_contract(SMALL)
    with pytest.raises(ValueError, match="outside the contract's categories"):
        enc.transform(small_frame([("a", 20.0, 1.0, "purple", 1.0, "low")]))
    with pytest.raises(ValueError, match="not nullable"):
        enc.transform(small_frame([("a", math.nan, 1.0, "red", 1.0, "low")]))
    with pytest.raises(ValueError, match="target 'label'"):
        enc.transform(small_frame([("a", 20.0, 1.0, "red", 1.0, "huge")]))
    with pytest.raises(ValueError, match="other than 0/1"):
        enc.transform(small_frame([("a", 20.0, 1.0, "red", 0.5, "low")]))


rows = st.tuples(
    st.just("p"),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.one_of(st.just(math.nan), st.floats(min_value=-10, max_value=1e7, allow_nan=False)),
    st.sampled_from(["red", "green", "blue", None]),
    st.sampled_from([0.0, 1.0, math.nan]),
    st.sampled_from(["low", "mid", "high"]),
)


@settings(max_examples=30, deadline=None)
@given(st.lists(rows, min_size=1, max_size=20), st.data())
def test_a_row_encodes_the_same_alone_or_among_others(
    others: list[tuple[object, ...]], data: st.DataObject
) -> None:
    """No parameter comes from the data: a row's vector does not depend on the other rows."""
    enc = Encoder.from_contract(SMALL)
    i = data.draw(st.integers(0, len(others) - 1))
    x_all, y_all = enc.transform(small_frame(others))
    x_one, y_one = enc.transform(small_frame([others[i]]))
    np.testing.assert_array_equal(x_all[i], x_one[0])
    assert y_all[i] == y_one[0]
    assert x_all.min() >= -1.0 and x_all.max() <= 1.0
    # Reordering the frame reorders the output and nothing else.
    perm = data.draw(st.permutations(range(len(others))))
    x_perm, _ = enc.transform(small_frame([others[j] for j in perm]))
    np.testing.assert_array_equal(x_perm, x_all[list(perm)])
