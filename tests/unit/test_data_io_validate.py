"""Reading data files and validating them against a data contract (fedgov.data.io/validate)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgov.config.contract import Contract, load_contract
from fedgov.data import read_table, validate_frame, write_csv
from fedgov.errors import DataFileError, DataValidationError, Problem

ROOT = Path(__file__).resolve().parents[2]
ADULT_CONTRACT = ROOT / "configs" / "contracts" / "adult-income.toml"
ADULT_CSV = ROOT / "data" / "adult" / "adult.csv"


@pytest.fixture(scope="module")
def adult() -> Contract:
    return load_contract(ADULT_CONTRACT)


@pytest.fixture(scope="module")
def small() -> Contract:
    """A contract with one column of every type."""
    return Contract.model_validate(
        {
            "name": "small",
            "version": "1.0",
            "target": "label",
            "person_id": "pid",
            "columns": [
                {"name": "pid", "type": "string"},
                {"name": "age", "type": "integer", "min": 0, "max": 120},
                {"name": "score", "type": "float", "min": -1.5, "max": 2.5, "nullable": True},
                {
                    "name": "color",
                    "type": "categorical",
                    "categories": ["red", "green", "blue", "black", "white"],
                    "nullable": True,
                },
                {"name": "flag", "type": "boolean"},
                {"name": "label", "type": "categorical", "categories": ["no", "yes"]},
            ],
        }
    )


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(text, str):
        p.write_text(text, encoding="utf-8")
    else:
        p.write_bytes(text)
    return p


HEADER = "pid,age,score,color,flag,label\n"


# --- the real data ------------------------------------------------------------------------


def test_adult_csv_conforms(adult: Contract) -> None:
    df = read_table(ADULT_CSV)
    assert df.shape == (32561, 15)
    typed = validate_frame(df, adult, file=str(ADULT_CSV))
    assert list(typed.columns) == adult.names()
    assert typed["age"].dtype == np.float64
    assert typed["workclass"].dtype == object
    assert typed["workclass"].isna().sum() == 1836
    assert typed["workclass"][typed["workclass"].isna()].map(lambda v: v is None).all()
    assert set(typed["income"]) == {"<=50K", ">50K"}


# --- validation: every violation, with row, column, found and expected --------------------


def test_clean_small_file_passes_and_is_typed(tmp_path: Path, small: Contract) -> None:
    p = write(tmp_path, "ok.csv", HEADER + "a,39,0.5,red,true,yes\nb, 40 ,,,NO,no\nc,41.0,1e-3,white,1,yes\n")
    typed = validate_frame(read_table(p), small, file=str(p))
    assert typed["age"].tolist() == [39.0, 40.0, 41.0]
    assert (
        typed["score"].iloc[0] == 0.5 and np.isnan(typed["score"].iloc[1]) and typed["score"].iloc[2] == 0.001
    )
    assert typed["color"].tolist() == ["red", None, "white"]
    assert typed["flag"].tolist() == [1.0, 0.0, 1.0]
    assert typed["label"].tolist() == ["yes", "no", "yes"]


def test_every_violation_is_listed(tmp_path: Path, small: Contract) -> None:
    rows = [
        "a,3.5,0.1,red,true,yes",  # row 1: not an integer
        "b,abc,nan,Red,maybe,yes",  # row 2: not a number, nan, wrong case, not a boolean
        "c,121,inf,purple,1,",  # row 3: out of range, inf, unknown category, missing target
        ",30,3,blue,0,no",  # row 4: empty pid (not nullable), score above max
        "e,30,0,,yes,no",  # row 5: clean (color nullable)
    ]
    p = write(tmp_path, "bad.csv", HEADER + "\n".join(rows) + "\n")
    with pytest.raises(DataValidationError) as info:
        validate_frame(read_table(p), small, file="bad.csv")
    err = info.value
    assert err.summary == "bad.csv does not conform to contract small@1.0: 11 violation(s) in 4 row(s)"
    assert err.problems == [
        Problem("bad.csv", "row 1, column 'age'", "found '3.5', expected an integer in [0, 120]"),
        Problem("bad.csv", "row 2, column 'age'", "found 'abc', expected an integer in [0, 120]"),
        Problem("bad.csv", "row 2, column 'score'", "found 'nan', expected a number in [-1.5, 2.5]"),
        Problem(
            "bad.csv",
            "row 2, column 'color'",
            "found 'Red', expected one of 5 categories (red, green, blue, ...); did you mean 'red'?",
        ),
        Problem(
            "bad.csv", "row 2, column 'flag'", "found 'maybe', expected a boolean (true/false, yes/no or 1/0)"
        ),
        Problem("bad.csv", "row 3, column 'age'", "found '121', expected an integer in [0, 120]"),
        Problem("bad.csv", "row 3, column 'score'", "found 'inf', expected a number in [-1.5, 2.5]"),
        Problem(
            "bad.csv",
            "row 3, column 'color'",
            "found 'purple', expected one of 5 categories (red, green, blue, ...)",
        ),
        Problem("bad.csv", "row 3, column 'label'", "found '', expected a value (column is not nullable)"),
        Problem("bad.csv", "row 4, column 'pid'", "found '', expected a value (column is not nullable)"),
        Problem("bad.csv", "row 4, column 'score'", "found '3', expected a number in [-1.5, 2.5]"),
    ]
    # The message the CLI prints holds every problem.
    assert "row 3, column 'color': found 'purple'" in str(err)


def test_categories_are_all_shown_when_few(adult: Contract) -> None:
    df = pd.DataFrame({c: ["x"] for c in adult.names()}, dtype=str)
    with pytest.raises(DataValidationError) as info:
        validate_frame(df, adult, file="f.csv", columns=["income", "workclass"])
    msgs = {p.location: p.message for p in info.value.problems}
    assert msgs["row 1, column 'income'"] == "found 'x', expected one of 2 categories (<=50K, >50K)"
    assert msgs["row 1, column 'workclass'"] == (
        "found 'x', expected one of 8 categories (Federal-gov, Local-gov, Never-worked, ...)"
    )


def test_missing_and_extra_columns(small: Contract) -> None:
    df = pd.DataFrame(
        {"pid": ["a"], "age": ["1"], "color": ["red"], "flag": ["1"], "label": ["no"], "bsn": ["123"]},
        dtype=str,
    )
    with pytest.raises(DataValidationError) as info:
        validate_frame(df, small, file="f.csv")
    err = info.value
    assert err.summary == "f.csv does not conform to contract small@1.0: 2 column problem(s)"
    locations = [p.location for p in err.problems]
    assert locations == ["column 'score'", "column 'bsn'"]
    assert "missing" in err.problems[0].message and "float" in err.problems[0].message
    assert "not declared in contract small@1.0" in err.problems[1].message


def test_columns_restricts_what_is_required_and_returned(small: Contract) -> None:
    df = pd.DataFrame({"age": ["5"], "label": ["yes"]}, dtype=str)
    typed = validate_frame(df, small, file="f.csv", columns=["label", "age"])
    assert list(typed.columns) == ["label", "age"]
    with pytest.raises(DataValidationError, match="column 'flag'"):
        validate_frame(df, small, file="f.csv", columns=["age", "flag"])
    with pytest.raises(ValueError, match="not in contract"):
        validate_frame(df, small, file="f.csv", columns=["nope"])


def test_listing_stops_at_max_listed(small: Contract) -> None:
    n = 50
    df = pd.DataFrame(
        {
            "pid": ["p"] * n,
            "age": ["x"] * n,
            "score": [""] * n,
            "color": [""] * n,
            "flag": ["2"] * n,
            "label": ["no"] * n,
        },
        dtype=str,
    )
    with pytest.raises(DataValidationError) as info:
        validate_frame(df, small, file="f.csv", max_listed=7)
    err = info.value
    assert err.summary.endswith("100 violation(s) in 50 row(s)")
    assert len(err.problems) == 8
    # Listed in row order, then one line saying how many more there are.
    assert [p.location for p in err.problems[:4]] == [
        "row 1, column 'age'",
        "row 1, column 'flag'",
        "row 2, column 'age'",
        "row 2, column 'flag'",
    ]
    assert err.problems[-1].message == "... and 93 more violation(s) not listed"


@pytest.mark.parametrize(
    ("cell", "ok"),
    [
        ("39", True),
        ("39.0", True),
        ("3.9e1", True),
        (" 39 ", True),
        ("+39", True),
        ("3.5", False),
        ("abc", False),
        ("nan", False),
        ("inf", False),
        ("1,5", False),
        ("0x27", False),
        ("-1", False),
    ],
)
def test_integer_parsing(small: Contract, cell: str, ok: bool) -> None:
    df = pd.DataFrame({"age": [cell]}, dtype=str)
    if ok:
        assert validate_frame(df, small, file="f", columns=["age"])["age"].iloc[0] == 39.0
    else:
        with pytest.raises(DataValidationError, match="expected an integer in"):
            validate_frame(df, small, file="f", columns=["age"])


@pytest.mark.parametrize("cell", ["TRUE", "True", "yes", "YES", "1", "false", "No", "0"])
def test_boolean_spellings(small: Contract, cell: str) -> None:
    df = pd.DataFrame({"flag": [cell]}, dtype=str)
    value = validate_frame(df, small, file="f", columns=["flag"])["flag"].iloc[0]
    assert value == (1.0 if cell.lower() in ("true", "yes", "1") else 0.0)


# --- files that cannot be read -------------------------------------------------------------


def assert_file_error(path: Path, *fragments: str) -> None:
    with pytest.raises(DataFileError) as info:
        read_table(path)
    msg = str(info.value)
    assert str(path) in msg
    for f in fragments:
        assert f in msg, msg


def test_missing_file(tmp_path: Path) -> None:
    assert_file_error(tmp_path / "nope.csv", "not found")


def test_empty_file(tmp_path: Path) -> None:
    assert_file_error(write(tmp_path, "empty.csv", b""), "empty file (0 bytes)")
    assert_file_error(write(tmp_path, "blank.csv", "\n\n"), "empty file")
    assert_file_error(write(tmp_path, "empty.parquet", b""), "empty file (0 bytes)")


def test_header_only(tmp_path: Path) -> None:
    assert_file_error(write(tmp_path, "h.csv", HEADER), "header only, no data rows")
    p = tmp_path / "h.parquet"
    pd.DataFrame({"a": pd.Series([], dtype="int64")}).to_parquet(p)
    assert_file_error(p, "no data rows")


def test_not_utf8(tmp_path: Path) -> None:
    p = write(tmp_path, "latin1.csv", "name,city\nJos\u00e9,Den Haag\n".encode("latin-1"))
    assert_file_error(p, "not UTF-8", "byte offset 13")


def test_parser_errors(tmp_path: Path) -> None:
    assert_file_error(
        write(tmp_path, "ragged.csv", "a,b\n1,2\n1,2,3\n"), "data row 2 has 3 field(s), the header has 2"
    )
    assert_file_error(write(tmp_path, "short.csv", "a,b\n1\n"), "data row 1 has 1 field(s)")
    assert_file_error(write(tmp_path, "quote.csv", 'a,b\n1,"x"y\n'), "cannot be parsed as CSV")


def test_wrong_delimiter(tmp_path: Path) -> None:
    assert_file_error(
        write(tmp_path, "semi.csv", "age;sex\n39;Male\n"),
        "found one column; the file seems to use ';' as delimiter, expected ','",
    )
    assert_file_error(
        write(tmp_path, "tab.csv", "age\tsex\n39\tMale\n"), "found one column", "tab", "expected ','"
    )


def test_duplicate_header(tmp_path: Path) -> None:
    assert_file_error(write(tmp_path, "dup.csv", "a,b,a\n1,2,3\n"), "column 'a' appears twice")


def test_unsupported_kind(tmp_path: Path) -> None:
    assert_file_error(write(tmp_path, "data.xlsx", b"PK"), "unsupported file type (.xlsx)", "CSV", "Parquet")


def test_broken_parquet_and_gzip(tmp_path: Path) -> None:
    assert_file_error(write(tmp_path, "bad.parquet", b"not parquet at all"), "cannot be read as Parquet")
    assert_file_error(write(tmp_path, "bad.csv.gz", b"not gzip"), "not a valid gzip file")


def test_gzip_csv_and_bom(tmp_path: Path) -> None:
    text = "a,b\n1,\n"
    gz = write(tmp_path, "x.csv.gz", gzip.compress(text.encode()))
    bom = write(tmp_path, "bom.csv", "\ufeff" + text)
    for p in (gz, bom):
        df = read_table(p)
        assert list(df.columns) == ["a", "b"]
        assert df.iloc[0].tolist() == ["1", ""]


# --- CSV and Parquet behave the same -------------------------------------------------------


def test_csv_and_parquet_give_the_same_frame(tmp_path: Path, adult: Contract) -> None:
    text = read_table(ADULT_CSV).head(300)
    typed = validate_frame(text, adult, file="csv")
    csv_path = tmp_path / "a.csv"
    write_csv(typed, csv_path, adult)
    # A Parquet file as pandas writes it: real ints, floats with NaN, strings with None.
    native = typed.copy()
    for c in ("age", "fnlwgt", "education_num", "capital_gain", "capital_loss", "hours_per_week"):
        native[c] = native[c].astype("int64")
    pq_path = tmp_path / "a.parquet"
    native.to_parquet(pq_path)
    from_csv = validate_frame(read_table(csv_path), adult, file="csv")
    from_pq = validate_frame(read_table(pq_path), adult, file="pq")
    pd.testing.assert_frame_equal(from_csv, typed)
    pd.testing.assert_frame_equal(from_pq, typed)


cells = st.one_of(
    st.sampled_from(
        [
            "",
            "0",
            "1",
            "39",
            "39.0",
            "3.5",
            "-2",
            "1e-3",
            "abc",
            "true",
            "No",
            "red",
            "Red",
            "blue",
            "nan",
            "inf",
        ]
    ),
    st.text(alphabet='abc01 .,-"é', max_size=5),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(cells, cells, cells, cells, cells, cells), min_size=1, max_size=8))
def test_csv_and_parquet_validate_alike(tmp_path: Path, small: Contract, rows: list[tuple[str, ...]]) -> None:
    """Same cells, either format: the same typed frame or the same violations."""
    df = pd.DataFrame(rows, columns=small.names(), dtype=str)
    csv_path, pq_path = tmp_path / "p.csv", tmp_path / "p.parquet"
    df.to_csv(csv_path, index=False)
    df.to_parquet(pq_path)

    def outcome(path: Path) -> object:
        try:
            return validate_frame(read_table(path), small, file="f")
        except DataValidationError as exc:
            return exc.problems

    a, b = outcome(csv_path), outcome(pq_path)
    if isinstance(a, pd.DataFrame):
        assert isinstance(b, pd.DataFrame)
        pd.testing.assert_frame_equal(a, b)
    else:
        assert a == b


def test_write_csv_round_trips(tmp_path: Path, small: Contract) -> None:
    df = pd.DataFrame(
        {
            "pid": ["a", "b"],
            "age": ["7", "8"],
            "score": ["0.1", ""],
            "color": ["", "red"],
            "flag": ["yes", "0"],
            "label": ["no", "yes"],
        },
        dtype=str,
    )
    typed = validate_frame(df, small, file="f")
    p = tmp_path / "out" / "t.csv"
    write_csv(typed, p, small)
    assert p.read_text().splitlines() == [
        "pid,age,score,color,flag,label",
        "a,7,0.1,,true,no",
        "b,8,,red,false,yes",
    ]
    pd.testing.assert_frame_equal(validate_frame(read_table(p), small, file="f"), typed)
    assert [q.name for q in p.parent.iterdir()] == ["t.csv"]  # no temp file left behind
