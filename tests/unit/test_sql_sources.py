"""A node's data set as a SQL query (SQLite here; PostgreSQL in tests/inprocess/test_sql_postgres.py):
the policy's syntax, the one-SELECT rule, credentials that never come from the policy, and the
same validation as a file (issue 19, item 2)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from fedgov.config.contract import Contract
from fedgov.config.datasource import SqlQuery, SqlSource, check_select
from fedgov.data import read_table, validate_frame
from fedgov.data.sql import frame_digest, read_sql
from fedgov.errors import ConfigError, DataFileError, DataValidationError
from fedgov.node.contracts import check_dataset, held_contracts, validated_frame
from fedgov.node.policy import load_policy

SMALL = Contract.model_validate(
    {
        "name": "small", "version": "1.0", "target": "label",
        "columns": [
            {"name": "age", "type": "integer", "min": 0, "max": 120},
            {"name": "score", "type": "float", "min": -1.5, "max": 2.5, "nullable": True},
            {"name": "flag", "type": "boolean"},
            {"name": "label", "type": "categorical", "categories": ["no", "yes"]},
        ],
    }
)
ROWS = [(30, 0.5, 1, "yes"), (41, None, 0, "no"), (55, 2.0, 1, "no"), (19, -1.0, 0, "yes")]


def _sqlite(path: Path, rows: list[tuple[object, ...]], columns: str = "age INTEGER, score REAL, flag BOOLEAN, label TEXT") -> Path:
    con = sqlite3.connect(path)
    con.execute(f"CREATE TABLE people ({columns})")
    marks = ", ".join("?" * len(rows[0]))
    con.executemany(f"INSERT INTO people VALUES ({marks})", rows)
    con.commit()
    con.close()
    return path


def _query(db: Path, sql: str = "SELECT age, score, flag, label FROM people", **kw: object) -> SqlQuery:
    return SqlSource.model_validate({"url": f"sqlite:///{db}", "query": sql, **kw}).queries()[0]


# --- one SELECT ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM people",
        "select age from people;",
        "  WITH t AS (SELECT age FROM people) SELECT * FROM t ;  ",
        "SELECT 'a;b' AS x, \"delete\" FROM people -- ; insert\n",
        "SELECT $$ ; update $$ AS x /* drop; /* nested */ into */ FROM people",
        "SELECT E'it\\'s; insert' AS x",
        "SELECT age FROM people; -- the export of 2025\n",
    ],
)
def test_one_select_or_with_statement_is_accepted(sql: str) -> None:
    assert check_select(sql).lstrip()[:4].lower() in ("sele", "with")


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("DELETE FROM people", "not DELETE"),
        ("SELECT 1; DROP TABLE people", "more than one statement"),
        ("SELECT 1; SELECT 2;", "more than one statement"),
        ("WITH gone AS (DELETE FROM people RETURNING *) SELECT * FROM gone", "DELETE is not allowed"),
        ("SELECT * INTO backup FROM people", "INTO is not allowed"),
        ("SELECT * FROM people FOR UPDATE", "UPDATE is not allowed"),
        ("SELECT * FROM people FOR SHARE", "locking clause"),
        ("PRAGMA writable_schema = 1", "not PRAGMA"),
        ("SELECT 'unclosed", "not closed"),
        ("  -- only a comment", "empty"),
    ],
)
def test_anything_but_one_read_only_select_is_refused(sql: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        check_select(sql)


def test_a_policy_with_a_writing_query_does_not_load(sql_home) -> None:
    home = sql_home('url = "sqlite:///x.db"\nquery = "DELETE FROM people"')
    with pytest.raises(ConfigError) as err:
        load_policy(home.policy_path)
    assert any(p.location.endswith("sql.query") and "not DELETE" in p.message for p in err.value.problems)


# --- credentials never from the policy -------------------------------------------------------------


@pytest.fixture
def sql_home(node_home, with_sql):  # type: ignore[no-untyped-def]
    """``sql_home(block)``: a node directory whose data set is the SQL query ``block``."""

    def make(block: str):  # type: ignore[no-untyped-def]
        home = node_home()
        home.policy_path.write_text(with_sql(home.policy_path.read_text(), block))
        return home

    return make


def test_a_password_in_the_url_is_refused_and_never_shown(sql_home) -> None:
    home = sql_home('url = "postgresql://reader:Sup3rSecret@db.example.nl:5432/sociaal"\nquery = "SELECT * FROM people"')
    with pytest.raises(ConfigError) as err:
        load_policy(home.policy_path)
    text = str(err.value) + " ".join(f"{p.location} {p.message}" for p in err.value.problems)
    assert "Sup3rSecret" not in text
    assert err.value.__cause__ is None  # pydantic's error, which quotes its input, is not chained
    assert any(p.location.endswith("sql.url") and "holds a password" in p.message and "password_env" in p.message
               for p in err.value.problems)


def test_a_password_as_url_parameter_is_refused_too() -> None:
    with pytest.raises(ValueError, match="holds a password") as err:
        SqlSource(url="postgresql://reader@db/sociaal?password=Sup3rSecret", query="SELECT 1")
    assert "Sup3rSecret" not in str(err.value)


def test_a_policy_names_its_password_source_and_a_sql_data_set_loads(sql_home, tmp_path: Path) -> None:
    home = sql_home('url = "postgresql://reader@db.example.nl/sociaal"\nquery = "SELECT * FROM people"\npassword_env = "FEDGOV_DB_PASSWORD"')
    ds = load_policy(home.policy_path).datasets[0]
    assert ds.path is None and ds.sql is not None
    assert ds.sql.url == "postgresql+psycopg://reader@db.example.nl/sociaal"  # psycopg, the driver fedgov installs
    assert ds.sources == [SqlQuery(ds.sql, "train")]


def test_both_a_file_and_a_query_or_neither_is_refused(node_home) -> None:
    home = node_home()
    text = home.policy_path.read_text()
    home.policy_path.write_text(text.replace('path = "train.csv"\n', ""))
    with pytest.raises(ConfigError, match="problem") as err:
        load_policy(home.policy_path)
    assert any("either as a file" in p.message for p in err.value.problems)


def test_a_missing_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedgov.data.sql import _password

    monkeypatch.delenv("FEDGOV_TEST_DB_PW", raising=False)
    src = SqlSource(url="postgresql://reader@db/sociaal", query="SELECT 1", password_env="FEDGOV_TEST_DB_PW")
    with pytest.raises(DataFileError, match="environment variable FEDGOV_TEST_DB_PW .*is not set"):
        _password(src, "q")
    monkeypatch.setenv("FEDGOV_TEST_DB_PW", "s3cret")
    assert _password(src, "q") == "s3cret"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_password_file_others_can_read_is_refused_as_ssh_does(tmp_path: Path, mode: int) -> None:
    from fedgov.data.sql import _password

    pw = tmp_path / "db-password"
    pw.write_text("s3cret\n")
    os.chmod(pw, mode)
    src = SqlSource(url="postgresql://reader@db/sociaal", query="SELECT 1", password_file=pw)
    with pytest.raises(DataFileError) as err:
        _password(src, "q")
    assert f"permissions {mode:04o}" in str(err.value) and "too open" in str(err.value) and "chmod 600" in str(err.value)
    assert "s3cret" not in str(err.value)
    os.chmod(pw, 0o600)
    assert _password(src, "q") == "s3cret"


def test_a_missing_password_file_is_named(tmp_path: Path) -> None:
    from fedgov.data.sql import _password

    src = SqlSource(url="postgresql://reader@db/sociaal", query="SELECT 1", password_file=tmp_path / "nope")
    with pytest.raises(DataFileError, match="password file .*nope .*not found"):
        _password(src, "q")


# --- the same validation as a file ----------------------------------------------------------------


def test_a_sqlite_query_reads_as_the_same_typed_frame_as_the_csv_export(tmp_path: Path) -> None:
    db = _sqlite(tmp_path / "d.db", ROWS)
    csv = tmp_path / "d.csv"
    csv.write_text("age,score,flag,label\n30,0.5,1,yes\n41,,0,no\n55,2.0,1,no\n19,-1.0,0,yes\n")
    from_sql = validated_frame(_query(db, "SELECT age, score, flag, label FROM people ORDER BY age"), SMALL)
    from_csv = validated_frame(csv, SMALL)
    key = list(SMALL.names())
    pd.testing.assert_frame_equal(
        from_sql.sort_values(key).reset_index(drop=True), from_csv.sort_values(key).reset_index(drop=True)
    )


def _problems(exc: DataValidationError) -> list[tuple[str, str]]:
    return [(p.location, p.message) for p in exc.problems]


def test_undeclared_column_wrong_type_and_null_are_refused_exactly_as_in_a_file(tmp_path: Path) -> None:
    bad = [(30, 0.5, 1, "yes", "x1"), (41.5, None, 0, "no", "x2"), (55, 2.0, None, "maybe", "x3")]
    db = _sqlite(tmp_path / "bad.db", bad, "age REAL, score REAL, flag BOOLEAN, label TEXT, secret TEXT")
    csv = tmp_path / "bad.csv"
    csv.write_text("age,score,flag,label,secret\n30,0.5,1,yes,x1\n41.5,,0,no,x2\n55,2.0,,maybe,x3\n")
    q = _query(db, "SELECT * FROM people")
    with pytest.raises(DataValidationError) as from_sql:
        validate_frame(read_sql(q), SMALL, file="f")
    with pytest.raises(DataValidationError) as from_csv:
        validate_frame(read_table(csv), SMALL, file="f")
    assert _problems(from_sql.value) == _problems(from_csv.value)
    got = dict(_problems(from_sql.value))
    assert "not declared in contract small@1.0" in got["column 'secret'"]
    assert got["row 2, column 'age'"] == "found '41.5', expected an integer in [0, 120]"
    assert got["row 3, column 'flag'"] == "found '', expected a value (column is not nullable)"
    # through the node's path the error names the query and its database, as it names a file
    with pytest.raises(DataValidationError) as named:
        validated_frame(q, SMALL)
    assert all(p.file.startswith("SQL query on sqlite:///") for p in named.value.problems)


def test_the_rows_order_does_not_change_the_digest_or_the_frame(tmp_path: Path) -> None:
    db = _sqlite(tmp_path / "d.db", ROWS)
    up, down = _query(db, "SELECT * FROM people ORDER BY age"), _query(db, "SELECT * FROM people ORDER BY age DESC")
    assert frame_digest(read_sql(up)) == frame_digest(read_sql(down))
    pd.testing.assert_frame_equal(validated_frame(up, SMALL), validated_frame(down, SMALL))
    other = _query(db, "SELECT * FROM people WHERE age > 20")
    assert frame_digest(read_sql(other)) != frame_digest(read_sql(up))


def test_a_query_without_rows_or_with_a_repeated_column_or_on_no_file_is_a_data_file_error(tmp_path: Path) -> None:
    db = _sqlite(tmp_path / "d.db", ROWS)
    with pytest.raises(DataFileError, match="returned no rows"):
        read_sql(_query(db, "SELECT * FROM people WHERE age > 200"))
    with pytest.raises(DataFileError, match="column 'age' appears twice"):
        read_sql(_query(db, "SELECT age, age FROM people"))
    with pytest.raises(DataFileError, match="database file .*missing.db not found"):
        read_sql(_query(tmp_path / "missing.db"))
    with pytest.raises(DataFileError, match="no such column: nope"):
        read_sql(_query(db, "SELECT nope FROM people"))


def test_sqlite_is_opened_read_only_and_a_query_is_stopped_at_its_timeout(tmp_path: Path) -> None:
    db = _sqlite(tmp_path / "d.db", ROWS)
    before = db.read_bytes()
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    with pytest.raises(DataFileError, match="ran longer than timeout_s = 0.2 s"):
        read_sql(_query(db, endless, timeout_s=0.2))
    assert db.read_bytes() == before
    # a query that slipped past the check (a SqlQuery made by hand) is checked again before it runs
    forged = SqlQuery(SqlSource.model_construct(url=f"sqlite:///{db}", query="DELETE FROM people", test_query=None,
                                                password_env=None, password_file=None, timeout_s=5.0))
    with pytest.raises(ValueError, match="not DELETE"):
        read_sql(forged)
    assert sqlite3.connect(db).execute("SELECT count(*) FROM people").fetchone() == (4,)


def test_a_node_data_check_runs_on_a_sqlite_data_set(tmp_path: Path, with_sql) -> None:
    from fedgov.node.contracts import check_all
    from fedgov.node.home import init_node

    home = init_node(tmp_path / "node", node="GM0363", contract=SMALL, data=tmp_path / "unused.csv", approval="auto")
    home.policy_path.write_text(with_sql(home.policy_path.read_text(), 'url = "sqlite:///people.db"\nquery = "SELECT * FROM people"'))
    _sqlite(home.path / "people.db", [(30, 0.5, 1, "yes"), (41, None, 0, "perhaps")])
    [(check, report)] = check_all(home)
    assert not check.conforms and not check.missing and check.columns == ["label"]
    text = report.read_text()
    assert "row 2, column 'label': found 'perhaps'" in text  # the details stay at the node, in its 0600 report
    assert report.stat().st_mode & 0o777 == 0o600
    ds = home.policy().datasets[0]
    again = check_dataset(ds, next(iter(held_contracts(ds).values())))
    assert again.data_sha256 == check.data_sha256 != ""  # the same rows, the same digest
    # the same through the command line, with the operator's exit code for data that does not conform
    from typer.testing import CliRunner

    from fedgov.cli import app as cli
    from fedgov.errors import ExitCode

    out = CliRunner().invoke(cli, ["node", "data", "check", "--node-dir", str(home.path)])
    assert out.exit_code == int(ExitCode.DATA_VALIDATION), out.output
    assert "perhaps" not in out.output  # values only in the report
    con = sqlite3.connect(home.path / "people.db")
    con.execute("UPDATE people SET label = 'no' WHERE label = 'perhaps'")
    con.commit()
    con.close()
    out = CliRunner().invoke(cli, ["node", "data", "check", "--node-dir", str(home.path)])
    assert out.exit_code == 0, out.output
    assert home.state.data_check(ds.name, data_sha256=check_dataset(ds, SMALL).data_sha256, contract_sha256=check.contract_sha256).conforms


# --- review: side effects a read-only transaction does not stop (issue 19/20 review) -------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        # dblink runs its command on another connection: not in the read-only transaction
        ("SELECT dblink_exec('dbname=sociaal', 'DROP TABLE people')", "DBLINK_EXEC"),
        ("SELECT * FROM public.dblink('dbname=sociaal', 'DELETE FROM people RETURNING 1') AS t(x int)", "DBLINK"),
        # large objects write files on the database server
        ("SELECT lo_export(42, '/tmp/people.csv')", "LO_EXPORT"),
        ("SELECT lo_import('/etc/passwd')", "LO_IMPORT"),
        # a quoted name calls the same function; a Unicode-escaped one hides it
        ('SELECT "lo_export"(42, \'/tmp/x\')', "LO_EXPORT"),
        ('SELECT U&"lo\\005fexport"(42, \'/tmp/x\')', "Unicode-escaped"),
        # SQL in a string, run by the server
        ("SELECT query_to_xml('SELECT dblink_exec(''x'', ''y'')', true, true, '')", "QUERY_TO_XML"),
        ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity", "PG_TERMINATE_BACKEND"),
        ("SELECT set_config('default_transaction_read_only', 'off', false)", "SET_CONFIG"),
        ("SELECT pg_advisory_lock(1)", "PG_ADVISORY_LOCK"),
        ("SELECT load_extension('/tmp/evil.so')", "LOAD_EXTENSION"),
    ],
)
def test_functions_with_side_effects_beyond_the_transaction_are_refused(sql: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        check_select(sql)


def test_names_of_such_functions_in_strings_or_as_columns_of_a_table_are_not_calls() -> None:
    # a string or comment mentioning one is no call; the check is about calls
    assert check_select("SELECT 'dblink_exec' AS x FROM people -- lo_export\n")


@pytest.mark.parametrize("key", ["sslpassword", "PASSWORD", "Password"])
def test_any_url_parameter_holding_a_password_is_refused(key: str) -> None:
    with pytest.raises(ValueError, match="holds a password") as err:
        SqlSource(url=f"postgresql://reader@db/sociaal?{key}=Sup3rSecret", query="SELECT 1")
    assert "Sup3rSecret" not in str(err.value)


def test_postgres_sessions_read_strings_as_the_check_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """With standard_conforming_strings off a backslash ends no string for the check but does
    for the server: the session sets it on, as it sets read-only."""
    import sqlalchemy

    seen: dict[str, object] = {}

    def capture(url: str, **kw: object) -> object:
        seen.update(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(sqlalchemy, "create_engine", capture)
    q = SqlSource(url="postgresql://reader@db/sociaal", query="SELECT 1").queries()[0]
    with pytest.raises(DataFileError):
        read_sql(q)
    options = str(seen["connect_args"]["options"])  # type: ignore[index]
    assert "default_transaction_read_only=on" in options and "standard_conforming_strings=on" in options


@pytest.mark.parametrize(
    "sql",
    [
        # SQLite quotes names in `backticks` and [brackets], and has no $$ strings: what the
        # PostgreSQL reading takes for a string there is not one
        "SELECT 1 AS `'`; DELETE FROM people; SELECT `'`",
        "SELECT 1 AS [']; DELETE FROM people; SELECT [']",
        "SELECT $a$; DELETE FROM people; $a$",
        "SELECT E'\\'; DELETE FROM people; --'",
    ],
)
def test_the_check_reads_a_sqlite_query_as_sqlite_does(tmp_path: Path, sql: str) -> None:
    with pytest.raises(ValueError, match="more than one statement"):
        check_select(sql, sqlite=True)
    with pytest.raises(Exception, match="more than one statement"):
        SqlSource.model_validate({"url": f"sqlite:///{tmp_path / 'd.db'}", "query": sql})


def test_a_sqlite_query_may_quote_names_as_sqlite_does() -> None:
    assert check_select("SELECT `select`, [insert] FROM people", sqlite=True)


@pytest.mark.parametrize("code", ["22P02", "23505", "P0001", "38001", "39P01", "2F005", "XX000"])
def test_errors_whose_text_a_function_or_the_data_writes_are_shown_by_code_only(code: str) -> None:
    """A function's RAISE (P0001, external routines 38/39/2F) writes whatever it is given, a row's
    value too; an internal error (XX) may quote a value: only the code is shown."""
    from fedgov.data.sql import _db_message

    class Raised(Exception):
        sqlstate = code

    text = _db_message(Raised("row of citizen 123-45-678: income 91000"), None)
    assert code in text and "123-45-678" not in text and "91000" not in text
